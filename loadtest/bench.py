"""Throughput and CPU per message side by side: ``sendguard loadtest bench``.

In one run and with one client (:mod:`loadtest.smtp_load`: aiosmtplib on
uvloop, ``--clients`` processes, connect, EHLO, STARTTLS, AUTH, MAIL, RCPT,
DATA of 1 KB, QUIT), at 1 and at 100 messages per session:

- sendguard at 1..N workers (``sendguard run``; every policy on, durable
  spool, delivering to a local sink while it accepts);
- with ``--compare DIR``, the same from another source tree (an earlier
  commit unpacked with ``git archive``), so a change is measured against
  its "before" in the same rounds;
- a stock uvloop + aiosmtpd server (aiosmtpd as released) that accepts any
  AUTH and discards, with as many processes as sendguard's largest worker
  count, and the same with the gateway's per-connection saving (the "bare"
  sink, unless ``--no-bare``);
- Postfix, when installed (``--install-postfix`` installs it): a private
  instance with a durable queue relaying to a local sink; no AUTH.

Besides msgs/s, every measurement reads the CPU time (user + system) of
every process of the target (:mod:`loadtest.cpu`) from the start of the
load until the target's sink has received everything it accepted, so the
delivery of a backlog counts against the target that built it. The sink's
own CPU, and how many SMTP sessions it saw, are reported apart. CPU per
accepted message is the figure to trust on a shared machine.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import postfix_baseline
from loadtest.bench_core import PASSWORD, ROOT, wait_for_banner, write_config
from loadtest.cpu import trees_cpu
from loadtest.loopback import free_port
from loadtest.recording_sink import CountingSink, start_counting_sink
from loadtest.scenario import ClusterProcess, quiet_dns
from loadtest.smtp_load import LoadResult, LoadSpec, run_load_process

PER_SESSION = (1, 100)
USER = "jan@kowalski.pl"


@dataclass
class Target:
    name: str
    kind: str                 # sendguard | stock | bare | postfix
    workers: int              # processes serving
    ports: list[int]
    auth: bool = True
    sink: CountingSink | None = None  # the relay sink, for targets that deliver
    accepted: int = 0         # all this target accepted so far (delivery must catch up)
    stop: list[Any] = field(default_factory=list)
    roots: Callable[[], list[int]] = list  # the target's process trees, for its CPU
    tree: str = ""            # sendguard from another source tree (--compare): its label

    @property
    def delivered(self) -> int:
        return self.sink.messages.value if self.sink is not None else 0

    def cpu(self) -> float:
        return trees_cpu(self.roots())

    def sink_cpu(self) -> float:
        if self.sink is None or self.sink.process.pid is None:
            return 0.0
        return trees_cpu([self.sink.process.pid])

    def sink_sessions(self) -> int:
        return self.sink.sessions.value if self.sink is not None else 0


def _specs(target: Target, per_session: int, messages: int, args: argparse.Namespace
           ) -> list[LoadSpec]:
    share = max(per_session, messages // args.clients // per_session * per_session)
    return [LoadSpec("127.0.0.1", target.ports[i % len(target.ports)], share, per_session,
                     max(1, args.concurrency // args.clients),
                     user=USER if target.auth else "", password=PASSWORD if target.auth else "")
            for i in range(args.clients)]


def measure(pool: Any, target: Target, per_session: int, messages: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One bounded load, then the wait for its delivery; the CPU of both counts."""
    specs = _specs(target, per_session, messages, args)
    delivered_before, sessions_before = target.delivered, target.sink_sessions()
    cpu_before, sink_before = target.cpu(), target.sink_cpu()
    parts: list[LoadResult] = pool.map(run_load_process, specs)
    delivered = target.delivered - delivered_before
    seconds = max(part.seconds for part in parts)
    accepted = sum(part.accepted for part in parts)
    target.accepted += accepted
    backlog = wait_delivered(target)
    cpu, sink_cpu = target.cpu() - cpu_before, target.sink_cpu() - sink_before
    received = target.delivered - delivered_before
    sessions = target.sink_sessions() - sessions_before
    return {
        "target": target.name, "kind": target.kind, "tree": target.tree,
        "workers": target.workers, "msgs_per_session": per_session,
        "messages": sum(spec.messages for spec in specs),
        "accepted": accepted, "refused": sum(part.refused for part in parts),
        "errors": sum(part.errors for part in parts), "seconds": round(seconds, 3),
        "msgs_per_s": round(accepted / seconds, 1) if seconds else 0.0,
        "delivered_per_s": round(delivered / seconds, 1) if seconds else 0.0,
        "backlog": backlog,
        "cpu_ms_per_msg": round(cpu * 1000 / accepted, 3) if accepted else 0.0,
        "sink_cpu_ms_per_msg": round(sink_cpu * 1000 / received, 3) if received else "",
        "sink_sessions_per_1000": round(sessions * 1000 / received, 1) if received else "",
        "first_error": next((p.first_error for p in parts if p.first_error), ""),
    }


