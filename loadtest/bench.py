"""Throughput side by side: ``sendguard loadtest bench``.

In one run and with one client (:mod:`loadtest.smtp_load`: aiosmtplib on
uvloop, ``--clients`` processes, connect, EHLO, STARTTLS, AUTH, MAIL, RCPT,
DATA of 1 KB, QUIT), at 1 and at 100 messages per session:

- sendguard at 1..N workers (``sendguard run``; every policy on, durable
  spool, delivering to a local sink while it accepts);
- a bare uvloop + aiosmtpd sink that accepts any AUTH and discards, with as
  many processes as sendguard's largest worker count;
- Postfix, when installed (``--install-postfix`` installs it): a private
  instance with a durable queue relaying to a local sink; no AUTH.

Every target is started once and measured in rounds, in a rotating order,
so each ratio compares figures taken minutes apart on the same machine.
After a measurement the next waits until the target's sink has received
everything it accepted, so no delivery backlog runs into the next figure.
Results: ``bench-runs.csv`` (every measurement), ``bench-summary.csv``
(median and range per target, and every ratio to sendguard) and
``bench.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import postfix_baseline
from loadtest.bench_core import PASSWORD, ROOT, wait_for_banner, write_config
from loadtest.loopback import free_port
from loadtest.recording_sink import start_counting_sink
from loadtest.scenario import ClusterProcess, quiet_dns
from loadtest.smtp_load import LoadResult, LoadSpec, run_load_process

PER_SESSION = (1, 100)
USER = "jan@kowalski.pl"


@dataclass
class Target:
    name: str
    kind: str                 # sendguard | bare | postfix
    workers: int              # processes serving
    ports: list[int]
    auth: bool = True
    delivered: Any = None     # the relay sink's shared counter, for targets that deliver
    accepted: int = 0         # all this target accepted so far (delivery must catch up)
    stop: list[Any] = field(default_factory=list)


def _specs(target: Target, per_session: int, messages: int, args: argparse.Namespace
           ) -> list[LoadSpec]:
    share = max(per_session, messages // args.clients // per_session * per_session)
    return [LoadSpec("127.0.0.1", target.ports[i % len(target.ports)], share, per_session,
                     max(1, args.concurrency // args.clients),
                     user=USER if target.auth else "", password=PASSWORD if target.auth else "")
            for i in range(args.clients)]


def measure(pool: Any, target: Target, per_session: int, messages: int,
            args: argparse.Namespace) -> dict[str, Any]:
    specs = _specs(target, per_session, messages, args)
    before = target.delivered.value if target.delivered is not None else 0
    parts: list[LoadResult] = pool.map(run_load_process, specs)
    delivered = (target.delivered.value if target.delivered is not None else 0) - before
    seconds = max(part.seconds for part in parts)
    accepted = sum(part.accepted for part in parts)
    target.accepted += accepted
    return {
        "target": target.name, "kind": target.kind, "workers": target.workers,
        "msgs_per_session": per_session, "messages": sum(spec.messages for spec in specs),
        "accepted": accepted, "refused": sum(part.refused for part in parts),
        "errors": sum(part.errors for part in parts), "seconds": round(seconds, 3),
        "msgs_per_s": round(accepted / seconds, 1) if seconds else 0.0,
        "delivered_per_s": round(delivered / seconds, 1) if seconds else 0.0,
        "first_error": next((p.first_error for p in parts if p.first_error), ""),
    }


def wait_delivered(target: Target, timeout: float = 180.0) -> int:
    """Until the target's sink has all it accepted; what is still missing at the end."""
    if target.delivered is None:
        return 0
    deadline = time.monotonic() + timeout
    last, progress = -1, time.monotonic()
    while target.delivered.value < target.accepted and time.monotonic() < deadline:
        if target.delivered.value != last:
            last, progress = target.delivered.value, time.monotonic()
        elif time.monotonic() - progress > 15:
            break  # delivery stalled: report it rather than wait out the timeout
        time.sleep(0.1)
    return max(0, target.accepted - target.delivered.value)


