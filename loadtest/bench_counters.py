"""The counter path alone: one worker's counter node asking another's.

    .venv/bin/python -m loadtest.bench_counters [--rate 5000] [--seconds 3]
        [--in-flight 50] [--keys 1000000]

Two counter nodes in two processes on ipc:// (as two workers), the keys of
every decision owned by the other one. Each decision is what a message's
end of DATA reserves: an address and an account with the three default
windows each, and the bounce ratio's plain count. Printed, per mode (every
decision reserved at the owner, or decided on leases the owner lent):

- decisions/s with `--in-flight` decisions outstanding at any time;
- p50/p99 latency at a fixed offered rate (`--rate`, open loop: decisions
  start on schedule, whatever is still outstanding, up to `--in-flight`);
- CPU per decision of both processes (utime + stime from /proc).

Then what replication costs an owner: exporting one key's state beside
10,000 unrelated live reservations and beside none, and exporting one of
10,000 reservations of a hot key (tests/worker/test_counters.py checks that
neither walks every reservation). Last, a counter shard's memory per
tracked key: `--keys` synthetic keys with the three default windows and a
few messages each, RSS measured in a fresh process. A benchmark, not a
test: compare figures within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from loadtest.counter_peer import WINDOWS, asker_and_peer, process_cpu

BOUNCE_WINDOW = 3600.0


def _keys_owned_by(owner: str, members: list[str], n: int) -> list[str]:
    from cluster.ring import Ring

    ring, found = Ring(members), []
    for i in range(100_000):
        subject = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        if ring.owner(f"ip:{subject}") == owner:
            found.append(subject)
            if len(found) == n:
                return found
    raise RuntimeError("no keys for the owner")


def _decision(subject: str, account: str) -> list[Any]:
    from cluster.counting import Op

    ops = [Op(f"ip:{subject}", "msg", w, m) for w, m in WINDOWS]
    ops += [Op(f"acct:{account}", "msg", w, m) for w, m in WINDOWS]
    ops.append(Op(f"bounce:{subject}", "acc", BOUNCE_WINDOW, None))
    return ops


async def _run(args: argparse.Namespace) -> None:
    from cluster.ring import Ring

    async with asker_and_peer("owner", "sgbc") as (asker, names, peer_pid):
        subjects = _keys_owned_by("owner", names, 20)
        accounts = [f"user{i}@bench.test" for i in range(200)
                    if Ring(names).owner(f"acct:user{i}@bench.test") == "owner"][:5]
        client = asker.client
        sequence = [0]

        async def decide() -> float:
            n = sequence[0] = sequence[0] + 1
            ops = _decision(subjects[n % len(subjects)], accounts[n % len(accounts)])
            began = time.perf_counter()
            outcome = await client.reserve(f"bench-{n}", ops)
            if not outcome.ok:
                raise RuntimeError(f"refused: {outcome}")
            return time.perf_counter() - began

        print(f"counter path, 2 processes, 1 decision = {len(_decision('a', 'b'))} ops "
              f"on 2 keys of another process's owner + a plain count")
        for leasing in (False, True):
            client.leasing = leasing
            label = "leases" if leasing else "per message"
            # Warm up, then closed loop with a fixed number in flight.
            await _closed(decide, args.in_flight, 1.0)
            pids = (os.getpid(), peer_pid)
            cpu0 = sum(process_cpu(p) for p in pids)
            frames0, _ = asker.links.frames_sent()
            done, seconds = await _closed(decide, args.in_flight, args.seconds)
            cpu = sum(process_cpu(p) for p in pids) - cpu0
            frames = asker.links.frames_sent()[0] - frames0
            print(f"{label:12s} {done / seconds:8.0f} decisions/s with {args.in_flight} in "
                  f"flight, {cpu / max(done, 1) * 1e6:6.1f} us CPU per decision (both), "
                  f"{frames / max(done, 1):.3f} frames sent per decision by the asker")
            samples, late = await _open(decide, args.rate, args.seconds, args.in_flight)
            cuts = statistics.quantiles(samples, n=100)
            print(f"{label:12s} at {args.rate}/s offered: p50 {cuts[49] * 1000:.3f} ms, "
                  f"p99 {cuts[98] * 1000:.3f} ms ({len(samples)} decisions, "
                  f"{late} started late for want of a free slot)")


async def _closed(decide: Any, in_flight: int, seconds: float) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def lane() -> None:
        nonlocal done
        while loop.time() < end:
            await decide()
            done += 1

    began = loop.time()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return done, loop.time() - began


async def _open(decide: Any, rate: float, seconds: float, in_flight: int
                ) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(in_flight)
    samples: list[float] = []
    late = 0
    tasks = []

    async def one() -> None:
        try:
            samples.append(await decide())
        finally:
            slots.release()

    began = loop.time()
    for i in range(int(rate * seconds)):
        delay = began + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots.locked():
            late += 1
        await slots.acquire()
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return samples, late


def _export_figures() -> None:
    """Microseconds per ``CounterShard.export`` of one key, busy shard against quiet one."""
    from cluster.counting import Op
    from worker.counters.shard import CounterShard

    hour, now = 3600.0, 1_700_000_000.0

    def per_export(shard: CounterShard, keys: list[str], rids: list[str] | None = None) -> float:
        began, rounds = time.perf_counter(), 500
        for _ in range(rounds):
            shard.export(keys, rids)
        return (time.perf_counter() - began) / rounds * 1e6

    def mine(shard: CounterShard) -> CounterShard:
        shard.reserve("mine", [Op("ip:a", "msg", hour, 100)])
        shard.reserve("both", [Op("ip:a", "msg", hour, 100), Op("ip:b", "msg", hour, 100)])
        return shard

    busy = CounterShard(clock=lambda: now)
    for i in range(10_000):
        busy.reserve(f"other{i}", [Op(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "msg",
                                      hour, None)])
    quiet = mine(CounterShard(clock=lambda: now))
    print(f"export of one key: {per_export(mine(busy), ['ip:a']):.1f} us with 10,000 unrelated "
          f"live reservations, {per_export(quiet, ['ip:a']):.1f} us with none")
    hot = CounterShard(clock=lambda: now)
    for i in range(10_000):
        hot.reserve(f"r{i}", [Op("ip:hot", "msg", hour, None), Op("acct:x", "msg", hour, None)])
    print(f"export of a hot key with 10,000 live reservations: "
          f"{per_export(hot, ['ip:hot'], ['r8']):.1f} us for one of them")


def _memory(keys: int, conn: Connection) -> None:
    """In a fresh process: RSS per tracked key of a shard."""
    from cluster.counting import Op
    from worker.counters.shard import CounterShard

    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    now = [1_700_000_000.0]
    shard = CounterShard(clock=lambda: now[0])
    windows = ((60.0, 250), (3600.0, 1000), (43200.0, 10000))
    gc.collect()
    before = rss()
    for i in range(keys):
        key = f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        ops = [Op(key, "msg", w, m) for w, m in windows]
        for _ in range(1 + i % 3):  # a few messages each
            shard.add(ops)
        now[0] += 10.0 / keys  # all within ten seconds: none leaves its window
    gc.collect()
    conn.send(((rss() - before) / keys, len(shard)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="offered decisions/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--in-flight", type=int, default=50, help="decisions outstanding")
    parser.add_argument("--keys", type=int, default=1_000_000,
                        help="synthetic keys for the memory figure (0: skip)")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_run(args))
    _export_figures()
    if args.keys:
        spawn = multiprocessing.get_context("spawn")
        parent, child = spawn.Pipe()
        process = spawn.Process(target=_memory, args=(args.keys, child))
        process.start()
        per_key, held = parent.recv()
        process.join()
        print(f"shard memory: {per_key:.0f} bytes of RSS per key ({held:,} keys, three "
              f"windows each, 1-3 messages each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
