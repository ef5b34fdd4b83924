"""``sendguard status | scale N | tenant ... | inspect ip|account | queue list|flush|delete ID``.

Each command finds the running cluster through ``-c CONFIG`` (its runtime
folder), sends one ``AdminRequest`` to the coordinator's socket and prints
the ``AdminReply``: a table for people, ``--json`` for scripts.
Exit status: 0 done, 1 failed (also: no cluster running; ``queue delete``
of an id no worker holds), 2 bad usage.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import wire
from cluster.settings import is_country_code, load_settings
from cluster.validate import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
TIMEOUT = 10.0
QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")  # SPEC §1


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
    elif name == "tenant":
        tenant = commands.add_parser("tenant", help="change the tenant directory live")
        actions = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
        for action, verb in (("allow-country", "allow"), ("disallow-country", "refuse")):
            sub = actions.add_parser(action, help=f"{verb} a country for a domain")
            sub.add_argument("domain")
            sub.add_argument("country", metavar="CC", help='two-letter code, e.g. "DE"')
            config_arg(sub)
    elif name == "inspect":
        inspect = commands.add_parser("inspect", help="show the counters of an address or account")
        kinds = inspect.add_subparsers(dest="kind", required=True, metavar="KIND")
        for kind, what, about in (("ip", "ADDR", "a client address (IPv6: its /64)"),
                                  ("account", "USER", "an account, user@domain")):
            sub = kinds.add_parser(kind, help=about)
            sub.add_argument("subject", metavar=what)
            config_arg(sub)
    elif name == "queue":
        queue = commands.add_parser("queue", help="list, retry or delete queued messages")
        actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
        config_arg(actions.add_parser("list", help="every queued message, on every worker"))
        config_arg(actions.add_parser("flush", help="attempt every waiting message now"))
        delete = actions.add_parser("delete", help="drop a message without a bounce")
        delete.add_argument("queue_id", metavar="ID", help="as in 250 ... queued as ID")
        config_arg(delete)

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


def _usage(message: str) -> int:
    print(f"sendguard: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    command, payload, show = _request_of(args)
    if command is None:
        return _usage(str(payload))
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
        print(json.dumps(data, indent=2, sort_keys=True))
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
    if args.command == "queue":
        payload = {"action": args.action}
        if args.action == "delete":
            if not QUEUE_ID_RE.fullmatch(args.queue_id):
                return None, f'queue delete: "{args.queue_id}" is not a queue id', str
            payload["queue_id"] = args.queue_id
        return "queue", payload, format_queue
    if args.command == "tenant":
        if not is_country_code(args.country):
            return None, f'tenant: "{args.country}" is not a two-letter country code', str
        return args.action, {"domain": args.domain, "country": args.country.upper()}, \
            format_tenant
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


def format_tenant(data: dict[str, Any]) -> str:
    countries = ", ".join(data["countries"]) or "none"
    if not data["changed"]:
        return f"{data['domain']}: unchanged, countries {countries}"
    return (f"{data['domain']}: countries now {countries} "
            f"(tenants version {data['tenants_version']}, config version "
            f"{data['config_version']})")


def format_inspect(data: dict[str, Any]) -> str:
    rows = []
    now = time.time()
    for row in data.get("rows", []):
        clears = row.get("clears_at")
        when = None
        if clears is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(clears))
            when = f"{stamp} (in {max(0, round(clears - now))} s)"
        rows.append([row["key"], row["series"], _window(row["window"]), row["count"],
                     row.get("limit"), when])
    if not rows:
        return f"no counts for {', '.join(data.get('keys', []))}"
    return table(["KEY", "SERIES", "WINDOW", "COUNT", "LIMIT", "CLEARS AT"], rows)


def _window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_queue(data: dict[str, Any]) -> str:
    lines = []
    if data["action"] == "list":
        lines.append(_queue_table(data.get("messages", []), data.get("workers", [])))
    elif data["action"] == "flush":
        per_worker = ", ".join(f"{name}: {count}" for name, count
                               in data.get("per_worker", {}).items())
        lines.append(f"retrying {_count(data['started'], 'message')} now ({per_worker})")
    else:
        lines.append(f"deleted {data['queue_id']} (queued on {data['worker']})")
    for name, why in sorted(data.get("unanswered", {}).items()):
        lines.append(f"warning: {name} did not answer ({why}); its queue is not included")
    return "\n".join(lines)


def _queue_table(messages: list[dict[str, Any]], workers: list[str]) -> str:
    if not messages:
        return f"the queue is empty (workers {', '.join(workers) or 'none'})"
    rows = []
    for m in messages:
        if m.get("state") == "active":
            next_try = "now (in progress)"
        else:
            next_try = f"in {_duration(m['next_try_in'])}" if m.get("next_try_in") else "now"
        recipients = ", ".join(f"{r['rcpt']} ({r['status']})" for r in m.get("recipients", []))
        rows.append([m["queue_id"], m["worker"], _duration(m["age"]), m["attempts"], next_try,
                     f"<{m['sender']}>", recipients, m.get("last_error")])
    total = sum(m.get("size", 0) for m in messages)
    return table(["QUEUE ID", "WORKER", "AGE", "ATTEMPTS", "NEXT TRY", "SENDER",
                  "RECIPIENTS", "LAST ERROR"], rows) + \
        f"\n{_count(len(messages), 'message')}, {_count(total, 'byte')}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
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
