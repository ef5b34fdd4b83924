"""The queue manager of one worker's spool (SPEC §4).

Every queued record is an entry here, either waiting for its next attempt
(a timer) or active. An attempt groups the recipients still to be done by
destination (recipient domain, or the smarthost) and hands each group to
the :class:`~worker.delivery.sessions.SessionPool`. When every group has a
result the attempt is settled, in an order that loses nothing in a crash:

1. the bounce-ratio mark (:mod:`worker.delivery.feedback`);
2. the DSN for recipients that failed for good, stored in the spool;
3. the record itself: removed when every recipient is final, otherwise
   rewritten with its attempts, next attempt and errors.

A crash between steps repeats earlier ones at the next start (a DSN or a
mark twice), never skips one. Deferred recipients are retried after
``delivery.retry[min(k, len - 1)]`` for the k-th failed attempt (from 0),
but never later than ``delivery.max_queue_time`` after arrival: that last
attempt is the final one, and what is still deferred after it bounces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from cluster.logjson import log_event
from cluster.names import BadDomain, client_key, split_address
from cluster.settings import Settings
from worker.counters.client import CounterClient
from worker.delivery.dsn import bounce_record
from worker.delivery.feedback import BounceFeedback
from worker.delivery.result import BOUNCED, DEFERRED, DELIVERED, Result, duration_text, local
from worker.delivery.route import Router
from worker.delivery.sessions import Job, SessionPool
from worker.dns import DomainResolver
from worker.spool import BaseSpool, SpoolError, SpoolRecord

SMARTHOST = "[smarthost]"
# Postfix's smtp_destination_recipient_limit: servers commonly refuse more
# recipients than this in one transaction.
RECIPIENTS_PER_TRANSACTION = 50
PURGED = "message cancelled by the postmaster"
# A timer may fire a hair before the wall clock reaches its due time.
_SLACK = 0.05


@dataclass(eq=False, slots=True)
class _Entry:
    record: SpoolRecord
    timer: asyncio.TimerHandle | None = None
    active: bool = False
    outstanding: int = 0
    results: dict[int, Result] = field(default_factory=dict)
    deleted: bool = False


class DeliveryAgent:
    """Delivers what one worker's spool holds; see the module docstring."""

    def __init__(
        self,
        spool: BaseSpool,
        settings: Callable[[], Settings],
        counters: CounterClient,
        resolver: DomainResolver | None,
        *,
        is_trusted: Callable[[str], bool] | None = None,
        per_destination: int = 4,
        max_connections: int = 32,
        messages_per_connection: int = 100,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        idle_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self._settings = settings
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.feedback = BounceFeedback(counters, lambda: settings().bounce.window,
                                       is_trusted or self._trusted_by_settings)
        self.pool = SessionPool(settings, Router(resolver), self._job_done,
                                per_destination=per_destination, max_connections=max_connections,
                                messages_per_connection=messages_per_connection,
                                connect_timeout=connect_timeout, command_timeout=command_timeout,
                                idle_timeout=idle_timeout)
        self.stats = {DELIVERED: 0, DEFERRED: 0, BOUNCED: 0, "dsn": 0}

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> int:
        """Load the spool and schedule every record; returns how many were queued.

        ``load_all`` is a blocking startup scan: call this before the SMTP
        side starts storing.
        """
        records = self.spool.load_all()
        for record in records:
            self.enqueue(record)
        return len(records)

    def enqueue(self, record: SpoolRecord) -> None:
        """Take a record that is durably in the spool (just stored, or adopted)."""
        if self._stopping or record.queue_id in self._entries:
            return
        entry = _Entry(record)
        self._entries[record.queue_id] = entry
        self._schedule(entry)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop attempting; sessions may finish their current message within ``timeout``.

        Records stay in the spool as last written; close the spool afterwards.
        """
        self._stopping = True
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        await self.pool.stop(timeout)
        # A message whose destinations were only partly tried ends its attempt
        # here, so the recipients already delivered are not sent again after
        # the restart (and those already bounced get their DSN).
        for entry in list(self._entries.values()):
            if entry.active and entry.outstanding and entry.results:
                entry.outstanding = 0
                self._settle_soon(entry)
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    @property
    def queued(self) -> int:
        return len(self._entries)

    # -- operator hooks (``sendguard queue list|flush|delete``) -----------------

    def list_queue(self) -> list[dict[str, Any]]:
        """Every queued message, oldest first, as plain JSON-ready dicts."""
        now = self._clock()
        out = []
        for entry in sorted(self._entries.values(), key=lambda e: e.record.received_at):
            record = entry.record
            errors = [r["last_error"] for r in record.recipients if r["last_error"]]
            out.append({
                "queue_id": record.queue_id,
                "sender": record.mail_from,
                "client_ip": record.client_ip,
                "account": record.account,
                "size": len(record.message),
                "arrival": record.received_at,
                "age": max(0.0, now - record.received_at),
                "attempts": record.attempts,
                "state": _state(entry),
                "next_attempt": None if entry.active else record.next_attempt,
                "next_try_in": None if entry.active else max(0.0, record.next_attempt - now),
                "last_error": errors[-1] if errors else None,
                "recipients": [dict(r) for r in record.recipients],
            })
        return out

    def flush(self) -> int:
        """Attempt every waiting message now; returns how many were started."""
        started = 0
        for entry in list(self._entries.values()):
            if entry.active or entry.deleted or entry.record.held:
                continue
            if entry.timer is not None:
                entry.timer.cancel()
            entry.record.next_attempt = self._clock()
            self._begin(entry)
            started += 1
        return started

    async def delete(self, queue_id: str) -> bool:
        """Drop a message without a DSN (as ``postsuper -d``); False if not queued here.

        A transaction already under way to some destination completes; nothing
        more is sent for the message after that.
        """
        entry = self._entries.pop(queue_id, None)
        if entry is None:
            return False
        await self._drop(entry, "queue_deleted")
        return True

    def matching(self, *, ids: Collection[str] = (), account: str = "",
                 client: str = "") -> list[SpoolRecord]:
        """The queued records with one of ``ids``, of ``account``, or from the client
        key ``client`` (an address, IPv6 by its /64)."""
        found = []
        for entry in self._entries.values():
            record = entry.record
            if ((ids and record.queue_id in ids) or (account and record.account == account)
                    or (client and client_key(record.client_ip) == client)):
                found.append(record)
        return found

    async def purge(self, records: list[SpoolRecord], bounce: bool) -> list[SpoolRecord]:
        """Drop ``records`` (``sendguard queue purge``); with ``bounce`` each sender first
        gets a DSN for the recipients not yet done. Returns the records dropped."""
        settings = self._settings()
        purged = []
        for record in records:
            entry = self._entries.get(record.queue_id)
            if entry is None or entry.deleted:
                continue
            if bounce and record.mail_from:
                failed = [(r["rcpt"], local(BOUNCED, PURGED, "5.0.0"))
                          for r in record.recipients if r["status"] not in (DELIVERED, BOUNCED)]
                if failed:
                    # The DSN first: a crash in between sends the message and its DSN,
                    # never drops the message without telling the sender.
                    dsn = bounce_record(record, failed, hostname=settings.server.hostname,
                                        now=self._clock())
                    await self.spool.store(dsn)
                    self.enqueue(dsn)
            del self._entries[record.queue_id]
            await self._drop(entry, "queue_purged", bounced=bounce)
            purged.append(record)
        return purged

    async def hold(self, records: list[SpoolRecord], held: bool) -> list[SpoolRecord]:
        """Hold ``records`` (not attempted until released), or release them (attempted now).

        The mark is written to the spool before this returns, so it survives a
        restart. An attempt already under way finishes; a held message is not
        scheduled again after it. Returns the records whose mark changed."""
        changed = []
        for record in records:
            entry = self._entries.get(record.queue_id)
            if entry is None or entry.deleted or record.held == held:
                continue
            record.held = held
            if held and entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
            if not held:
                record.next_attempt = min(record.next_attempt, self._clock())
            try:
                await self.spool.update(record)
            except KeyError:
                continue  # its last attempt just removed it
            except SpoolError:
                record.held = not held
                raise
            log_event("queue_held" if held else "queue_released", queue_id=record.queue_id,
                      client_ip=record.client_ip, account=record.account or None)
            if not held and not entry.active:
                self._schedule(entry)
            changed.append(record)
        return changed

    async def _drop(self, entry: _Entry, event: str, **fields: object) -> None:
        entry.deleted = True
        if entry.timer is not None:
            entry.timer.cancel()
        queue_id = entry.record.queue_id
        try:
            await self.spool.remove(queue_id)
        except KeyError:
            pass  # an attempt that just ended removed it already
        log_event(event, queue_id=queue_id, client_ip=entry.record.client_ip,
                  account=entry.record.account or None, **fields)

    # -- scheduling ------------------------------------------------------------------

    def _trusted_by_settings(self, ip: str) -> bool:
        networks = self._settings().server.trusted_networks
        if not networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in networks)

    def _schedule(self, entry: _Entry) -> None:
        if entry.record.held:
            return  # until ``release``
        delay = entry.record.next_attempt - self._clock()
        if delay <= 0:
            self._begin(entry)
        else:
            entry.timer = asyncio.get_running_loop().call_later(delay, self._begin, entry)

    def _begin(self, entry: _Entry) -> None:
        """Start an attempt: one job per destination (and per 50 recipients)."""
        entry.timer = None
        if entry.deleted or self._stopping or entry.record.held:
            return
        record = entry.record
        entry.active = True
        entry.results = {}
        smarthost = self._settings().delivery.mode == "smarthost"
        groups: dict[str, list[int]] = {}
        for index, rcpt in enumerate(record.recipients):
            if rcpt["status"] not in (DELIVERED, BOUNCED):
                key = SMARTHOST if smarthost else _domain(rcpt["rcpt"])
                if key is None:
                    self._apply(entry, index, local(BOUNCED, "bad recipient address syntax",
                                                    "5.1.3"))
                    continue
                groups.setdefault(key, []).append(index)
        jobs = []
        for key, indexes in groups.items():
            for at in range(0, len(indexes), RECIPIENTS_PER_TRANSACTION):
                chunk = indexes[at:at + RECIPIENTS_PER_TRANSACTION]
                jobs.append((key, Job(entry, record.mail_from,
                                      [record.recipients[i]["rcpt"] for i in chunk], chunk,
                                      record.message, lambda: entry.deleted)))
        entry.outstanding = len(jobs)
        if not jobs:
            self._settle_soon(entry)
            return
        for key, job in jobs:
            self.pool.submit(key, None if key == SMARTHOST else key, job)
        self.pool.pump()

    def _job_done(self, job: Job, results: list[Result]) -> None:
        entry: _Entry = job.owner
        if entry.deleted:
            return
        for index, result in zip(job.indexes, results, strict=True):
            self._apply(entry, index, result)
        entry.outstanding -= 1
        if entry.outstanding == 0:
            self._settle_soon(entry)

    def _apply(self, entry: _Entry, index: int, result: Result) -> None:
        entry.results[index] = result
        rcpt = entry.record.recipients[index]
        rcpt["status"] = result.status
        rcpt["last_error"] = None if result.status == DELIVERED else result.detail
        self.stats[result.status] += 1
        log_event("delivery", logging.INFO if result.status == DELIVERED else logging.WARNING,
                  sid=entry.record.session_id, client_ip=entry.record.client_ip,
                  queue_id=entry.record.queue_id, recipient=rcpt["rcpt"],
                  relay=result.host, status=result.status, dsn=result.status_code,
                  detail=result.detail if result.status != DELIVERED else result.reply)

    def _settle_soon(self, entry: _Entry) -> None:
        task = asyncio.create_task(self._settle(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the end of an attempt ------------------------------------------------------

    async def _settle(self, entry: _Entry) -> None:
        record = entry.record
        settings = self._settings()
        now = self._clock()
        record.attempts += 1
        max_age = settings.delivery.max_queue_time
        expired = now + _SLACK >= record.received_at + max_age
        expired_after = None
        for index, rcpt in enumerate(record.recipients):
            if rcpt["status"] == DEFERRED and expired:
                last = entry.results.get(index) or local(DEFERRED, rcpt["last_error"] or "",
                                                         "4.4.7")
                expired_after = duration_text(max_age)
                self._apply(entry, index, last.expired(expired_after))
        bounced = [(record.recipients[i]["rcpt"], result) for i, result in entry.results.items()
                   if result.status == BOUNCED]
        retry = settings.delivery.retry
        delay = retry[min(record.attempts - 1, len(retry) - 1)]
        record.next_attempt = min(now + delay, record.received_at + max_age)

        await self.feedback.settle(record)
        if bounced and not entry.deleted:
            if not await self._bounce(entry, bounced, settings.server.hostname, now,
                                      expired_after):
                record.next_attempt = now + delay
        if entry.deleted:
            return
        try:
            if record.done:
                await self.spool.remove(record.queue_id)
            else:
                await self.spool.update(record)
        except KeyError:
            return  # deleted by the operator meanwhile
        except SpoolError as exc:
            # The in-memory state goes on; a crash now would repeat this attempt.
            log_event("spool_update_failed", logging.ERROR, queue_id=record.queue_id,
                      error=str(exc))
        entry.active = False
        if record.done:
            self._entries.pop(record.queue_id, None)
        elif not entry.deleted and not self._stopping:
            self._schedule(entry)

    async def _bounce(self, entry: _Entry, bounced: list[tuple[str, Result]], hostname: str,
                      now: float, expired_after: str | None) -> bool:
        """Queue the DSN; False (bounces turned back into deferrals) if it cannot be stored."""
        record = entry.record
        if record.mail_from == "":
            log_event("dsn_dropped", logging.WARNING, queue_id=record.queue_id,
                      client_ip=record.client_ip, recipients=[r for r, _ in bounced],
                      reason="a delivery status notification cannot be delivered")
            return True
        dsn = bounce_record(record, bounced, hostname=hostname, now=now,
                            expired_after=expired_after)
        try:
            await self.spool.store(dsn)
        except (SpoolError, ValueError) as exc:
            # Without its DSN a bounce must not become final: retry those
            # recipients later, which bounces them (and tries the DSN) again.
            log_event("dsn_store_failed", logging.ERROR, queue_id=record.queue_id,
                      error=str(exc))
            for index, result in list(entry.results.items()):
                if result.status == BOUNCED:
                    record.recipients[index]["status"] = DEFERRED
            return False
        self.stats["dsn"] += 1
        log_event("dsn_queued", queue_id=record.queue_id, dsn_queue_id=dsn.queue_id,
                  client_ip=record.client_ip, sender=record.mail_from,
                  recipients=[r for r, _ in bounced])
        self.enqueue(dsn)
        return True


def _state(entry: _Entry) -> str:
    if entry.active:
        return "active"
    if entry.record.held:
        return "held"
    return "deferred" if entry.record.attempts else "queued"


def _domain(address: str) -> str | None:
    try:
        return split_address(address)[1]
    except BadDomain:
        return None
