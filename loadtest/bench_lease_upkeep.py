"""What leases cost per key and second, apart from the decisions spent on them.

    .venv/bin/python -m loadtest.bench_lease_upkeep [--keys 1000] [--seconds 10]
    PYTHONPATH=/tmp/sg-before .venv/bin/python loadtest/bench_lease_upkeep.py

Two counter nodes in two processes on ipc:// (as two workers). The asker
decides twice a second on each of `--keys` keys (three default windows
each, limits far away), so every key's lease is spent from in each of its
one-second buckets and ends, comes back and is lent again every second.
Once with the keys owned by the other process (its answers carry the
replication), once with keys the asker owns itself (the replica is the other
process, which gets the changes in ``Replicate`` frames). Printed per case:
CPU of both processes (utime + stime from /proc) per key and second, and
the request items and frames the asker sent per key and second. The
decisions themselves are in both figures; compare two source trees in one
run (the second command runs this file against another tree), not across
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection

WINDOWS = ((60.0, 250_000_000), (3600.0, 1_000_000_000), (43200.0, 10_000_000_000))


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _other(folder: str, conn: Connection) -> None:
    import uvloop

    uvloop.run(_serve(folder, conn))


async def _serve(folder: str, conn: Connection) -> None:
    from worker.counters.node import CounterNode
    from worker.counters.shard import CounterShard

    node = CounterNode("other", f"ipc://{folder}/other.sock", CounterShard(), 5.0)
    await node.start()
    conn.send(node.endpoint)
    members = await asyncio.to_thread(conn.recv)
    await node.apply_ring(1, members)
    conn.send(await node.wait_active(10.0))
    await asyncio.to_thread(conn.recv)  # told to stop
    await node.close()
    conn.send("closed")


async def _run(args: argparse.Namespace) -> None:
    from cluster.counting import Op
    from cluster.ring import Ring
    from worker.counters.node import CounterNode
    from worker.counters.shard import CounterShard

    folder = tempfile.mkdtemp(dir="/tmp", prefix="sgu")
    os.chmod(folder, 0o700)
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    other = spawn.Process(target=_other, args=(folder, child), daemon=True)
    other.start()
    asker = CounterNode("asker", f"ipc://{folder}/asker.sock", CounterShard(), 5.0)
    try:
        await asker.start()
        members = [("other", await asyncio.to_thread(parent.recv)), ("asker", asker.endpoint)]
        parent.send(members)
        await asker.apply_ring(1, members)
        assert await asyncio.to_thread(parent.recv) and await asker.wait_active(10.0)
        ring = Ring([name for name, _ in members])
        pids = (os.getpid(), other.pid or 0)
        print(f"lease upkeep, 2 processes, {args.keys} keys decided on twice a second, "
              f"{args.seconds:g} s per case")
        for case, owner in (("owned by the other process", "other"),
                            ("owned by the asker", "asker")):
            keys = [key for key in (f"ip:10.1.{i >> 8}.{i & 255}" for i in range(65536))
                    if ring.owner(key) == owner][:args.keys]
            decisions = [[Op(key, "msg", w, m, 1) for w, m in WINDOWS] for key in keys]
            sequence = 0

            async def tick(owner: str = owner, decisions: list[list[Op]] = decisions) -> None:
                nonlocal sequence
                jobs = []
                for ops in decisions:
                    sequence += 1
                    jobs.append(asker.client.reserve(f"u-{owner}-{sequence}", ops))
                for outcome in await asyncio.gather(*jobs):
                    if not outcome.ok:
                        raise RuntimeError(f"refused: {outcome}")

            async def paced(seconds: float) -> None:
                # A quarter of a second from each end of it: leases end on
                # whole seconds.
                start = math.floor(time.time()) + 1.25
                for n in range(int(seconds * 2)):
                    delay = start + n / 2 - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await tick()

            await paced(3.0)  # every key borrows and its leases start renewing
            cpu0 = [_cpu(p) for p in pids]
            frames0, items0 = asker.links.frames_sent()
            held0 = len(asker.client._book.leases)
            began = time.monotonic()
            await paced(args.seconds)
            elapsed = time.monotonic() - began
            cpu = [_cpu(p) - c for p, c in zip(pids, cpu0, strict=True)]
            frames, items = (a - b for a, b in zip(asker.links.frames_sent(),
                                                   (frames0, items0), strict=True))
            per = args.keys * elapsed
            print(f"{case:28s} {sum(cpu) / per * 1e6:7.1f} us CPU per key and second "
                  f"(asker {cpu[0] / per * 1e6:.1f}, other {cpu[1] / per * 1e6:.1f}), "
                  f"{items / per:.2f} items and {frames / per:.3f} frames sent per key and "
                  f"second by the asker ({held0} of {args.keys} keys on leases)")
            await asyncio.sleep(1.2)  # the last leases come back
    finally:
        await asker.close()
        parent.send("stop")
        if parent.poll(10):
            parent.recv()
        other.join(5)
        if other.is_alive():
            other.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_run(args))


if __name__ == "__main__":
    main(sys.argv[1:])

