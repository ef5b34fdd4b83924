"""Support commands: ``why``, ``account suspend|unsuspend``, ``counters reset``, ``tenant ...``.

Each is one admin request to the coordinator (:func:`cluster.admin.execute`);
every change carries ``--by`` (default: the person's login name, the one
behind ``sudo`` when there is one) and is recorded in the audit log that
``tenant history`` reads back. Exit status as every admin command: 0 done,
1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

from cluster.admin import clears_text, execute, suspension_text, table, usage
from cluster.admin_wire import (
    AdminRequestMessage,
    AllowCountryRequest,
    DisallowCountryRequest,
    HistoryRequest,
    ResetCountersRequest,
    SuspendRequest,
    UnsuspendRequest,
    WhyRequest,
)
from cluster.settings import is_country_code
from cluster.support_state import text_problem
from cluster.validate import parse_duration

SESSION_ID_RE = re.compile(r"[A-Za-z0-9]{22}")  # SPEC §1

ConfigArg = Callable[[argparse.ArgumentParser], None]
Formatter = Callable[[dict[str, Any]], str]


def add_parser(commands: Any, name: str, config_arg: ConfigArg) -> None:
    if name == "why":
        why = commands.add_parser("why", help="every decision of one SMTP session")
        why.add_argument("sid", metavar="SID", help="the session id of the reply or banner")
        config_arg(why)
    elif name == "account":
        account = commands.add_parser("account", help="suspend or unsuspend an account")
        actions = account.add_subparsers(dest="action", required=True, metavar="ACTION")
        suspend = actions.add_parser("suspend", help="refuse the account's mail at MAIL")
        suspend.add_argument("user", metavar="USER")
        suspend.add_argument("--reason", required=True, help="why (shown in why and history)")
        suspend.add_argument("--for", dest="lasting", metavar="DURATION",
                             help='lapses by itself after this long, e.g. "12h" or "7d"')
        _by(suspend)
        config_arg(suspend)
        unsuspend = actions.add_parser("unsuspend", help="lift a suspension")
        unsuspend.add_argument("user", metavar="USER")
        unsuspend.add_argument("--reason", default="", help="why (kept in the history)")
        _by(unsuspend)
        config_arg(unsuspend)
    elif name == "counters":
        counters = commands.add_parser("counters", help="reset the counters of a key")
        actions = counters.add_subparsers(dest="action", required=True, metavar="ACTION")
        reset = actions.add_parser("reset", help="clear every counter of an address or account")
        kinds = reset.add_subparsers(dest="kind", required=True, metavar="KIND")
        for kind, what in (("ip", "ADDR"), ("account", "USER")):
            sub = kinds.add_parser(kind, help=f"the counters of {what}")
            sub.add_argument("subject", metavar=what)
            sub.add_argument("--reason", default="", help="why (kept in the history)")
            _by(sub)
            config_arg(sub)
    elif name == "tenant":
        tenant = commands.add_parser("tenant", help="a tenant's countries and history")
        actions = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")
        allow = actions.add_parser("allow-country", help="allow a country for a domain")
        disallow = actions.add_parser("disallow-country",
                                      help="refuse a country (and end its exception)")
        for sub in (allow, disallow):
            sub.add_argument("domain")
            sub.add_argument("country", metavar="CC", help='two-letter code, e.g. "DE"')
            sub.add_argument("--reason", default="", help="why (kept in the history)")
            _by(sub)
            config_arg(sub)
        allow.add_argument("--for", dest="lasting", metavar="DURATION",
                           help='an exception that lapses by itself, e.g. "7d"')
        history = actions.add_parser("history", help="every change of a domain, oldest first")
        history.add_argument("domain")
        config_arg(history)


def _by(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--by", default=default_by(), metavar="NAME",
                        help="who makes the change (default: %(default)s)")


def default_by() -> str:
    """The person at the terminal: the one behind sudo when there is one."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def run(args: argparse.Namespace) -> int:
    try:
        check_texts(args)
        message, show = _request_of(args)
    except _Usage as exc:
        return usage(str(exc))
    return execute(args, message, show)


class _Usage(Exception):
    pass


