"""Spool write throughput: what durability costs and what group commit buys.

    .venv/bin/python -m loadtest.bench_spool --messages 2000 --concurrency 64 --dir /var/tmp/x

Every configuration gets a fresh directory under ``--dir`` and runs three
timed phases with ``--concurrency`` operations in flight: store N messages
of ``--size`` bytes into an empty spool ("store"), remove them all as
delivery does ("remove"), then store N more ("steady"). The steady phase is
the one that counts: on a filesystem without a journal, creating files
after many deletes is much slower than on a fresh one, and a real queue is
never fresh. Rates are msgs/s, ratios are to the first row, "cpu/msg" is
this process's CPU time per steady-phase store (the spool shares the cores
with the SMTP side), "batch" is messages per durable flush. Run it on the
filesystem the spool will live on; /tmp may be a tmpfs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.spool import BaseSpool, SegmentSpool, SpoolRecord


@dataclass
class Result:
    name: str
    store_fresh: float
    remove: float
    store_steady: float
    cpu_us: float  # process CPU (user + system, all threads) per steady-phase store
    batch: float  # mean messages per durable flush in the steady phase


CONFIGS: list[tuple[str, int | None, Callable[[Path], BaseSpool]]] = [
    # (label, concurrency override, factory); None keeps --concurrency
    ("segment, fsync per message", None, lambda d: SegmentSpool(d, "w0", group_commit=False)),
    ("segment, group commit", None, lambda d: SegmentSpool(d, "w0")),
    ("segment, no fsync", None, lambda d: SegmentSpool(d, "w0", fsync=False)),
]


def _records(n: int, size: int) -> list[SpoolRecord]:
    body = (b"X" * 76 + b"\r\n") * (size // 78) + b"X" * (size % 78)
    return [
        SpoolRecord.new(
            session_id="piWs1j0010jifNx01iWsdh",
            client_ip="192.0.2.10",
            account="jan@kowalski.pl",
            helo="laptop.kowalski.pl",
            mail_from="jan@kowalski.pl",
            rcpt_tos=["anna@example.com"],
            message=body,
        )
        for _ in range(n)
    ]


async def _pump(items: list, fn: Callable, concurrency: int) -> float:  # type: ignore[type-arg]
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(items) / (time.perf_counter() - t0)


async def _run(
    name: str, factory: Callable[[Path], BaseSpool], root: Path, n: int, size: int, concurrency: int
) -> Result:
    directory = root / name.replace(" ", "").replace(",", "-")
    shutil.rmtree(directory, ignore_errors=True)
    spool = factory(directory)
    try:
        spool.load_all()
        first = _records(n, size)
        fresh = await _pump(first, spool.store, concurrency)
        removal = await _pump([r.queue_id for r in first], spool.remove, concurrency)
        second = _records(n, size)
        before, cpu0 = spool.group_stats, _cpu()
        steady = await _pump(second, spool.store, concurrency)
        after, cpu = spool.group_stats, _cpu() - cpu0
        flushes = after[0] - before[0]
        batch = (after[1] - before[1]) / flushes if flushes else 1.0
    finally:
        await spool.aclose()
        shutil.rmtree(directory, ignore_errors=True)
    return Result(name, fresh, removal, steady, cpu / n * 1e6, batch)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _main(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.messages} messages of {args.size} B, {args.concurrency} in flight, "
        f"on {root} ({_fs_type(root)})",
        flush=True,
    )
    head = f"{'configuration':38} {'store':>8} {'ratio':>6} {'steady':>8} {'ratio':>6}"
    print(f"{head} {'cpu/msg':>8} {'remove':>8} {'batch':>6}")
    results: list[Result] = []
    for name, conc, factory in CONFIGS:
        res = await _run(name, factory, root, args.messages, args.size, conc or args.concurrency)
        results.append(res)
        base = results[0]
        print(
            f"{res.name:38} {res.store_fresh:8.0f} {res.store_fresh / base.store_fresh:6.1f} "
            f"{res.store_steady:8.0f} {res.store_steady / base.store_steady:6.1f} "
            f"{res.cpu_us:6.0f}us {res.remove:8.0f} {res.batch:6.1f}",
            flush=True,
        )


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    real = str(path.resolve())
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fstype
    return f"{kind} on {best}" if best else kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024, help="message bytes")
    parser.add_argument("--dir", default="/var/tmp/sendguard-bench-spool")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.concurrency < 1:
        parser.error("--messages and --concurrency must be positive")
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
