"""What support staff changed live: suspended accounts, time-limited countries, the audit trail.

The coordinator keeps this state (:mod:`coordinator.state_store`) and ships
the part the policies need, suspensions and country exceptions, inside
every configuration snapshot, so a worker's MAIL check reads it from memory.
An entry with an ``until`` stops counting at that moment on every worker,
whether or not the coordinator has published its removal yet.

Wire and file form: plain dicts of str, float and None (``to_wire`` /
``from_wire``); ``from_wire`` checks what it is given.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

# A reason or a name longer than this is a paste gone wrong.
MAX_TEXT = 500


def text_problem(value: str, name: str) -> str | None:
    """Why ``value`` cannot be the ``name`` (reason, by) of a change, or None."""
    if not value.isprintable() or len(value) > MAX_TEXT:
        return f"{name} must be one line of at most {MAX_TEXT} characters"
    return None


@dataclass(frozen=True, slots=True)
class Suspension:
    account: str
    reason: str
    by: str
    at: float
    until: float | None = None  # None: until someone lifts it

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_wire(self) -> dict[str, Any]:
        return {"account": self.account, "reason": self.reason, "by": self.by, "at": self.at,
                "until": self.until}

    @classmethod
    def from_wire(cls, data: Any) -> Suspension:
        _expect(data, ("account", "reason", "by"), "suspension")
        return cls(data["account"], data["reason"], data["by"], _time(data.get("at")),
                   _maybe_time(data.get("until")))


@dataclass(frozen=True, slots=True)
class CountryException:
    """A country a domain may send from until ``until``, on top of its ``countries``."""

    domain: str
    country: str
    reason: str
    by: str
    at: float
    until: float

    def active(self, now: float) -> bool:
        return now < self.until

    def to_wire(self) -> dict[str, Any]:
        return {"domain": self.domain, "country": self.country, "reason": self.reason,
                "by": self.by, "at": self.at, "until": self.until}

    @classmethod
    def from_wire(cls, data: Any) -> CountryException:
        _expect(data, ("domain", "country", "reason", "by"), "country exception")
        return cls(data["domain"], data["country"], data["reason"], data["by"],
                   _time(data.get("at")), _time(data.get("until")))


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SupportState:
    """Immutable: a change makes a new one (swapped by reference, like the snapshot)."""

    suspensions: Mapping[str, Suspension] = field(default_factory=lambda: _EMPTY)
    # domain (A-label) -> country code -> exception
    exceptions: Mapping[str, Mapping[str, CountryException]] = field(
        default_factory=lambda: _EMPTY)

    def suspension(self, account: str, now: float) -> Suspension | None:
        found = self.suspensions.get(account)
        return found if found is not None and found.active(now) else None

    def extra_countries(self, domain: str, now: float) -> frozenset[str]:
        granted = self.exceptions.get(domain)
        if not granted:
            return frozenset()
        return frozenset(code for code, item in granted.items() if item.active(now))

    def lapsed(self, now: float) -> tuple[list[Suspension], list[CountryException]]:
        """Entries whose ``until`` has passed: the coordinator removes them."""
        return ([s for s in self.suspensions.values() if not s.active(now)],
                [e for per in self.exceptions.values() for e in per.values()
                 if not e.active(now)])

    def with_suspension(self, item: Suspension) -> SupportState:
        return SupportState({**self.suspensions, item.account: item}, self.exceptions)

    def without_suspension(self, account: str) -> SupportState:
        rest = {k: v for k, v in self.suspensions.items() if k != account}
        return SupportState(rest, self.exceptions)

    def with_exception(self, item: CountryException) -> SupportState:
        per = {**self.exceptions.get(item.domain, {}), item.country: item}
        return SupportState(self.suspensions, {**self.exceptions, item.domain: per})

    def without_exception(self, domain: str, country: str) -> SupportState:
        per = {k: v for k, v in self.exceptions.get(domain, {}).items() if k != country}
        rest = {k: v for k, v in self.exceptions.items() if k != domain}
        if per:
            rest[domain] = per
        return SupportState(self.suspensions, rest)

    def to_wire(self) -> dict[str, Any]:
        return {"suspensions": [s.to_wire() for s in self.suspensions.values()],
                "exceptions": [e.to_wire() for per in self.exceptions.values()
                               for e in per.values()]}

    @classmethod
    def from_wire(cls, data: Any) -> SupportState:
        if not isinstance(data, dict):
            raise ValueError("support state must be a map")
        state = cls()
        for item in _list(data.get("suspensions", []), "suspensions"):
            state = state.with_suspension(Suspension.from_wire(item))
        for item in _list(data.get("exceptions", []), "exceptions"):
            state = state.with_exception(CountryException.from_wire(item))
        return state


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change made by a person (or by sendguard itself: a lapse, an automatic suspension).

    ``action``: suspend, unsuspend, suspension-lapsed, allow-country,
    disallow-country, exception-lapsed, counters-reset, queue-purge,
    queue-hold, queue-release. ``subject`` is what it was done to (an
    account, a domain, an address); ``domain`` is the tenant it concerns,
    for ``tenant history`` ("" for an address).
    """

    ts: float
    by: str
    action: str
    subject: str
    domain: str
    reason: str = ""
    until: float | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def to_wire(self) -> dict[str, Any]:
        return {"ts": self.ts, "by": self.by, "action": self.action, "subject": self.subject,
                "domain": self.domain, "reason": self.reason, "until": self.until,
                "details": dict(self.details)}

    @classmethod
    def from_wire(cls, data: Any) -> AuditEntry:
        _expect(data, ("by", "action", "subject", "domain"), "audit entry")
        details = data.get("details") or {}
        if not isinstance(details, dict):
            raise ValueError("audit entry: details must be a map")
        return cls(_time(data.get("ts")), data["by"], data["action"], data["subject"],
                   data["domain"], str(data.get("reason") or ""),
                   _maybe_time(data.get("until")), details)


def _expect(data: Any, names: tuple[str, ...], what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a map, got {data!r}")
    for name in names:
        if not isinstance(data.get(name), str):
            raise ValueError(f"{what}: {name} must be a string, got {data.get(name)!r}")


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"a time must be a number of seconds, got {value!r}")
    return float(value)


def _maybe_time(value: Any) -> float | None:
    return None if value is None else _time(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    return value


def iso_utc(ts: float | None) -> str | None:
    """``2026-11-27T21:58:02Z`` (milliseconds when there are any); None stays None."""
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    if moment.microsecond // 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# The coordinator's file store (coordinator/state_store.py) keeps each table as
# {"version": 1, "items": [...]} under cluster.state_dir; check-config reads them too.
TABLE_VERSION = 1
SUSPENSIONS_FILE = "suspensions.json"
EXCEPTIONS_FILE = "country-exceptions.json"
T = TypeVar("T")


class TableError(ValueError):
    """A state table that cannot be used; str() names the file and what is wrong."""


def read_table(path: Path, parse: Callable[[Any], T]) -> list[T]:
    """The items of one table ([] when there is no file yet); raises TableError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TableError(f"{path}: cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise TableError(f"{path}: is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        raise TableError(f"{path}: is not a sendguard state file of version {TABLE_VERSION}")
    items = data.get("items")
    if not isinstance(items, list):
        raise TableError(f"{path}: items must be a list")
    try:
        return [parse(item) for item in items]
    except ValueError as exc:
        raise TableError(f"{path}: {exc}") from None