def start_targets(args: argparse.Namespace, folder: Path, spool_root: Path,
                  dns_address: str, targets: list[Target]) -> None:
    """Start every target, adding each to ``targets`` before it starts (to be stopped)."""
    for workers in range(1, args.workers + 1):
        sub = folder / f"sg{workers}"
        sub.mkdir()
        port, sink_port = free_port(), free_port()
        sink, counter = start_counting_sink(sink_port)
        config = write_config(sub, port, dns_address, sink_port, workers,
                              spool_root / f"sg{workers}")
        cluster = ClusterProcess(config, sub / "run", port, sub / "stderr.txt")
        target = Target(f"sendguard {workers}w", "sendguard", workers, [port],
                        delivered=counter, stop=[sink.kill, cluster.stop])
        targets.append(target)
        cluster.start(workers)
    cert, key = folder / "sg1" / "cert.pem", folder / "sg1" / "key.pem"
    bare = Target(f"bare aiosmtpd x{args.workers}", "bare", args.workers,
                  [free_port() for _ in range(args.workers)])
    targets.append(bare)
    for port in bare.ports:
        process = subprocess.Popen([sys.executable, "-m", "loadtest.loopback", "--port",
                                    str(port), "--cert", str(cert), "--key", str(key), "--auth"],
                                   cwd=ROOT, stderr=subprocess.DEVNULL)
        bare.stop.append(process.terminate)
        wait_for_banner(port)
    if args.no_postfix:
        print("postfix: left out (--no-postfix)", flush=True)
        return
    if not postfix_baseline.installed():
        if not args.install_postfix:
            print("postfix: SKIPPED - not installed; --install-postfix installs Debian's "
                  "package, which replaces any other MTA on this machine", flush=True)
            return
        print("postfix: installing Debian's package (--install-postfix)", flush=True)
        postfix_baseline.install_postfix()
    port, sink_port = free_port(), free_port()
    sink, counter = start_counting_sink(sink_port)
    relay = postfix_baseline.PostfixRelay(spool_root / "postfix", port, sink_port, cert, key)
    target = Target(f"postfix {postfix_baseline.version()}", "postfix", 1, [port], auth=False,
                    delivered=counter, stop=[sink.kill, relay.stop])
    targets.append(target)
    relay.start()
    wait_for_banner(port)


def run(args: argparse.Namespace) -> int:
    from loadtest.bench_report import report

    folder = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))
    spool_root = Path(tempfile.mkdtemp(prefix="sgbench-", dir=args.spool_dir))
    os.chmod(spool_root, 0o755)  # Postfix's daemons (user postfix) work under it
    dns = quiet_dns()
    targets: list[Target] = []
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    context = multiprocessing.get_context("spawn")
    try:
        start_targets(args, folder, spool_root, dns.address, targets)
        with context.Pool(args.clients) as pool:
            for target in targets:  # warm-up: first connections, password hash, caches
                measure(pool, target, 1, 200, args)
                wait_delivered(target)
            for number in range(1, args.rounds + 1):
                shift = (number - 1) % len(targets)
                for per_session in PER_SESSION:
                    messages = args.messages * (1 if per_session == 1 else 3)
                    for target in targets[shift:] + targets[:shift]:
                        row = measure(pool, target, per_session, messages, args)
                        row["round"] = number
                        row["backlog"] = wait_delivered(target)
                        rows.append(row)
                        print(f"round {number}  {row['target']:22s} {per_session:3d}/session "
                              f"{row['msgs_per_s']:8.0f} msgs/s  (accepted {row['accepted']}, "
                              f"refused {row['refused']}, errors {row['errors']}, delivered "
                              f"{row['delivered_per_s']:.0f}/s while accepting"
                              f"{', ' + row['first_error'] if row['first_error'] else ''})",
                              flush=True)
    except (postfix_baseline.PostfixError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"sendguard: loadtest bench: {exc}", file=sys.stderr)
        return 1
    finally:
        for target in reversed(targets):
            for stop in target.stop:
                stop()
        dns.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(spool_root, ignore_errors=True)
    meta = {"cpus": os.cpu_count(), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "spool_dir": args.spool_dir,
            "clients": args.clients, "concurrency": args.concurrency, "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(report(rows, Path(args.out), meta))
    return 0