def wait_delivered(target: Target, timeout: float = 180.0) -> int:
    """Until the target's sink has all it accepted; what is still missing at the end."""
    if target.sink is None:
        return 0
    deadline = time.monotonic() + timeout
    last, progress = -1, time.monotonic()
    while target.delivered < target.accepted and time.monotonic() < deadline:
        if target.delivered != last:
            last, progress = target.delivered, time.monotonic()
        elif time.monotonic() - progress > 15:
            break  # delivery stalled: report it rather than wait out the timeout
        time.sleep(0.05)
    return max(0, target.accepted - target.delivered)


def _folder(name: str) -> str:
    return name.replace(" ", "-").replace("@", "-")


def _cluster_roots(cluster: ClusterProcess) -> Callable[[], list[int]]:
    # ``sendguard run`` is the supervisor: the coordinator and the workers are its children.
    return lambda: [cluster.process.pid] if cluster.process is not None else []


def _start_sendguard(args: argparse.Namespace, folder: Path, spool_root: Path,
                     dns_address: str, targets: list[Target], workers: int,
                     source: Path | None) -> None:
    label = "" if source is None else source.name
    name = f"sendguard{'@' + label if label else ''} {workers}w"
    sub = folder / _folder(name)
    sub.mkdir()
    port, sink_port = free_port(), free_port()
    sink = start_counting_sink(sink_port)
    config = write_config(sub, port, dns_address, sink_port, workers, spool_root / sub.name)
    cluster = ClusterProcess(config, sub / "run", port, sub / "stderr.txt", source=source)
    target = Target(name, "sendguard", workers, [port], sink=sink,
                    stop=[sink.kill, cluster.stop], roots=_cluster_roots(cluster), tree=label)
    targets.append(target)
    cluster.start(workers)


def _start_sinks(name: str, kind: str, processes: int, cert: Path, key: Path,
                 targets: list[Target], *extra: str) -> None:
    target = Target(name, kind, processes, [free_port() for _ in range(processes)])
    targets.append(target)
    started: list[subprocess.Popen[bytes]] = []
    target.roots = lambda: [process.pid for process in started]
    for port in target.ports:
        process = subprocess.Popen([sys.executable, "-m", "loadtest.loopback", "--port",
                                    str(port), "--cert", str(cert), "--key", str(key), "--auth",
                                    *extra], cwd=ROOT, stderr=subprocess.DEVNULL)
        started.append(process)
        target.stop.append(process.terminate)
        wait_for_banner(port)


def start_targets(args: argparse.Namespace, folder: Path, spool_root: Path,
                  dns_address: str, targets: list[Target]) -> None:
    """Start every target, adding each to ``targets`` before it starts (to be stopped)."""
    for source in [None, *(Path(tree).resolve() for tree in args.compare)]:
        for workers in range(1, args.workers + 1):
            _start_sendguard(args, folder, spool_root, dns_address, targets, workers, source)
    first = folder / _folder(targets[0].name)
    cert, key = first / "cert.pem", first / "key.pem"
    _start_sinks(f"stock aiosmtpd x{args.workers}", "stock", args.workers, cert, key, targets,
                 "--stock")
    if not args.no_bare:
        _start_sinks(f"bare aiosmtpd x{args.workers}", "bare", args.workers, cert, key,
                     targets)
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
    sink = start_counting_sink(sink_port)
    relay = postfix_baseline.PostfixRelay(spool_root / "postfix", port, sink_port, cert, key)
    target = Target(f"postfix {postfix_baseline.version()}", "postfix", 1, [port], auth=False,
                    sink=sink, stop=[sink.kill, relay.stop],
                    roots=lambda: [pid] if (pid := relay.master_pid()) else [])
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
            for number in range(1, args.rounds + 1):
                shift = (number - 1) % len(targets)
                for per_session in PER_SESSION:
                    messages = args.messages * (1 if per_session == 1 else 3)
                    for target in targets[shift:] + targets[:shift]:
                        row = measure(pool, target, per_session, messages, args)
                        row["round"] = number
                        rows.append(row)
                        sink = (f", sink {row['sink_cpu_ms_per_msg']:.2f} ms/msg and "
                                f"{row['sink_sessions_per_1000']:.0f} sessions per 1,000"
                                if row["sink_cpu_ms_per_msg"] != "" else "")
                        print(f"round {number}  {row['target']:24s} {per_session:3d}/session "
                              f"{row['msgs_per_s']:7.0f} msgs/s {row['cpu_ms_per_msg']:6.2f} "
                              f"ms CPU/msg  (accepted {row['accepted']}, refused "
                              f"{row['refused']}, errors {row['errors']}, delivered "
                              f"{row['delivered_per_s']:.0f}/s while accepting{sink}"
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
            "postfix": next((t.name for t in targets if t.kind == "postfix"), "not measured"),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(report(rows, Path(args.out), meta))
    return 0
