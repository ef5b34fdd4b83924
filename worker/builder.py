"""The worker's builder: every part of a worker, made after the fork and given what it uses.

:func:`build_worker` makes the parts a worker has alone or in the cluster:
the aiosmtpd speed-ups installed in this process, the DNS resolver, the
spam scanner slot, the spool and its delivery agent, the policy engine with
its stages and decision log, and the SMTP server. What differs in the
cluster (the snapshot source, the counter client, the metrics the counter
node reports to, where compromise evidence goes) is passed in; the
defaults make a worker that runs alone on the files on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtpd

from cluster.logjson import log_event
from cluster.settings import Settings, SpamSettings
from worker import smtp_speedups
from worker.auth import PasswordVerifier, threads_per_worker
from worker.counters.client import CounterClient, LocalCounters
from worker.counters.redis_store import counters_for
from worker.counters.shard import CounterShard
from worker.decisions import DecisionLog
from worker.delivery import DeliveryAgent
from worker.dns import DomainResolver
from worker.engine import PolicyEngine
from worker.evidence import EvidenceNotes
from worker.local_source import LocalSnapshotSource
from worker.metrics import WorkerMetrics
from worker.recent import RecentDecisions
from worker.server import SmtpServer
from worker.snapshot import Snapshot
from worker.spam import SpamScanner, make_scanner
from worker.spool.adoption import open_spool
from worker.stages import stages

HOUSEKEEPING_EVERY = 1.0


class SnapshotSource(Protocol):
    def current(self) -> Snapshot: ...


class ScannerSlot:
    """The spam scanner of the settings in force; a reload that changes ``spam.*`` swaps it.

    The scanner it replaces is closed once the scans already running on it had
    their ``spam.timeout``.
    """

    def __init__(self, spam: SpamSettings) -> None:
        self._key = _scanner_key(spam)
        self._scanner = make_scanner(*self._key)
        self._closing: set[asyncio.Task[None]] = set()

    def __call__(self) -> SpamScanner:
        return self._scanner

    def follow(self, spam: SpamSettings) -> None:
        key = _scanner_key(spam)
        if key == self._key:
            return
        try:
            scanner = make_scanner(*key)
        except ValueError as exc:
            log_event("reload_refused", logging.ERROR, source="spam", error=str(exc))
            self._key = key  # not again until it changes again
            return
        old, grace = self._scanner, self._key[2] + 1.0
        self._scanner, self._key = scanner, key
        log_event("spam_scanner_replaced", backend=spam.backend, url=spam.url or None)
        asyncio.get_running_loop().call_later(grace, self._close, old)

    def _close(self, scanner: SpamScanner) -> None:
        task = asyncio.get_running_loop().create_task(scanner.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _scanner_key(spam: SpamSettings) -> tuple[str, str, float, tuple[str, ...]]:
    return spam.backend, spam.url, spam.timeout, tuple(spam.rspamd_spam_actions)


@dataclass
class WorkerParts:
    source: SnapshotSource
    shard: CounterShard
    engine: PolicyEngine
    server: SmtpServer
    metrics: WorkerMetrics
    delivery: DeliveryAgent
    resolver: DomainResolver
    scanners: ScannerSlot
    _followed: Settings | None = field(default=None, init=False, repr=False)

    def follow_settings(self) -> None:
        """Rebuild what was built from settings a reload changed (cluster/reload.py).

        Everything else is read from the snapshot where it is used, and what
        cannot change without a restart is named in ``reload_partial``.
        """
        settings = self.source.current().settings
        if settings is self._followed:
            return
        self._followed = settings
        if self.resolver.reconfigure(settings.dns.nameservers, settings.dns.timeout):
            log_event("resolver_replaced", nameservers=list(settings.dns.nameservers),
                      timeout=settings.dns.timeout)
        self.scanners.follow(settings.spam)
        self.server.refresh_tls(settings)

    async def start(self) -> None:
        """Queue what the spool already holds, then accept connections."""
        queued = await self.delivery.start()
        if queued:
            log_event("spool_loaded", messages=queued)
        await self.server.start()

    async def housekeeping(self) -> None:
        """Every second, for as long as the worker serves: files on disk (alone), settings
        a reload changed, expired counters and stale connection tables."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY)
            if isinstance(self.source, LocalSnapshotSource):
                self.source.reload()
            self.follow_settings()
            self.shard.expire()
            self.engine.connections.expire()

    async def close(self, drain_timeout: float) -> None:
        """After the SMTP drain: let deliveries in flight finish, then close the spool."""
        await self.delivery.stop(drain_timeout)
        await self.engine.spool.aclose()
        close = getattr(self.engine.counters, "aclose", None)  # a Redis client
        if close is not None:
            await close()
        # Lookups still running are cancelled now, not answered into a closed event loop.
        await self.resolver.close()


async def build_worker(settings: Settings, name: str = "w0", *,
                       source: SnapshotSource | None = None, shard: CounterShard | None = None,
                       counters: CounterClient | None = None,
                       metrics: WorkerMetrics | None = None,
                       evidence: EvidenceNotes | None = None) -> WorkerParts:
    """Defaults make a worker that runs alone: files from disk, counters in this process."""
    if not smtp_speedups.install():
        log_event("aiosmtpd_unpatched", logging.WARNING, version=aiosmtpd.__version__,
                  checked=sorted(smtp_speedups.CHECKED_RELEASES))
    source = source or LocalSnapshotSource(settings)
    shard = shard or CounterShard()
    metrics = metrics or WorkerMetrics()
    resolver = DomainResolver(settings.dns.nameservers, settings.dns.timeout)
    scanners = ScannerSlot(settings.spam)
    # Same name, same folder: a replacement replays its predecessor's queue.
    spool = await open_spool(settings.delivery.spool, name)
    counters = counters or counters_for(settings, LocalCounters(shard))
    delivery = DeliveryAgent(spool, lambda: source.current().settings, counters, resolver)
    decisions = DecisionLog(source.current, RecentDecisions(
        recent_share(settings), settings.admin.recent_decisions_for), metrics.decision)
    engine = PolicyEngine(
        snapshot=source.current,
        counters=counters,
        # Sized per host: every worker of the host has a pool of its own.
        verifier=PasswordVerifier(max_concurrent=threads_per_worker(
            settings.server.workers or os.cpu_count() or 1)),
        stages=stages(counters, resolver, scanners),
        spool=spool,
        decisions=decisions,
        on_queued=delivery.enqueue,
        evidence=evidence,
    )
    return WorkerParts(source, shard, engine, SmtpServer(engine, source.current), metrics,
                       delivery, resolver, scanners)


def recent_share(settings: Settings) -> int:
    """This worker's part of ``admin.recent_decisions``: connections are spread evenly over
    the workers, so each keeps its share and the host holds about the whole bound."""
    total = settings.admin.recent_decisions
    if total <= 0:
        return 0
    return max(1, total // (settings.server.workers or os.cpu_count() or 1))
