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
import os
import sys
import time

from loadtest.counter_peer import WINDOWS, asker_and_peer, process_cpu


async def _run(args: argparse.Namespace) -> None:
    from cluster.counting import Op
    from cluster.ring import Ring

    async with asker_and_peer("other", "sgu") as (asker, names, peer_pid):
        ring = Ring(names)
        pids = (os.getpid(), peer_pid)
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
            cpu0 = [process_cpu(p) for p in pids]
            frames0, items0 = asker.links.frames_sent()
            held0 = len(asker.client._book.leases)
            began = time.monotonic()
            await paced(args.seconds)
            elapsed = time.monotonic() - began
            cpu = [process_cpu(p) - c for p, c in zip(pids, cpu0, strict=True)]
            frames, items = (a - b for a, b in zip(asker.links.frames_sent(),
                                                   (frames0, items0), strict=True))
            per = args.keys * elapsed
            print(f"{case:28s} {sum(cpu) / per * 1e6:7.1f} us CPU per key and second "
                  f"(asker {cpu[0] / per * 1e6:.1f}, other {cpu[1] / per * 1e6:.1f}), "
                  f"{items / per:.2f} items and {frames / per:.3f} frames sent per key and "
                  f"second by the asker ({held0} of {args.keys} keys on leases)")
            await asyncio.sleep(1.2)  # the last leases come back


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_run(args))


if __name__ == "__main__":
    main(sys.argv[1:])

