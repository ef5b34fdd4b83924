"""A worker process: builds its parts after the fork and serves until told to stop.

Signals (documented API): SIGTERM drains (stop accepting, let open
transactions finish within ``server.drain_timeout``, then 421 the rest);
SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from cluster.logjson import log_event, setup_logging
from cluster.settings import Settings
from cluster.validate import ConfigError
from worker.auth import PasswordVerifier
from worker.counters.client import LocalCounters
from worker.counters.shard import CounterShard
from worker.dns import DomainResolver
from worker.engine import PolicyEngine
from worker.local_source import LocalSnapshotSource
from worker.policies.recipient_domain import RecipientDomainPolicy
from worker.server import BootError, SmtpServer
from worker.spam import make_scanner
from worker.spool import Spool

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_BOOT_FAILED = 3


@dataclass
class WorkerParts:
    source: LocalSnapshotSource
    shard: CounterShard
    engine: PolicyEngine
    server: SmtpServer


async def build_worker(settings: Settings, name: str = "w0") -> WorkerParts:
    source = LocalSnapshotSource(settings)
    shard = CounterShard()
    resolver = DomainResolver(settings.dns.nameservers, settings.dns.timeout)
    spam = settings.spam
    scanner = make_scanner(spam.backend, spam.url, spam.timeout, spam.rspamd_spam_actions)
    spool = Spool(settings.delivery.spool, name)
    engine = PolicyEngine(
        snapshot=source.current,
        counters=LocalCounters(shard),
        verifier=PasswordVerifier(max_concurrent=max(2, (os.cpu_count() or 2))),
        recipient_domain=RecipientDomainPolicy(resolver),
        scanner=lambda: scanner,
        spool=spool,
    )
    return WorkerParts(source, shard, engine, SmtpServer(engine, source.current))


async def _housekeeping(parts: WorkerParts) -> None:
    while True:
        await asyncio.sleep(1.0)
        parts.source.reload()
        parts.shard.expire()


async def serve(settings: Settings, name: str = "w0",
                on_ready: Callable[[WorkerParts], None] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    fast = False

    def request_stop(graceful: bool) -> None:
        nonlocal fast
        fast = fast or not graceful
        stopping.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop, True)
    loop.add_signal_handler(signal.SIGINT, request_stop, False)

    parts = await build_worker(settings, name)
    await parts.server.start()
    housekeeping = asyncio.create_task(_housekeeping(parts))
    log_event("worker_ready", worker=name, pid=os.getpid())
    if on_ready is not None:
        on_ready(parts)
    await stopping.wait()
    log_event("worker_stopping", worker=name, graceful=not fast)
    await parts.server.drain(0.0 if fast else settings.server.drain_timeout)
    housekeeping.cancel()
    with suppress(asyncio.CancelledError):
        await housekeeping
    return EXIT_OK


def run_worker(settings: Settings, name: str = "w0") -> int:
    """Entry point of a worker process (after fork): uvloop, logging, serve."""
    import uvloop

    setup_logging(settings.log_file, process=name)
    try:
        return uvloop.run(serve(settings, name))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except BootError as exc:
        log_event("boot_failed", logging.ERROR, worker=name, error=str(exc))
        print(f"sendguard: {name}: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED
