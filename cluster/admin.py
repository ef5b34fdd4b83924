"""``sendguard status | scale N | inspect ip|account``, and what every admin command shares.

Each command finds the running cluster through ``-c CONFIG`` (its runtime
folder), sends one ``AdminRequest`` to the coordinator's socket and prints
the ``AdminReply``: a table for people, ``--json`` for scripts
(:func:`execute`). Exit status: 0 done, 1 failed (also: no cluster
running), 2 bad usage. The support commands live in
:mod:`cluster.support_cli`, the queue's in :mod:`cluster.queue_cli`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import wire
from cluster.settings import load_settings
from cluster.validate import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
TIMEOUT = 10.0


class AdminFailure(Exception):
    pass


def add_parser(commands: Any, name: str,
               config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    if name == "status":
        config_arg(commands.add_parser("status", help="show the running cluster"))
    elif name == "scale":
        scale = commands.add_parser("scale", help="change the number of workers")
        scale.add_argument("workers", type=int, help="how many workers to run (1 or more)")
        config_arg(scale)
    elif name == "inspect":
        inspect = commands.add_parser("inspect", help="show the counters of an address or account")
        kinds = inspect.add_subparsers(dest="kind", required=True, metavar="KIND")
        for kind, what, about in (("ip", "ADDR", "a client address (IPv6: its /64)"),
                                  ("account", "USER", "an account, user@domain")):
            sub = kinds.add_parser(kind, help=about)
            sub.add_argument("subject", metavar=what)
            config_arg(sub)


def request(runtime_dir: Path, command: str, args: dict[str, Any],
            timeout: float = TIMEOUT) -> dict[str, Any]:
    """One admin round trip; raises AdminFailure with a sentence for the operator."""
    import zmq

    lock = runtime_dir / "sendguard.lock"
    if not _running(lock) or not (runtime_dir / "coord.sock").exists():
        raise AdminFailure("no cluster is running for this configuration "
                           f"(nothing in {runtime_dir})")
    endpoint = wire.coordinator_endpoint(runtime_dir)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(wire.encode(wire.AdminRequest(command, args)))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000)):
                raise AdminFailure(f"the cluster did not answer within {timeout:g} s "
                                   f"(coordinator at {endpoint})")
            reply = wire.decode(sock.recv())
            if isinstance(reply, wire.AdminReply):
                break
    finally:
        sock.close()
        context.term()
    if not reply.ok:
        raise AdminFailure(reply.error)
    return reply.data


def _running(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def usage(message: str) -> int:
    print(f"sendguard: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    command, payload, show = _request_of(args)
    if command is None:
        return usage(str(payload))
    return execute(args, command, payload, show)


def execute(args: argparse.Namespace, command: str, payload: dict[str, Any],
            show: Callable[[dict[str, Any]], str]) -> int:
    """Send one request to the cluster of ``args.config``; print a table or ``--json``."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        data = request(settings.cluster.runtime_dir, command, payload)
    except AdminFailure as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print(show(data))
    return EXIT_OK


def _request_of(args: argparse.Namespace) -> tuple[Any, Any, Callable[[dict[str, Any]], str]]:
    """(command, args, formatter), or (None, usage message, ...) for bad input."""
    if args.command == "status":
        return "status", {}, format_status
    if args.command == "scale":
        if args.workers < 1:
            return None, "scale: the number of workers must be 1 or more", str
        return "scale", {"workers": args.workers}, format_scale
    if args.kind == "ip":
        try:
            ipaddress.ip_address(args.subject)
        except ValueError:
            return None, f'inspect ip: "{args.subject}" is not an IP address', str
    elif "@" not in args.subject:
        return None, f'inspect account: "{args.subject}" is not an account like user@domain', str
    return "inspect", {"kind": args.kind, "subject": args.subject}, format_inspect


