"""``sendguard queue list|flush|delete|purge|hold|release``: the workers' queues.

``purge``, ``hold`` and ``release`` are changes: they carry ``--by`` and are
recorded in the audit log (``tenant history``). A purge drops every queued
message of an account or a client address (``--bounce``: each sender gets
a delivery status notification first); a held message is not attempted
until released, across restarts too.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable
from typing import Any

from cluster.admin import count_text, duration_text, execute, table, usage
from cluster.admin_wire import QueueRequest
from cluster.support_cli import default_by, texts_problem

QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")  # SPEC §1
LISTED = 10  # a purge of more messages is summed up, not listed (--json lists them)


def add_parser(commands: Any, name: str,
               config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    queue = commands.add_parser("queue", help="list, retry, delete, purge or hold queued mail")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    config_arg(actions.add_parser("list", help="every queued message, on every worker"))
    config_arg(actions.add_parser("flush", help="attempt every waiting message now"))
    delete = actions.add_parser("delete", help="drop a message without a bounce")
    delete.add_argument("queue_id", metavar="ID", help="as in 250 ... queued as ID")
    config_arg(delete)
    purge = actions.add_parser("purge", help="drop every queued message of an account or address")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--account", metavar="USER")
    which.add_argument("--ip", metavar="ADDR", help="a client address (IPv6: its /64)")
    purge.add_argument("--bounce", action="store_true",
                       help="send each sender a delivery status notification")
    _change(purge)
    config_arg(purge)
    for action, about in (("hold", "keep messages from delivery until released"),
                          ("release", "deliver held messages now")):
        sub = actions.add_parser(action, help=about)
        sub.add_argument("ids", metavar="ID", nargs="*", help="queue ids")
        sub.add_argument("--account", metavar="USER", help="every message of this account")
        _change(sub)
        config_arg(sub)


def _change(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", help="why (kept in the history)")
    parser.add_argument("--by", default=default_by(), metavar="NAME",
                        help="who makes the change (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    action = args.action
    if action == "delete":
        if not QUEUE_ID_RE.fullmatch(args.queue_id):
            return usage(f'queue delete: "{args.queue_id}" is not a queue id')
        return execute(args, QueueRequest(action, queue_id=args.queue_id), format_queue)
    if action not in ("purge", "hold", "release"):
        return execute(args, QueueRequest(action), format_queue)
    problem = texts_problem(args)
    if problem is not None:
        return usage(f"queue {action}: {problem}")
    if action == "purge":
        if args.ip:
            try:
                ipaddress.ip_address(args.ip)
            except ValueError:
                return usage(f'queue purge: "{args.ip}" is not an IP address')
        message = QueueRequest(action, account=args.account, ip=args.ip, bounce=args.bounce,
                               by=args.by, reason=args.reason)
    else:
        if bool(args.ids) == bool(args.account):
            return usage(f"queue {action}: name queue ids or --account USER")
        bad = [i for i in args.ids if not QUEUE_ID_RE.fullmatch(i)]
        if bad:
            return usage(f'queue {action}: "{bad[0]}" is not a queue id')
        message = QueueRequest(action, ids=list(args.ids), account=args.account, by=args.by,
                               reason=args.reason)
    if message.account and "@" not in message.account:
        return usage(f'queue {action}: "{message.account}" is not an account')
    return execute(args, message, format_queue)


def format_queue(data: dict[str, Any]) -> str:
    lines = []
    action = data["action"]
    if action == "list":
        lines.append(_queue_table(data.get("messages", []), data.get("workers", [])))
    elif action == "flush":
        per_worker = ", ".join(f"{name}: {count}" for name, count
                               in data.get("per_worker", {}).items())
        lines.append(f"retrying {count_text(data['started'], 'message')} now ({per_worker})")
    elif action in ("purge", "hold", "release"):
        done = {"purge": "purged", "hold": "held", "release": "released"}[action]
        per_worker = ", ".join(f"{name}: {count}" for name, count
                               in data.get("per_worker", {}).items())
        bounced = " with a bounce to each sender" if data.get("bounce") else ""
        lines.append(f"{done} {count_text(data['touched'], 'message')}{bounced} ({per_worker})")
        touched = data.get("messages", [])
        if len(touched) <= LISTED:
            lines += [f"  {m['queue_id']} ({m['worker']})" for m in touched]
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
        elif m.get("state") == "held":
            next_try = "held"
        else:
            next_try = f"in {duration_text(m['next_try_in'])}" if m.get("next_try_in") else "now"
        recipients = ", ".join(f"{r['rcpt']} ({r['status']})" for r in m.get("recipients", []))
        rows.append([m["queue_id"], m["worker"], duration_text(m["age"]), m["attempts"],
                     next_try, f"<{m['sender']}>", recipients, m.get("last_error")])
    total = sum(m.get("size", 0) for m in messages)
    return table(["QUEUE ID", "WORKER", "AGE", "ATTEMPTS", "NEXT TRY", "SENDER",
                  "RECIPIENTS", "LAST ERROR"], rows) + \
        f"\n{count_text(len(messages), 'message')}, {count_text(total, 'byte')}"
