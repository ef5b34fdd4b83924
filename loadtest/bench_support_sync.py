"""How long a suspension made on one host takes to stop mail on another (shared Redis).

    .venv/bin/python -m loadtest.bench_support_sync [--rounds 10]

Two sendguard hosts on this machine (one worker each, ``[counters] backend =
"redis"``, a private redis-server on loopback). Each round: a session on host B
is logged in; ``account suspend`` is sent to host A's coordinator; from its
answer, MAIL is tried in B's open session every 10 ms until it is refused.
Then ``unsuspend`` on B, timed the same way until A's open session is
accepted again. Prints each delay and their median and maximum. The bound
is the coordinator's tick (0.5 s) plus a snapshot's way to the workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cluster.admin import request
from loadtest.bench_core import PASSWORD, write_config
from loadtest.bench_redis import RedisProcess
from loadtest.loopback import free_port
from loadtest.scenario import ClusterProcess, patch_config, quiet_dns

USER = "jan@kowalski.pl"
POLL = 0.01


def login(port: int) -> smtplib.SMTP:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.test", timeout=30)
    client.starttls(context=context)
    client.login(USER, PASSWORD)
    return client


def until_mail(client: smtplib.SMTP, code: int, timeout: float = 30.0) -> float:
    """Seconds until MAIL in ``client``'s session gets ``code``."""
    started = time.monotonic()
    while True:
        got = client.mail(USER)[0]
        client.rset()
        if got == code:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"MAIL still answered {got} after {timeout:g} s")
        time.sleep(POLL)


def start_host(folder: Path, dns: str, counters: str) -> ClusterProcess:
    """One worker; nothing is sent, so delivery goes to a port nobody listens on."""
    folder.mkdir()
    port = free_port()
    config = write_config(folder, port, dns, free_port(), 1, folder / "spool")
    patch_config(config, {"[tenants]": f"{counters}\n[tenants]"})
    host = ClusterProcess(config, folder / "run", port, folder / "stderr.txt")
    try:
        return host.start(1)
    except BaseException:
        host.stop()
        raise


def one_round(a: ClusterProcess, b: ClusterProcess) -> tuple[float, float]:
    on_a, on_b = login(a.port), login(b.port)
    try:
        request(a.runtime_dir, "suspend", {"account": USER, "reason": "bench", "by": "bench"})
        suspended = until_mail(on_b, 550)
        request(b.runtime_dir, "unsuspend", {"account": USER, "by": "bench"})
        lifted = until_mail(on_a, 250)
    finally:
        on_a.close()
        on_b.close()
    return suspended, lifted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_support_sync",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if not shutil.which("redis-server"):
        print("bench_support_sync: redis-server is not installed", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="sgsync-", dir="/tmp"))
    dns = quiet_dns()
    hosts: list[ClusterProcess] = []
    redis: RedisProcess | None = None
    delays: list[tuple[float, float]] = []
    try:
        redis = RedisProcess(folder / "redis-server")
        section = f'[counters]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{redis.port}/0"\n'
        for name in ("a", "b"):
            hosts.append(start_host(folder / name, dns.address, section))
        for number in range(args.rounds):
            delays.append(one_round(*hosts))
            print(f"round {number + 1}: suspended on A, refused on B after "
                  f"{delays[-1][0] * 1000:.0f} ms; lifted on B, accepted on A after "
                  f"{delays[-1][1] * 1000:.0f} ms", flush=True)
    except (RuntimeError, TimeoutError, OSError, smtplib.SMTPException) as exc:
        print(f"bench_support_sync: {exc}", file=sys.stderr)
        return 1
    finally:
        for host in hosts:
            host.stop()
        if redis is not None:
            redis.stop()
        dns.stop()
        shutil.rmtree(folder, ignore_errors=True)
    for what, values in (("suspension", [d[0] for d in delays]),
                         ("lifting", [d[1] for d in delays])):
        print(f"{what}: median {statistics.median(values) * 1000:.0f} ms, "
              f"max {max(values) * 1000:.0f} ms over {len(values)} rounds")
    print(f"load average {os.getloadavg()[0]:.2f}, cpus {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
