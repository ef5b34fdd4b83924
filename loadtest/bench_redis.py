"""The Redis counter backend against the ring, on one host, same client, same run.

    .venv/bin/python -m loadtest.bench_redis [--workers 2] [--rounds 3] [--messages 1500]

Two sendguard targets with the same configuration (:func:`loadtest.bench_core.write_config`:
every policy on, durable spool, delivery to a counting sink) and the same
number of workers, one with ``[counters] backend = "ring"`` and one with
``backend = "redis"`` against a private ``redis-server`` on loopback
(``appendonly yes``, ``appendfsync everysec``, as docs/MULTIHOST.md
recommends). Full transactions with STARTTLS and AUTH, at 1 and 100
messages per session, targets measured in rotating order in every round.

For every measurement: msgs/s, and CPU per accepted message from
/proc (utime + stime) of the sendguard processes (supervisor, coordinator,
workers) and, apart, of the redis-server. Delivery runs while the load
does, and each measurement waits until the sink has everything, so the
CPU of delivering is in the figure. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.bench_core import PASSWORD, write_config
from loadtest.loopback import free_port
from loadtest.recording_sink import start_counting_sink
from loadtest.scenario import ClusterProcess, patch_config, quiet_dns
from loadtest.smtp_load import LoadResult, LoadSpec, add_load_arguments, run_load_process

USER = "jan@kowalski.pl"
TICK = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each live process, in seconds."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


class RedisProcess:
    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.port = free_port()
        (folder / "redis.conf").write_text(
            f"bind 127.0.0.1\nport {self.port}\ndir {folder}\nsave \"\"\n"
            "appendonly yes\nappendfsync everysec\nprotected-mode no\n"
            f"logfile {folder / 'redis.log'}\n")
        self.process = subprocess.Popen(["redis-server", str(folder / "redis.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "PING"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {folder / 'redis.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


class Target:
    def __init__(self, name: str, cluster: ClusterProcess, delivered: Any,
                 stop: list[Any]) -> None:
        self.name = name
        self.cluster = cluster
        self.delivered = delivered
        self.accepted = 0
        self.stop = stop


def measure(pool: Any, target: Target, redis: RedisProcess, per_session: int, messages: int,
            args: argparse.Namespace) -> dict[str, Any]:
    assert target.cluster.process is not None
    gateway = process_tree(target.cluster.process.pid)
    share = max(per_session, messages // args.clients // per_session * per_session)
    specs = [LoadSpec("127.0.0.1", target.cluster.port, share, per_session,
                      max(1, args.concurrency // args.clients), user=USER, password=PASSWORD)
             for _ in range(args.clients)]
    before, redis_before = cpu_seconds(gateway), cpu_seconds([redis.process.pid])
    parts: list[LoadResult] = pool.map(run_load_process, specs)
    accepted = sum(part.accepted for part in parts)
    target.accepted += accepted
    deadline = time.monotonic() + 120
    while target.delivered.value < target.accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    after, redis_after = cpu_seconds(gateway), cpu_seconds([redis.process.pid])
    seconds = max(part.seconds for part in parts)
    per_message = 1000.0 / accepted if accepted else 0.0
    return {
        "target": target.name, "per_session": per_session, "accepted": accepted,
        "refused": sum(part.refused for part in parts),
        "errors": sum(part.errors for part in parts),
        "msgs_per_s": accepted / seconds if seconds else 0.0,
        "gateway_ms": used(before, after) * per_message,
        "redis_ms": used(redis_before, redis_after) * per_message,
        "first_error": next((p.first_error for p in parts if p.first_error), ""),
    }


def start_target(name: str, folder: Path, dns: str, workers: int, spool_dir: str,
                 counters: str) -> Target:
    folder.mkdir()
    port, sink_port = free_port(), free_port()
    sink = start_counting_sink(sink_port)
    delivered = sink.messages
    spool = Path(tempfile.mkdtemp(prefix="sgbench-", dir=spool_dir))
    config = write_config(folder, port, dns, sink_port, workers, spool)
    if counters:
        patch_config(config, {"[tenants]": f"{counters}\n[tenants]"})
    cluster = ClusterProcess(config, folder / "run", port, folder / "stderr.txt")
    target = Target(name, cluster, delivered,
                    [sink.kill, cluster.stop, lambda: shutil.rmtree(spool, ignore_errors=True)])
    try:
        cluster.start(workers)
    except BaseException:
        for stop in target.stop:
            stop()
        raise
    return target


def summary(rows: list[dict[str, Any]], names: list[str]) -> str:
    lines = ["", f"{'target':14s} {'msgs/session':>12s} {'msgs/s':>8s} {'gateway ms/msg':>15s} "
             f"{'redis ms/msg':>13s} {'total ms/msg':>13s}"]
    medians: dict[tuple[str, int], float] = {}
    for per_session in (1, 100):
        for name in names:
            mine = [r for r in rows if r["target"] == name and r["per_session"] == per_session]
            if not mine:
                continue
            rate = statistics.median(r["msgs_per_s"] for r in mine)
            gateway = statistics.median(r["gateway_ms"] for r in mine)
            redis = statistics.median(r["redis_ms"] for r in mine)
            medians[(name, per_session)] = gateway + redis
            lines.append(f"{name:14s} {per_session:12d} {rate:8.0f} {gateway:15.3f} "
                         f"{redis:13.3f} {gateway + redis:13.3f}")
    for per_session in (1, 100):
        ring, redis_total = medians.get(("ring", per_session)), medians.get(("redis", per_session))
        if ring and redis_total:
            lines.append(f"redis / ring, total CPU per message at {per_session}/session: "
                         f"{redis_total / ring:.2f}x")
    lines.append("(medians over rounds; CPU is utime+stime from /proc; the sink's is left out)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_redis",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--workers", type=int, default=2, help="workers of each target")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every measurement")
    add_load_arguments(parser, 1500)
    args = parser.parse_args(argv)
    if not shutil.which("redis-server"):
        print("bench_redis: redis-server is not installed", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="sgredis-", dir="/tmp"))
    dns = quiet_dns()
    targets: list[Target] = []
    redis: RedisProcess | None = None
    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    try:
        redis = RedisProcess(folder / "redis-server")
        redis_section = (f'[counters]\nbackend = "redis"\n'
                         f'redis_url = "redis://127.0.0.1:{redis.port}/0"\n')
        for name, counters in (("ring", ""), ("redis", redis_section)):
            targets.append(start_target(name, folder / name, dns.address, args.workers,
                                        args.spool_dir, counters))
        with context.Pool(args.clients) as pool:
            for target in targets:  # warm-up: connections, caches, the scripts loaded
                measure(pool, target, redis, 1, 200, args)
            for number in range(args.rounds):
                order = targets[number % 2:] + targets[:number % 2]
                for per_session in (1, 100):
                    messages = args.messages * (1 if per_session == 1 else 4)
                    for target in order:
                        row = measure(pool, target, redis, per_session, messages, args)
                        rows.append(row)
                        print(f"round {number + 1} {row['target']:6s} {per_session:3d}/session "
                              f"{row['msgs_per_s']:7.0f} msgs/s  gateway "
                              f"{row['gateway_ms']:.3f} ms/msg  redis {row['redis_ms']:.3f} "
                              f"ms/msg  (accepted {row['accepted']}, refused {row['refused']}, "
                              f"errors {row['errors']}"
                              f"{', ' + row['first_error'] if row['first_error'] else ''})",
                              flush=True)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench_redis: {exc}", file=sys.stderr)
        return 1
    finally:
        for target in targets:
            for stop in target.stop:
                stop()
        if redis is not None:
            redis.stop()
        dns.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(summary(rows, [t.name for t in targets]))
    print(f"workers {args.workers}, clients {args.clients}, concurrency {args.concurrency}, "
          f"rounds {args.rounds}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