# -- tables ------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def format_status(data: dict[str, Any]) -> str:
    head = [
        f"supervisor pid {data.get('supervisor_pid') or '-'}, "
        f"coordinator pid {data.get('coordinator_pid')}, "
        f"{data.get('workers_target')} workers wanted",
        f"config version {data.get('config_version')} ({data.get('config_file')})",
        f"tenants {data.get('tenants_version')} ({data.get('tenants')} domains, "
        f"{data.get('accounts')} accounts), GeoIP {data.get('geoip_version') or 'off'}",
        f"ring epoch {data.get('ring_epoch')}: {', '.join(data.get('ring', [])) or 'empty'}",
        "",
    ]
    rows = [[w["name"], w["pid"], w["state"], w["phase"], w["sessions_open"], w["accepted"],
             w["snapshot_version"], w["ring_epoch"]] for w in data.get("workers", [])]
    return "\n".join(head) + table(
        ["WORKER", "PID", "STATE", "PHASE", "SESSIONS", "ACCEPTED", "CONFIG", "EPOCH"], rows)


def format_scale(data: dict[str, Any]) -> str:
    return f"scaling to {data['workers']} workers (was {data['previous']})"


def format_inspect(data: dict[str, Any]) -> str:
    rows = []
    for row in data.get("rows", []):
        rows.append([row["key"], row["series"], window_text(row["window"]), row["count"],
                     row.get("limit"), clears_text(row.get("clears_at"))])
    lines = []
    if "suspension" in data:
        lines.append(suspension_text(data.get("suspension")))
    if data.get("compromise"):
        lines.append(compromise_text(data["compromise"]))
    auth = data.get("auth_failures")
    if auth:
        state = "locked out of AUTH" if auth["locked"] else "not locked out"
        lines.append(f"AUTH failures: {auth['count']} of {auth['max']} in "
                     f"{window_text(auth['window'])}, {state}")
    bounce = data.get("bounce")
    if bounce:
        state = "MAIL refused" if bounce["refusing"] else "not refusing"
        lines.append(f"bounce ratio: {bounce['undeliverable']} undeliverable of "
                     f"{bounce['accepted']} accepted (refused over {bounce['max_ratio']:g} "
                     f"from {bounce['min_messages']} messages), {state}")
    if rows:
        lines += ["", table(["KEY", "SERIES", "WINDOW", "COUNT", "LIMIT", "CLEARS AT"], rows)]
    else:
        lines.append(f"no counts for {', '.join(data.get('keys', []))}")
    return "\n".join(lines).lstrip("\n")


def suspension_text(suspension: dict[str, Any] | None) -> str:
    if not suspension:
        return "not suspended"
    until = f" until {suspension['until']}" if suspension.get("until") else " until lifted"
    return (f"SUSPENDED{until}, by {suspension['by']} at {suspension['at']}: "
            f"{suspension['reason']}")


def compromise_text(evidence: dict[str, Any]) -> str:
    """What counts towards compromise detection now (SPEC §3.10)."""
    window = window_text(evidence["window"])
    countries = evidence.get("countries") or {}
    parts = []
    if evidence.get("countries_max"):
        seen = f" ({', '.join(countries)})" if countries else ""
        parts.append(f"logins from {len(countries)} of {evidence['countries_max']} "
                     f"countries{seen}")
    if evidence.get("spam_max"):
        parts.append(f"{evidence['spam_messages']} of {evidence['spam_max']} spam messages")
    return f"compromise evidence in {window}: {', '.join(parts) or 'not watched'}"


def clears_text(iso: str | None, now: float | None = None) -> str | None:
    """``2026-11-27T21:58:02Z (in 40 s)``: an ISO time and how far off it is."""
    if not iso:
        return None
    try:
        moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return iso
    wait = max(0, round(moment - (time.time() if now is None else now)))
    return f"{iso} (in {duration_text(wait)})"


def window_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def count_text(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def duration_text(seconds: float) -> str:
    """A short age like ``2h05m`` or ``40s``."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
