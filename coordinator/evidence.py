"""Each account's evidence of a stolen password, for the whole cluster (SPEC §3.10).

Workers send what they saw (:mod:`worker.evidence`): a successful login
from a country, a message classified as spam. The coordinator is one
process and applies the notes one at a time, so what it counts is exact
across the host's workers, as counters are; and it is where the suspension
is made, so a signal reaches its threshold and the suspension follows
without another hop. With the Redis backend the same evidence is kept in
Redis, added up across hosts (:mod:`coordinator.redis_evidence`, which
judges it with :func:`incident`); this book is then only what a host
notes while Redis cannot be reached.

Why not counters: "distinct countries in a window" is a set, not a count.
Kept in counters it would need a series per country and, at every login,
a second request to list the account's series; here it is a small map per
account, updated in memory by a message nobody waits for.

Per account: each country's last successful login (and its session), and
the last ``spam_messages`` spam notes (time, queue id, session); nothing
older than ``compromise.window`` counts. Accounts with nothing left in the
window are swept; at most ``max_accounts`` are kept (the least recently
noted go first). Like counters, this is abuse state in memory: a restart of
the coordinator forgets it.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from cluster.admin import window_text
from cluster.settings import CompromiseSettings
from cluster.support_state import iso_utc

LOGIN = "login"
SPAM = "spam"
MAX_ACCOUNTS = 500_000


@dataclass(frozen=True, slots=True)
class Incident:
    """A signal reached its threshold: what the suspension, audit and notification say."""

    account: str
    signal: str                      # "countries" | "spam"
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


class Evidence:
    __slots__ = ("countries", "spam", "touched")

    def __init__(self) -> None:
        self.countries: dict[str, tuple[float, str]] = {}   # country -> (last login, sid)
        self.spam: list[tuple[float, str, str]] = []         # (at, queue id, sid), oldest first
        self.touched = 0.0


class BadNote(ValueError):
    pass


class EvidenceBook:
    def __init__(self, max_accounts: int = MAX_ACCOUNTS) -> None:
        self.max_accounts = max_accounts
        # Insertion order is the order of the last note: the front is swept first.
        self._accounts: dict[str, Evidence] = {}

    def __len__(self) -> int:
        return len(self._accounts)

    def note(self, settings: CompromiseSettings, note: Any, now: float) -> Incident | None:
        """Apply one ``[kind, account, detail, sid, at]`` note; the incident it completes.

        Raises BadNote for a note that is not of that form."""
        kind, account, detail, sid, at = parsed(note)
        at = min(at, now)
        if at <= now - settings.window:
            return None  # arrived too late to count
        if kind == LOGIN and settings.countries:
            evidence = self._touch(account, now)
            seen = evidence.countries.get(detail)
            if seen is None or seen[0] <= at:
                evidence.countries[detail] = (at, sid)
            return self._countries(settings, account, evidence, now)
        if kind == SPAM and settings.spam_messages:
            evidence = self._touch(account, now)
            bisect.insort(evidence.spam, (at, detail, sid))
            del evidence.spam[:-settings.spam_messages]
            return self._spam(settings, account, evidence, now)
        return None

    def _countries(self, settings: CompromiseSettings, account: str, evidence: Evidence,
                   now: float) -> Incident | None:
        recent = {country: seen for country, seen in evidence.countries.items()
                  if seen[0] > now - settings.window}
        if len(recent) < settings.countries:
            return None
        names = sorted(recent)
        window = window_text(settings.window)
        return Incident(account, "countries",
                        f"compromise: logins from {len(names)} countries within {window}: "
                        f"{', '.join(names)}",
                        {"signal": "countries", "window": window, "countries": names,
                         "logins": {c: {"at": iso_utc(recent[c][0]), "sid": recent[c][1]}
                                    for c in names}})

    def _spam(self, settings: CompromiseSettings, account: str, evidence: Evidence,
              now: float) -> Incident | None:
        recent = [item for item in evidence.spam if item[0] > now - settings.window]
        if len(recent) < settings.spam_messages:
            return None
        window = window_text(settings.window)
        return Incident(account, "spam",
                        f"compromise: {len(recent)} spam messages within {window}",
                        {"signal": "spam", "window": window, "messages": len(recent),
                         "spam": [{"at": iso_utc(at), "queue_id": queue_id, "sid": sid}
                                  for at, queue_id, sid in recent]})

    def evidence(self, settings: CompromiseSettings, account: str,
                 now: float) -> dict[str, Any]:
        """What counts now, for ``inspect account``."""
        return view(settings, self._accounts.get(account), now)

    def forget(self, account: str) -> bool:
        """Support lifted a suspension or reset the account: start again from nothing."""
        return self._accounts.pop(account, None) is not None

    def sweep(self, settings: CompromiseSettings | None, now: float) -> int:
        """Drop accounts with nothing in the window (everything when detection is off)."""
        if settings is None:
            dropped = len(self._accounts)
            self._accounts.clear()
            return dropped
        stale = []
        for account, evidence in self._accounts.items():
            if evidence.touched > now - settings.window:
                break  # the rest were noted later still
            stale.append(account)
        for account in stale:
            del self._accounts[account]
        return len(stale)

    def _touch(self, account: str, now: float) -> Evidence:
        evidence = self._accounts.pop(account, None)
        if evidence is None:
            evidence = Evidence()
            while len(self._accounts) >= self.max_accounts:
                del self._accounts[next(iter(self._accounts))]
        evidence.touched = now
        self._accounts[account] = evidence
        return evidence


def parsed(note: Any) -> tuple[str, str, str, str, float]:
    """``[kind, account, detail, sid, at]``; BadNote when it is not of that form."""
    if not isinstance(note, (list, tuple)) or len(note) != 5:
        raise BadNote(f"a note is [kind, account, detail, sid, at], got {note!r}")
    kind, account, detail, sid, at = note
    if kind not in (LOGIN, SPAM):
        raise BadNote(f"unknown kind of note {kind!r}")
    if not all(isinstance(v, str) for v in (account, detail, sid)) or not account:
        raise BadNote(f"account, detail and sid must be strings, got {note!r}")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise BadNote(f"at must be a time in seconds, got {at!r}")
    return kind, account, detail, sid, float(at)


def view(settings: CompromiseSettings, evidence: Evidence | None,
         now: float) -> dict[str, Any]:
    """What counts now of one account's evidence, for ``inspect account``."""
    since = now - settings.window
    countries = {} if evidence is None else {
        country: iso_utc(seen[0]) for country, seen in sorted(evidence.countries.items())
        if seen[0] > since}
    spam = 0 if evidence is None else sum(1 for item in evidence.spam if item[0] > since)
    return {"window": settings.window, "countries": countries,
            "countries_max": settings.countries, "spam_messages": spam,
            "spam_max": settings.spam_messages}


def incident(settings: CompromiseSettings, account: str, evidence: Evidence, now: float,
             kind: str = LOGIN) -> Incident | None:
    """The incident ``evidence`` makes now, if any: the signal of ``kind`` first."""
    book = EvidenceBook(1)
    judges = [(settings.countries, book._countries), (settings.spam_messages, book._spam)]
    if kind != LOGIN:
        judges.reverse()
    for threshold, judge in judges:
        found = judge(settings, account, evidence, now) if threshold else None
        if found is not None:
            return found
    return None
