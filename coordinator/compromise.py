"""Automatic suspension of compromised accounts (SPEC §3.10), in the coordinator.

Workers' notes go into the :class:`~coordinator.evidence.EvidenceBook`;
a note that brings a signal to its threshold makes an incident, and the
incident a suspension through the support desk (``by = "auto"``, for
``compromise.suspend_for``, the reason naming the signal and its evidence,
the evidence itself in the audit entry). The suspension reaches the
workers with the next snapshot, like one made by support. Then, when
``compromise.notify_url`` is set, one JSON object is POSTed there
(:mod:`coordinator.webhook`).

One incident, one suspension: while the account is suspended (by anyone)
no other is made and nothing is sent. The evidence is kept, so when an
automatic suspension lapses and the signals continue (the countries are
still in the window, more spam arrives), the next note suspends it again.
When support lifts a suspension or resets the account's counters, the
evidence is forgotten: they have dealt with it.

With the Redis backend the evidence is kept in Redis
(:mod:`coordinator.redis_evidence`), added up across hosts; while Redis
cannot be reached, notes go into this host's book instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from cluster.logjson import log_event
from cluster.settings import CompromiseSettings
from cluster.support_state import iso_utc
from coordinator.errors import AdminError
from coordinator.evidence import BadNote, EvidenceBook, Incident
from coordinator.metrics import MetricsBook
from coordinator.redis_evidence import SharedEvidence
from coordinator.sources import SnapshotSources
from coordinator.state_store import StoreUnavailable
from coordinator.support import SupportDesk
from coordinator.webhook import Notifier

SWEEP_EVERY = 60.0


class CompromiseWatch:
    def __init__(self, desk: SupportDesk, sources: SnapshotSources, metrics: MetricsBook,
                 notifier: Notifier | None = None, clock: Callable[[], float] = time.time,
                 book: EvidenceBook | None = None,
                 shared: SharedEvidence | None = None) -> None:
        self.desk = desk
        self.sources = sources
        self.metrics = metrics
        self.notifier = notifier or Notifier(metrics.count_notification)
        self.clock = clock
        self.book = book or EvidenceBook()
        self.shared = shared
        self._shared_failed = False
        # Accounts whose suspension is being made: further incidents wait for its outcome.
        self._suspending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept = 0.0

    @property
    def settings(self) -> CompromiseSettings | None:
        return self.sources.settings.compromise

    def receive(self, worker: str, notes: Any) -> None:
        """One worker's ``Evidence`` message: apply its notes, act on what they complete."""
        settings = self.settings
        if settings is None or not isinstance(notes, list):
            return
        now = self.clock()
        if self.shared is not None:
            self._start(self._receive_shared(worker, settings, notes, now))
            return
        for note in notes:
            try:
                incident = self.book.note(settings, note, now)
            except BadNote as exc:
                log_event("bad_evidence", logging.WARNING, worker=worker, error=str(exc))
                continue
            self._act(settings, incident)

    async def _receive_shared(self, worker: str, settings: CompromiseSettings,
                              notes: list[Any], now: float) -> None:
        assert self.shared is not None
        for note in notes:
            try:
                incident = await self.shared.note(settings, note, now)
            except BadNote as exc:
                log_event("bad_evidence", logging.WARNING, worker=worker, error=str(exc))
                continue
            except StoreUnavailable as exc:
                if not self._shared_failed:
                    log_event("compromise_evidence_local", logging.WARNING, error=str(exc),
                              note="evidence kept on this host until Redis answers")
                self._shared_failed = True
                incident = self.book.note(settings, note, now)
            else:
                self._shared_failed = False
            self._act(settings, incident)

    def _act(self, settings: CompromiseSettings, incident: Incident | None) -> None:
        if incident is not None and incident.account not in self._suspending:
            self._suspending.add(incident.account)
            self._start(self._suspend(settings, incident))

    def _start(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _suspend(self, settings: CompromiseSettings, incident: Incident) -> None:
        try:
            item = await self.desk.suspend_automatically(
                incident.account, incident.reason, settings.suspend_for, incident.evidence)
        except AdminError as exc:
            log_event("auto_suspend_failed", logging.ERROR, account=incident.account,
                      reason=incident.reason, error=str(exc))
            return
        finally:
            self._suspending.discard(incident.account)
            if self.shared is not None:
                with contextlib.suppress(StoreUnavailable):
                    await self.shared.unclaim(incident.account)
        if item is None:
            return
        self.metrics.count_suspension(incident.signal)
        if settings.notify_url:
            self.notifier.notify(settings.notify_url, {
                "event": "account_suspended",
                "account": item.account,
                "reason": item.reason,
                "until": iso_utc(item.until),
                "ts": iso_utc(item.at),
                "by": item.by,
                "signal": incident.signal,
                "evidence": incident.evidence,
                "hostname": self.sources.settings.server.hostname,
            })

    def forget(self, account: str) -> None:
        """This host's evidence of ``account`` goes (another host lifted its suspension
        and cleared what Redis holds itself)."""
        if self.book.forget(account):
            log_event("compromise_evidence_forgotten", account=account)

    async def forget_everywhere(self, account: str) -> None:
        """Support dealt with the account: its evidence goes here and, with the Redis
        backend, for every host, before the command answers."""
        self.forget(account)
        if self.shared is None:
            return
        try:
            if await self.shared.forget(account):
                log_event("compromise_evidence_forgotten", account=account, shared=True)
        except StoreUnavailable as exc:
            log_event("compromise_forget_failed", logging.ERROR, account=account,
                      error=str(exc))

    async def evidence_of(self, account: str) -> dict[str, Any] | None:
        """``inspect account``: what counts towards each signal now (None: detection off)."""
        settings = self.settings
        if settings is None:
            return None
        if self.shared is not None:
            with contextlib.suppress(StoreUnavailable):
                return await self.shared.evidence(settings, account, self.clock())
        return self.book.evidence(settings, account, self.clock())

    def tick(self) -> None:
        now = self.clock()
        if now - self._swept >= SWEEP_EVERY or self.settings is None:
            self._swept = now
            self.book.sweep(self.settings, now)
        self.metrics.set_watched(len(self.book))

    async def close(self) -> None:
        # A suspension being made is finished (a few file writes), not cut in half.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        await self.notifier.close()
        if self.shared is not None:
            await self.shared.close()
