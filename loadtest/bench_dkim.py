"""What DKIM signing costs per message, and whether it blocks the event loop.

    .venv/bin/python -m loadtest.bench_dkim [--messages 2000] [--sign 400]

Three measurements, each bounded in count and time, on loopback only:

1. ``sign_message`` alone, CPU per message: RSA-2048 through OpenSSL (what
   sendguard does), RSA-2048 with dkimpy's own pure-Python RSA (the
   baseline), Ed25519; messages of 1 KB and 64 KB.
2. The event loop while 16 signings are in flight, signing on the loop
   against signing on the signer's thread pool (what sendguard does): the
   99th-percentile gap seen by a 1 ms ticker, and the CPU the loop thread
   itself spends per message (the part machine load does not blur).
3. ``sendguard run`` with one worker: server CPU per accepted message (utime
   + stime of every sendguard process, from /proc) with the sender's domain
   unsigned, signed with RSA-2048 and signed with Ed25519, switched by
   rewriting the tenant directory between phases of the same run; the
   differences are the signing cost in the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim

from cluster.dkimkeys import generate_key, key_path, read_signing_key
from loadtest.bench_core import PASSWORD, run_clients, wait_for_banner, write_config
from loadtest.loopback import LoopbackDNS, free_port
from loadtest.smtp_load import LoadSpec, add_load_arguments, message
from worker import dkim as signing

TENANTS = """
[domains."kowalski.pl"]
countries = ["PL", "DE", "US"]
{selector}
[accounts."jan@kowalski.pl"]
password = "{password}"
"""


def make_keys(keys_dir: Path) -> dict[str, signing.SigningKey]:
    keys = {}
    for selector, kind in (("rsa1", "rsa"), ("ed1", "ed25519")):
        pem, _ = generate_key(kind)
        path = key_path(keys_dir, "kowalski.pl", selector)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pem)
        keys[selector] = read_signing_key(path, "kowalski.pl", selector)
    return keys


# -- 1. signing alone ---------------------------------------------------------------

def cpu_per_message(key: signing.SigningKey, body: bytes, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        signing.sign_message(body, key)
    return (time.process_time() - started) / count * 1000


def signing_alone(keys: dict[str, signing.SigningKey], count: int) -> None:
    print("1. sign_message alone, CPU ms per message")
    for size in (1024, 65536):
        body = message(size)
        rsa_openssl = cpu_per_message(keys["rsa1"], body, count)
        dkim.RSASSA_PKCS1_v1_5_sign = signing._PURE_PYTHON_RSASSA
        try:
            rsa_python = cpu_per_message(keys["rsa1"], body, max(20, count // 10))
        finally:
            signing.install_openssl_rsa()
        ed = cpu_per_message(keys["ed1"], body, count)
        print(f"   {size // 1024:3d} KB: RSA-2048 via OpenSSL {rsa_openssl:6.3f}   "
              f"RSA-2048 dkimpy pure Python {rsa_python:6.3f}   Ed25519 {ed:6.3f}", flush=True)


# -- 2. the event loop ----------------------------------------------------------------

async def loop_gaps(key: signing.SigningKey, count: int, offload: bool) -> tuple[float, float,
                                                                                    float]:
    """(p99 gap of a 1 ms ticker in ms, the loop thread's CPU ms per message, messages/s)
    with 16 signings in flight. The CPU figure is what the loop itself spends (signing,
    or handing it to the pool), the part that machine load does not blur."""
    body = message(1024)
    pool = ThreadPoolExecutor(2, thread_name_prefix="dkim")  # as DkimSigner makes it
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    async def sign_all() -> None:
        queue = list(range(count))
        loop = asyncio.get_running_loop()

        async def one() -> None:
            while queue:
                queue.pop()
                if offload:
                    await loop.run_in_executor(pool, signing.sign_message, body, key)
                else:
                    signing.sign_message(body, key)
                    await asyncio.sleep(0)  # let others in between, as sessions would

        await asyncio.gather(*(one() for _ in range(16)))
        done.set()

    started, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(ticker(), sign_all())
    loop_cpu = (time.thread_time() - cpu) / count * 1000
    elapsed = time.perf_counter() - started
    pool.shutdown()
    gaps.sort()
    return gaps[int(len(gaps) * 0.99)] * 1000, loop_cpu, count / elapsed


def event_loop(keys: dict[str, signing.SigningKey], count: int) -> None:
    import uvloop

    print("2. event loop with 16 signings in flight (1 KB messages): p99 gap of a 1 ms "
          "ticker, the loop thread's CPU per message, messages/s")
    for selector, name in (("rsa1", "RSA-2048"), ("ed1", "Ed25519")):
        for offload in (False, True):
            p99, loop_cpu, rate = uvloop.run(loop_gaps(keys[selector], count, offload))
            where = "thread pool" if offload else "on the loop"
            print(f"   {name:8s} {where:11s}: p99 gap {p99:6.2f} ms, loop thread "
                  f"{loop_cpu:5.3f} ms CPU per message, {rate:6.0f} msgs/s", flush=True)


# -- 3. in the gateway ------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                todo.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def wait_for_selector(log: Path, selector: str, timeout: float = 30.0) -> None:
    """The worker has the new tenant directory: its snapshot line names its version."""
    end = time.monotonic() + timeout
    size = log.stat().st_size if log.exists() else 0
    while time.monotonic() < end:
        if log.exists() and log.stat().st_size > size:
            tail = log.read_bytes()[size:]
            compact = tail.replace(b'": "', b'":"')
            if b'"event":"snapshot"' in compact and b'"process":"w0"' in compact:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the worker did not take selector {selector!r}")


def in_the_gateway(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sgd-", dir="/tmp"))
    spool = Path(tempfile.mkdtemp(prefix="sgd-spool-", dir=args.spool_dir))
    dns = LoopbackDNS().start()
    sink_port, port = free_port(), free_port()
    config = write_config(folder, port, dns.address, sink_port, 1, spool)
    password = next(line for line in (folder / "tenants.toml").read_text().splitlines()
                    if line.startswith("password")).split('"')[1]
    tenants = folder / "tenants.toml"
    make_keys(folder / "dkim")

    def set_selector(selector: str) -> None:
        line = f'dkim_selector = "{selector}"' if selector else ""
        tenants.write_text(TENANTS.format(selector=line, password=password))

    set_selector("")
    python = sys.executable
    sink = subprocess.Popen([python, "-m", "loadtest.loopback", "--port", str(sink_port)])
    server = subprocess.Popen([python, "-m", "cluster.cli", "run", "-c", str(config)],
                              stderr=subprocess.DEVNULL)
    results: dict[str, list[float]] = {"unsigned": [], "RSA-2048": [], "Ed25519": []}
    try:
        wait_for_banner(sink_port)
        wait_for_banner(port)
        pids = process_tree(server.pid)
        spec = LoadSpec("127.0.0.1", port, args.messages, 100, args.concurrency,
                        user="jan@kowalski.pl", password=PASSWORD)
        run_clients(LoadSpec(**{**spec.__dict__, "messages": 200}), 1)  # warm up
        current = ""
        for _ in range(args.rounds):
            for name, selector in (("unsigned", ""), ("RSA-2048", "rsa1"), ("Ed25519", "ed1")):
                if selector != current:
                    set_selector(selector)
                    wait_for_selector(folder / "sendguard.log", selector)
                    current = selector
                before = cpu_seconds(pids)
                result = run_clients(spec, args.clients)
                spent = cpu_seconds(pids) - before
                if result.accepted:
                    results[name].append(spent / result.accepted * 1000)
                print(f"   {name:8s}: {result.accepted} accepted, {result.refused} refused, "
                      f"{result.errors} errors; {spent / max(result.accepted, 1) * 1000:.3f} "
                      "ms server CPU per message", flush=True)
    finally:
        for process in (server, sink):
            process.send_signal(signal.SIGTERM)
        for process in (server, sink):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        dns.stop()
        signed = sum(b'"dkim":"kowalski.pl/' in line.replace(b'": "', b'":"')
                     for line in (folder / "sendguard.log").read_bytes().splitlines())
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
    base = statistics.median(results["unsigned"])
    print(f"3. sendguard, 1 worker, 100 msgs/session, 1 KB ({signed} messages signed): "
          "server CPU ms per message (median of rounds)")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"   {name:8s} {value:6.3f}  ({value / base:4.2f} x unsigned, "
              f"+{value - base:6.3f} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, messages=2000)
    parser.add_argument("--sign", type=int, default=400, help="signatures per micro measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the gateway phases")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sgd-keys-") as keys_dir:
        keys = make_keys(Path(keys_dir))
        signing_alone(keys, args.sign)
        event_loop(keys, args.sign)
    in_the_gateway(args)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
