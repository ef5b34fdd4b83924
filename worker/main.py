"""A worker process: builds its parts after the fork and serves until told to stop.

Two ways to run. Alone (``serve``): snapshots from the files on disk and
counters in this process. In the cluster (``serve_cluster``, what the
supervisor starts): the snapshot comes from the coordinator, counters are
kept by a :class:`~worker.counters.node.CounterNode` in the ring, and the
SMTP listeners are bound only once the node is active, so no connection is
accepted before its counters can be reached.

Signals (documented API): SIGTERM drains (stop accepting, let open
transactions finish within ``server.drain_timeout``, then 421 the rest);
SIGINT stops at once. In the cluster a drained worker keeps its counter
node up until SIGINT or ``drain_timeout`` more, because the other workers'
last transactions may need the keys it owns. A worker dropped from the ring
after being in it (scaled down) drains and exits 0 by itself.

Exit status: 0 stopped, 2 bad configuration, 3 cannot boot (certificate,
port taken): the supervisor does not restart 2 or 3.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosmtpd

from cluster.logjson import flush_log, log_event, setup_logging
from cluster.settings import Settings, SpamSettings
from cluster.validate import ConfigError
from worker import smtp_speedups
from worker.auth import PasswordVerifier, threads_per_worker
from worker.connections import EARLY_REPORT
from worker.counters.client import CounterClient, LocalCounters
from worker.counters.redis_store import counters_for
from worker.counters.shard import CounterShard
from worker.decisions import DecisionLog
from worker.delivery import DeliveryAgent
from worker.dns import DomainResolver
from worker.engine import PolicyEngine
from worker.local_source import LocalSnapshotSource
from worker.metrics import WorkerMetrics
from worker.recent import RecentDecisions
from worker.server import BootError, SmtpServer
from worker.snapshot import Snapshot
from worker.spam import SpamScanner, make_scanner
from worker.spool.adoption import open_spool
from worker.stages import stages

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_BOOT_FAILED = 3


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

    async def close(self, drain_timeout: float) -> None:
        """After the SMTP drain: let deliveries in flight finish, then close the spool."""
        await self.delivery.stop(drain_timeout)
        await self.engine.spool.aclose()
        close = getattr(self.engine.counters, "aclose", None)  # a Redis client
        if close is not None:
            await close()


async def build_worker(settings: Settings, name: str = "w0", *,
                       source: SnapshotSource | None = None, shard: CounterShard | None = None,
                       counters: CounterClient | None = None,
                       metrics: WorkerMetrics | None = None) -> WorkerParts:
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


async def _housekeeping(parts: WorkerParts) -> None:
    while True:
        await asyncio.sleep(1.0)
        if isinstance(parts.source, LocalSnapshotSource):
            parts.source.reload()
        parts.follow_settings()
        parts.shard.expire()
        parts.engine.connections.expire()


class _Stop:
    """SIGTERM (graceful) and SIGINT (fast), as events a coroutine can wait for."""

    def __init__(self) -> None:
        self.any = asyncio.Event()
        self.fast = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.any.set)
        loop.add_signal_handler(signal.SIGINT, self._fast)

    def _fast(self) -> None:
        self.fast.set()
        self.any.set()


async def _first(*waitables: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until one of ``waitables`` is done (or ``timeout``); cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waitables]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def serve(settings: Settings, name: str = "w0",
                on_ready: Callable[[WorkerParts], None] | None = None) -> int:
    stop = _Stop()
    parts = await build_worker(settings, name)
    await parts.start()
    housekeeping = asyncio.create_task(_housekeeping(parts))
    log_event("worker_ready", worker=name, pid=os.getpid())
    if on_ready is not None:
        on_ready(parts)
    await stop.any.wait()
    fast = stop.fast.is_set()
    log_event("worker_stopping", worker=name, graceful=not fast)
    drain_timeout = parts.source.current().settings.server.drain_timeout
    await parts.server.drain(0.0 if fast else drain_timeout)
    housekeeping.cancel()
    with suppress(asyncio.CancelledError):
        await housekeeping
    await parts.close(0.0 if fast else drain_timeout)
    return EXIT_OK


async def serve_cluster(runtime_dir: Path, name: str) -> int:
    import zmq

    from cluster.wire import worker_endpoint
    from worker.cluster_link import ClusterLink
    from worker.counters.node import CounterNode

    stop = _Stop()
    link = ClusterLink(runtime_dir, name)
    await link.connect()
    node: CounterNode | None = None
    parts: WorkerParts | None = None
    housekeeping: asyncio.Task[None] | None = None
    try:
        first = asyncio.ensure_future(link.first_snapshot())
        await _first(first, stop.any.wait())
        if not first.done() or first.cancelled():
            return EXIT_OK
        settings = first.result().settings
        setup_logging(settings.log_file, process=name)
        metrics = WorkerMetrics()
        shard = CounterShard()
        endpoint = worker_endpoint(runtime_dir, name)
        node = CounterNode(name, endpoint, shard, settings.cluster.request_timeout,
                           observe=metrics.observe_counter)
        try:
            await node.start()
        except (zmq.ZMQError, ValueError, OSError) as exc:
            raise BootError(f"cannot bind the counter endpoint {endpoint}: {exc}") from None
        counters = counters_for(settings, node.client, metrics.observe_counter)
        parts = await build_worker(settings, name, source=link, shard=shard,
                                   counters=counters, metrics=metrics)
        sessions = parts.server.sessions
        connections = parts.engine.connections
        link.report_values = lambda: {**metrics.values(len(sessions), sessions.total),
                                      "connections": connections.report()}
        link.on_connections = lambda tables: connections.update(tables, name)
        connections.on_growth = lambda: link.report_soon(EARLY_REPORT)
        await link.join(node, node.endpoint)
        while not stop.any.is_set() and not node.active():
            await _first(node.wait_active(5.0), stop.any.wait())
            if not node.active() and not stop.any.is_set():
                log_event("waiting_for_ring", logging.WARNING, worker=name)
        if stop.any.is_set():
            return EXIT_OK
        await parts.start()
        link.delivery = parts.delivery  # queue commands and spool adoption
        link.recent = parts.engine.log.recent  # sendguard why
        parts.engine.evidence.send = link.send_evidence  # compromise detection
        link.phase = "serving"
        await link.report()
        housekeeping = asyncio.create_task(_housekeeping(parts))
        log_event("worker_ready", worker=name, pid=os.getpid(), endpoint=node.endpoint)

        await _first(stop.any.wait(), link.removed.wait())
        loop = asyncio.get_running_loop()
        drain_timeout = link.current().settings.server.drain_timeout  # the one in force now
        linger_until = loop.time() + drain_timeout + 1.0
        retired = link.removed.is_set()
        fast = stop.fast.is_set() and not retired
        log_event("worker_stopping", worker=name, graceful=not fast, retired=retired)
        link.phase = "draining"
        await link.report()
        await parts.server.drain(0.0 if fast else drain_timeout)
        if not fast and not retired:
            link.phase = "drained"
            await link.report()
            # No peer's transaction outlives its own drain, which began with ours.
            await _first(stop.fast.wait(), link.removed.wait(),
                         timeout=max(0.0, linger_until - loop.time()))
        return EXIT_OK
    finally:
        if housekeeping is not None:
            housekeeping.cancel()
        if parts is not None:
            await parts.close(0.0 if stop.fast.is_set() else 5.0)
        if node is not None:
            await node.close()
        await link.close()


def run_worker(settings: Settings, name: str = "w0") -> int:
    """Entry point of a worker that runs alone (after fork): uvloop, logging, serve."""
    setup_logging(settings.log_file, process=name)
    return _run(serve(settings, name), name)


def run_cluster_worker(runtime_dir: Path, name: str) -> int:
    """Entry point of a worker started by the supervisor."""
    # stderr until the snapshot names the log file.
    setup_logging(None, process=name)
    return _run(serve_cluster(runtime_dir, name), name)


def _run(main: Awaitable[int], name: str) -> int:
    import uvloop

    try:
        return uvloop.run(main)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except BootError as exc:
        log_event("boot_failed", logging.ERROR, worker=name, error=str(exc))
        print(f"sendguard: {name}: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED
    finally:
        flush_log()  # lines of the loop's last turns (the loop is gone)
