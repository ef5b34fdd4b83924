"""What a worker tells the coordinator about possible stolen passwords (SPEC §3.10).

A successful AUTH from a country and a spam-classified message are noted
here and sent to the coordinator, which keeps each account's evidence for
the whole cluster and suspends the account (:mod:`coordinator.compromise`).
Nothing on the SMTP path waits for it: a note is appended to a list, and
the list goes out as one ``Evidence`` message per short batch interval,
without an answer. A lost batch (the coordinator restarting) loses a few
notes; detection is a safety net, not an accounting record.

Logins repeat far more often than anything else (a busy client logs in per
message), so a login is sent again for the same account and country only
once per 1/60 of ``compromise.window``: the coordinator then knows when each
country was last seen to within the bucket width SPEC §3 allows for every
trailing window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from worker.client import Client
from worker.policies.geoip import client_country
from worker.snapshot import Snapshot

LOGIN = "login"
SPAM = "spam"
BATCH_INTERVAL = 0.05      # seconds a note may wait for others to share its message
MAX_PENDING = 10_000       # notes held while the coordinator is not taking them
REPEATS_KEPT = 100_000     # (account, country) pairs remembered for the repeat filter

Send = Callable[[list[list[Any]]], None]


class EvidenceNotes:
    def __init__(self, send: Send | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # None: no coordinator to tell (a worker running alone); notes are not kept.
        self.send = send
        self.clock = clock
        self._pending: list[list[Any]] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._last_sent: dict[tuple[str, str], float] = {}
        self.dropped = 0

    def login(self, snapshot: Snapshot, client: Client) -> None:
        """A successful AUTH. Trusted networks and unknown countries are not evidence."""
        settings = snapshot.settings.compromise
        if settings is None or not settings.countries or client.trusted or self.send is None:
            return
        account = client.account
        country = client_country(snapshot, client)
        if account is None or not country:
            return
        now = self.clock()
        pair = (account.user, country)
        last = self._last_sent.get(pair)
        if last is not None and now - last < settings.window / 60:
            return
        if len(self._last_sent) >= REPEATS_KEPT:
            self._last_sent.clear()  # costs a few repeated notes, never a missed one
        self._last_sent[pair] = now
        self._note([LOGIN, account.user, country, client.sid, now])

    def spam(self, snapshot: Snapshot, client: Client, queue_id: str) -> None:
        """A message classified as spam, accepted within the grace or refused for it."""
        settings = snapshot.settings.compromise
        if settings is None or not settings.spam_messages or self.send is None:
            return
        if client.account is None:
            return
        self._note([SPAM, client.account.user, queue_id, client.sid, self.clock()])

    def _note(self, note: list[Any]) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(note)
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(BATCH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()  # when called before its time (tests, shutdown)
            self._flush_at = None
        notes, self._pending = self._pending, []
        if notes and self.send is not None:
            self.send(notes)
