"""Cluster throughput at 1 and at 2 workers, with the same client for both.

    .venv/bin/python -m loadtest.bench_cluster [--messages 2000] [--clients 2]

For each worker count it starts ``sendguard run`` (every policy on, counters
in the ring, the durable spool), waits until every worker is in the ring and
listening, warms up, then runs full transactions (connect, EHLO, STARTTLS,
AUTH, MAIL, RCPT, DATA of 1 KB, QUIT) from 127.0.0.x sources at 1 and at 100
messages per session, bounded in count and time, and reads the CPU time the
whole cluster (supervisor, coordinator, workers: ``loadtest.cpu``) used per
accepted message. The client is the one
``loadtest.bench_core`` uses (``loadtest.smtp_load``), in its own processes
on the same machine: compare the two rows, not the absolute figures, across
machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.admin import AdminFailure, request
from loadtest.bench_core import PASSWORD, run_clients, write_config
from loadtest.cpu import tree_cpu
from loadtest.loopback import LoopbackDNS, free_port
from loadtest.smtp_load import LoadResult, LoadSpec, add_load_arguments


def wait_serving(runtime_dir: Path, workers: int, process: subprocess.Popen[bytes],
                 timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sendguard run exited {process.returncode}")
        try:
            status = request(runtime_dir, "status", {})
        except AdminFailure:
            status = {"ring": [], "workers": []}
        serving = [w for w in status["workers"] if w["member"] and w["phase"] == "serving"]
        if len(status["ring"]) == workers and len(serving) == workers:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{workers} workers not serving after {timeout:g} s")


def measure(workers: int, args: argparse.Namespace, dns: str, sink_port: int,
            spool_root: str) -> list[tuple[int, LoadResult, float]]:
    folder = Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp"))
    spool = Path(tempfile.mkdtemp(prefix="sgb-spool-", dir=spool_root))
    port = free_port()
    config = write_config(folder, port, dns, sink_port, workers, spool)
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", "-c", str(config)],
                               stderr=subprocess.DEVNULL)
    results = []
    try:
        wait_serving(folder / "run", workers, process)
        warm = LoadSpec("127.0.0.1", port, 100, 1, args.concurrency, user="jan@kowalski.pl",
                        password=PASSWORD, deadline=args.deadline)
        run_clients(warm, args.clients)
        for per_session in (1, 100):
            count = args.messages * (1 if per_session == 1 else 4)
            spec = LoadSpec("127.0.0.1", port, count, per_session, args.concurrency,
                            user="jan@kowalski.pl", password=PASSWORD, deadline=args.deadline)
            before = tree_cpu(process.pid)
            result = run_clients(spec, args.clients)
            used = tree_cpu(process.pid) - before
            results.append((per_session, result, used / max(1, result.accepted)))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, messages=2000)
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds per run, at most")
    args = parser.parse_args(argv)

    dns = LoopbackDNS().start()
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "loadtest.loopback", "--port", str(sink_port)])
    rows: dict[tuple[int, int], LoadResult] = {}
    try:
        for workers in (1, 2):
            for per_session, result, cpu in measure(workers, args, dns.address, sink_port,
                                                    args.spool_dir):
                rows[workers, per_session] = result
                rate = result.accepted / result.seconds if result.seconds else 0.0
                print(f"{workers} worker(s), {per_session:3d} msg/session: {rate:7.0f} msgs/s, "
                      f"{cpu * 1000:.2f} ms server CPU per message ({result.accepted} accepted, "
                      f"{result.refused} refused, {result.errors} errors in "
                      f"{result.seconds:.1f} s"
                      f"{', first: ' + result.first_error if result.first_error else ''})",
                      flush=True)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
        dns.stop()

    print()
    print("msgs/session  1 worker  2 workers  ratio")
    for per_session in (1, 100):
        one, two = (rows[w, per_session] for w in (1, 2))
        rate_one = one.accepted / one.seconds if one.seconds else 0.0
        rate_two = two.accepted / two.seconds if two.seconds else 0.0
        ratio = rate_two / rate_one if rate_one else 0.0
        print(f"{per_session:12d}  {rate_one:8.0f}  {rate_two:9.0f}  {ratio:5.2f}")
    print(f"machine: {os.cpu_count()} CPUs; clients: {args.clients} processes x "
          f"{args.concurrency // args.clients} sessions; 1 KB messages, STARTTLS + AUTH PLAIN")
    return 0


if __name__ == "__main__":
    sys.exit(main())
