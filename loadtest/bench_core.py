"""Gateway throughput against a bare aiosmtpd sink, with the same client in the same run.

    .venv/bin/python -m loadtest.bench_core [--messages 1500] [--workers 1]

Full transactions (connect, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA of 1 KB,
QUIT) at 1 and at 100 messages per session, against

- sendguard (``sendguard run``: every policy on — sender domain, GeoIP, rate
  limits, recipient domain over DNS, bounce ratio, builtin spam check — and
  the durable spool), and
- a bare uvloop + aiosmtpd server that accepts any AUTH and discards;

then the cost of the durable spool alone (group-committed fsync against no
fsync). Everything runs on loopback and is bounded in count and time. Both
servers share the machine with the client, so compare the ratio, not the
absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.passwords import hash_password
from cluster.selfsigned import write_self_signed
from loadtest.cpu import tree_cpu
from loadtest.loopback import LoopbackDNS, free_port
from loadtest.smtp_load import LoadResult, LoadSpec, add_load_arguments, run_load_process

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password"


def write_config(folder: Path, port: int, dns: str, sink_port: int, workers: int,
                 spool: Path) -> Path:
    write_self_signed(folder / "cert.pem", folder / "key.pem", "bench.test")
    (folder / "tenants.toml").write_text(
        '[domains."kowalski.pl"]\ncountries = ["PL", "DE", "US"]\n'
        f'[accounts."jan@kowalski.pl"]\npassword = "{hash_password(PASSWORD)}"\n')
    config = folder / "sendguard.toml"
    config.write_text(f"""
[server]
hostname = "bench.test"
listen = ["127.0.0.1:{port}"]
tls_cert = "cert.pem"
tls_key = "key.pem"
workers = {workers}

[tenants]
file = "tenants.toml"

[cluster]
runtime_dir = "{folder}/run"
state_dir = "{folder}/state"

[geoip]
database = "{ROOT / 'examples' / 'GeoLite2-Country-example.mmdb'}"
default_countries = ["PL"]

[[limits]]
window = "1m"
max = 10000000

[bounce]
min_messages = 100000000

[spam]
backend = "builtin"

[dns]
nameservers = ["{dns}"]

[log]
file = "{folder}/sendguard.log"

[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{sink_port}"
spool = "{spool}"
""")
    return config


def wait_for_banner(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing answers on port {port}")


def run_clients(spec: LoadSpec, processes: int) -> LoadResult:
    share = LoadSpec(**{**spec.__dict__, "messages": spec.messages // processes,
                        "concurrency": max(1, spec.concurrency // processes)})
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        parts = pool.map(run_load_process, [share] * processes)
    total = LoadResult()
    for part in parts:
        total.accepted += part.accepted
        total.refused += part.refused
        total.errors += part.errors
        total.seconds = max(total.seconds, part.seconds)
        total.first_error = total.first_error or part.first_error
    return total


def spool_cost(folder: Path, messages: int) -> tuple[float, float]:
    from loadtest.bench_spool import _records  # the same records the spool benchmark uses
    from worker.spool import SegmentSpool

    async def measure(fsync: bool) -> float:
        directory = folder / ("fsync" if fsync else "nofsync")
        spool = SegmentSpool(directory, "w0", fsync=fsync)
        records = _records(messages, 1024)
        semaphore = asyncio.Semaphore(64)

        async def one(record):  # type: ignore[no-untyped-def]
            async with semaphore:
                await spool.store(record)

        started = time.perf_counter()
        await asyncio.gather(*(one(r) for r in records))
        elapsed = time.perf_counter() - started
        await spool.aclose()
        return messages / elapsed

    return asyncio.run(measure(True)), asyncio.run(measure(False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, messages=1500)
    parser.add_argument("--workers", type=int, default=1, help="sendguard workers")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp"))
    spool = Path(tempfile.mkdtemp(prefix="sgb-spool-", dir=args.spool_dir))
    dns = LoopbackDNS().start()
    sink_port, bare_port, gateway_port = free_port(), free_port(), free_port()
    config = write_config(folder, gateway_port, dns.address, sink_port, args.workers, spool)
    python = sys.executable
    processes = [
        subprocess.Popen([python, "-m", "loadtest.loopback", "--port", str(sink_port)]),
        subprocess.Popen([python, "-m", "loadtest.loopback", "--port", str(bare_port),
                          "--cert", str(folder / "cert.pem"), "--key", str(folder / "key.pem"),
                          "--auth"]),
        subprocess.Popen([python, "-m", "cluster.cli", "run", "-c", str(config)],
                         stderr=subprocess.DEVNULL),
    ]
    rows = []
    try:
        for port in (sink_port, bare_port, gateway_port):
            wait_for_banner(port)
        for per_session in (1, 100):
            count = args.messages * (1 if per_session == 1 else 4)
            figures = {}
            for name, port, server in (("bare aiosmtpd", bare_port, processes[1]),
                                       ("sendguard", gateway_port, processes[2])):
                spec = LoadSpec("127.0.0.1", port, count, per_session, args.concurrency,
                                user="jan@kowalski.pl", password=PASSWORD)
                before = tree_cpu(server.pid)
                result = run_clients(spec, args.clients)
                cpu = (tree_cpu(server.pid) - before) * 1000 / max(1, result.accepted)
                rate = result.accepted / result.seconds if result.seconds else 0.0
                figures[name] = rate
                error = f", {result.first_error}" if result.first_error else ""
                print(f"{name:14s} {per_session:3d} msg/session: {rate:8.0f} msgs/s "
                      f"{cpu:5.2f} ms CPU/msg ({result.accepted} accepted, "
                      f"{result.refused} refused, {result.errors} errors{error})", flush=True)
            rows.append((per_session, figures["sendguard"], figures["bare aiosmtpd"]))
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        dns.stop()
    with_fsync, without_fsync = spool_cost(folder, 3000)
    print()
    print("msgs/session  sendguard  bare aiosmtpd  ratio")
    for per_session, ours, bare in rows:
        print(f"{per_session:12d}  {ours:9.0f}  {bare:13.0f}  {ours / bare:5.2f}")
    print()
    print(f"durable spool alone (SegmentSpool, 1 KB, 64 in flight, {args.spool_dir}): "
          f"{with_fsync:,.0f} msgs/s with fsync, {without_fsync:,.0f} without "
          f"({with_fsync / without_fsync:.2f})")
    print(f"machine: {os.cpu_count()} CPUs; workers: {args.workers}; "
          f"clients: {args.clients} processes x {args.concurrency // args.clients} sessions")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(spool, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
