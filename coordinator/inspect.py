"""``sendguard inspect ip|account``: which counter keys a subject has, and their limits.

The counts come from the keys' owners (asked through a worker); the limits
come from the configuration and tenant directory in force here, because a
counter itself only knows the limit of the last decision that touched it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from cluster import keys
from cluster.names import BadDomain, client_key, normalise_address
from cluster.settings import COUNT_MESSAGES, COUNT_RECIPIENTS, Settings
from cluster.support_state import iso_utc
from cluster.tenants import TenantDirectory


class SubjectError(ValueError):
    pass


def subject_keys(kind: str, subject: str) -> list[str]:
    """The counter keys of an address (IPv6 by its /64) or of an account."""
    if kind == "ip":
        try:
            ipaddress.ip_address(subject)
        except ValueError:
            raise SubjectError(f"{subject!r} is not an IP address") from None
        client = client_key(subject)
        return [keys.ip_key(client), keys.auth_failure_key(client), keys.bounce_key(client),
                keys.spam_key(client)]
    if kind == "account":
        try:
            return [keys.account_key(normalise_address(subject))]
        except BadDomain:
            raise SubjectError(f"{subject!r} is not an account like user@domain") from None
    raise SubjectError(f"cannot inspect {kind!r}: ip or account")


def limit_for(key: str, series: str, window: float, settings: Settings,
              tenants: TenantDirectory) -> int | None:
    """The limit a decision would apply to this counter now; None for plain counts."""
    kind, _, subject = key.partition(":")
    if series in (keys.MESSAGES, keys.RECIPIENTS):
        limits = settings.limits
        if kind == "acct":
            account = tenants.account(subject)
            if account is not None:
                limits = tenants.limits(account, settings.limits)
        count = COUNT_RECIPIENTS if series == keys.RECIPIENTS else COUNT_MESSAGES
        return next((limit.max for limit in limits if limit.window == window
                     and limit.count == count and not limit.shadow), None)
    if series == keys.FAILURES and window == settings.auth.failure_window:
        return settings.auth.max_failures
    if series == keys.SPAM and window == settings.spam.window:
        return settings.spam.grace
    return None


def with_limits(rows_by_key: dict[str, list[dict[str, Any]]], settings: Settings,
                tenants: TenantDirectory) -> list[dict[str, Any]]:
    out = []
    for key, rows in rows_by_key.items():
        for row in rows:
            series, window = str(row.get("series", "")), float(row.get("window", 0.0))
            out.append({
                "key": key,
                "series": series,
                "window": window,
                "count": row.get("count", 0),
                "limit": limit_for(key, series, window, settings, tenants),
                "clears_at": _iso(row.get("clears_at")),
            })
    return out


def summary(kind: str, rows: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """What the rows of an address mean: is it locked out of AUTH, is its bounce ratio over?"""
    if kind != "ip":
        return {}

    def row(series: str, window: float) -> dict[str, Any]:
        return next((r for r in rows if r["series"] == series and r["window"] == window),
                    {"count": 0, "clears_at": None})

    auth = settings.auth
    failures = row(keys.FAILURES, auth.failure_window)
    bounce = settings.bounce
    accepted = int(row(keys.ACCEPTED, bounce.window)["count"])
    undeliverable = int(row(keys.UNDELIVERABLE, bounce.window)["count"])
    return {
        "auth_failures": {
            "count": failures["count"], "max": auth.max_failures,
            "window": auth.failure_window, "locked": failures["count"] >= auth.max_failures,
            "clears_at": failures["clears_at"]},
        "bounce": {
            "accepted": accepted, "undeliverable": undeliverable,
            "ratio": round(undeliverable / accepted, 3) if accepted else 0.0,
            "min_messages": bounce.min_messages, "max_ratio": bounce.max_ratio,
            "refusing": accepted >= bounce.min_messages
            and undeliverable > bounce.max_ratio * accepted},
    }


def _iso(value: Any) -> str | None:
    return iso_utc(float(value)) if isinstance(value, (int, float)) else None