def texts_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a change's ``--reason`` or ``--by`` (the coordinator would refuse
    them too, but as a failure, status 1, not as bad usage), or None."""
    if getattr(args, "by", None) is not None and not args.by.strip():
        return "--by must name who makes the change"
    for name in ("reason", "by"):
        value = getattr(args, name, None)
        problem = text_problem(value, f"--{name}") if value is not None else None
        if problem is not None:
            return problem
    return None


def check_texts(args: argparse.Namespace) -> None:
    problem = texts_problem(args)
    if problem is not None:
        raise _Usage(problem)


def _request_of(args: argparse.Namespace) -> tuple[AdminRequestMessage, Formatter]:
    if args.command == "why":
        if not SESSION_ID_RE.fullmatch(args.sid):
            raise _Usage(f'why: "{args.sid}" is not a session id (22 letters and digits)')
        return WhyRequest(args.sid), format_why
    if args.command == "account":
        _account(args.user)
        if args.action == "suspend":
            if not args.reason.strip():
                raise _Usage("account suspend: --reason must say why")
            return SuspendRequest(args.user, args.by, reason=args.reason,
                                  lasting=_duration(getattr(args, "lasting", None))), \
                format_suspension
        return UnsuspendRequest(args.user, args.by, reason=args.reason), format_suspension
    if args.command == "counters":
        if args.kind == "ip":
            _address(args.subject)
        else:
            _account(args.subject)
        return ResetCountersRequest(args.kind, args.subject, args.by, args.reason), format_reset
    if args.action == "history":
        return HistoryRequest(args.domain), format_history
    if not is_country_code(args.country):
        raise _Usage(f'tenant: "{args.country}" is not a two-letter country code')
    lasting = _duration(args.lasting) if getattr(args, "lasting", None) else None
    change = AllowCountryRequest if args.action == "allow-country" else DisallowCountryRequest
    return change(args.domain, args.country.upper(), args.by, reason=args.reason,
                  lasting=lasting), format_tenant


def _account(text: str) -> None:
    if "@" not in text:
        raise _Usage(f'"{text}" is not an account like user@domain')


def _address(text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise _Usage(f'"{text}" is not an IP address') from None


def _duration(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise _Usage(f'--for: "{text}" is not a duration like "30m", "12h" or "7d"')
    return text


# -- tables ----------------------------------------------------------------------------

WHY_COLUMNS = ("ts", "stage", "policy", "verdict", "reply", "detail")


def format_why(data: dict[str, Any]) -> str:
    decisions = data.get("decisions", [])
    first = decisions[0] if decisions else {}
    accounts = sorted({d["account"] for d in decisions if d.get("account")})
    head = (f"session {data['sid']}: client {first.get('client_ip', '-')} "
            f"({first.get('country') or 'country unknown'}), "
            f"account {', '.join(accounts) or 'none'}, worker {first.get('worker', '-')}")
    rows = [[d.get(name) for name in WHY_COLUMNS] for d in decisions]
    lines = [head, "", table(["TIME", "STAGE", "POLICY", "VERDICT", "REPLY", "DETAIL"], rows)]
    for d in decisions:
        if d.get("key"):
            # A shadow limit logs where it would have refused; the message went on.
            what = "shadow limit (not refused)" if d.get("verdict") == "shadow" else "refusal"
            lines.append(f"{d['stage']} {what}: {d['key']} has {d['count']} of {d['max']} "
                         f"in {d['window']}; room again at "
                         f"{clears_text(d.get('clears_at')) or 'unknown'}")
    for name, why in sorted(data.get("unanswered", {}).items()):
        lines.append(f"warning: {name} did not answer ({why})")
    return "\n".join(lines)


def format_suspension(data: dict[str, Any]) -> str:
    if data.get("suspended"):
        return f"{data['account']}: {suspension_text(data)}"
    if not data.get("changed"):
        return f"{data['account']}: was not suspended"
    return f"{data['account']}: suspension lifted"


def format_reset(data: dict[str, Any]) -> str:
    return (f"reset {data['cleared']} counters of {', '.join(data['keys'])} "
            f"(on {', '.join(data.get('owners', [])) or 'no owner'})")


def format_tenant(data: dict[str, Any]) -> str:
    countries = ", ".join(data["countries"]) or "none"
    lines = []
    granted = data.get("granted")
    if data.get("note"):
        lines.append(f"{data['domain']}: unchanged: {data['note']}")
    elif granted:
        lines.append(f"{data['domain']}: {granted['country']} allowed until "
                     f"{granted['until']}, countries for good {countries}")
    elif not data["changed"]:
        lines.append(f"{data['domain']}: unchanged, countries {countries}")
    else:
        lines.append(f"{data['domain']}: countries now {countries} "
                     f"(tenants version {data['tenants_version']}, config version "
                     f"{data['config_version']})")
    for grant in data.get("exceptions", []):
        lines.append(f"  and {grant['country']} until {grant['until']} (by {grant['by']}"
                     + (f": {grant['reason']}" if grant.get("reason") else "") + ")")
    return "\n".join(lines)


def format_history(data: dict[str, Any]) -> str:
    entries = data.get("entries", [])
    if not entries:
        return f"{data['domain']}: no changes recorded"
    rows = [[e["ts"], e["by"], e["action"], e["subject"], _what(e), e.get("until"),
             e.get("reason") or None] for e in entries]
    return table(["WHEN", "BY", "ACTION", "SUBJECT", "WHAT", "UNTIL", "REASON"], rows)


def _what(entry: dict[str, Any]) -> str | None:
    details = entry.get("details") or {}
    if details.get("signal") == "countries":
        return "countries " + ", ".join(details.get("countries", []))
    if details.get("signal") == "spam":
        return f"{details.get('messages')} spam messages"
    if "country" in details:
        return str(details["country"])
    if "messages" in details:
        bounce = ", bounced" if details.get("bounce") else ""
        return f"{details['messages']} messages{bounce}"
    if "counters" in details:
        return f"{details['counters']} counters"
    return None
