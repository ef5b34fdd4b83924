"""A worker process: builds its parts after the fork and serves until told to stop.

Two ways to run. Alone (:func:`run_worker`): snapshots from the files on
disk and counters in this process. In the cluster
(:func:`run_cluster_worker`, what the supervisor starts): the snapshot
comes from the coordinator, counters are kept by a counter node in the
ring, and the worker goes through the steps of worker/lifecycle.py.

Signals (worker/signals.py): SIGTERM drains, SIGINT stops at once. Exit
status (cluster/exits.py): 0 stopped, 2 bad configuration, 3 cannot boot
(certificate, port taken): the supervisor does not restart 2 or 3.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable
from contextlib import suppress
from pathlib import Path

from cluster.exits import EXIT_BOOT_FAILED, EXIT_OK, EXIT_USAGE
from cluster.logjson import flush_log, log_event, setup_logging
from cluster.settings import Settings
from cluster.validate import ConfigError
from worker.builder import build_worker
from worker.server import BootError
from worker.signals import StopSignals


async def serve(settings: Settings, name: str = "w0") -> int:
    """A worker alone: build, serve until a signal, drain, close."""
    stop = StopSignals()
    parts = await build_worker(settings, name)
    await parts.start()
    housekeeping = asyncio.create_task(parts.housekeeping())
    log_event("worker_ready", worker=name, pid=os.getpid())
    await stop.any.wait()
    fast = stop.fast.is_set()
    log_event("worker_stopping", worker=name, graceful=not fast)
    drain_timeout = parts.source.current().settings.server.drain_timeout
    await parts.server.drain(0.0 if fast else drain_timeout)
    housekeeping.cancel()
    with suppress(asyncio.CancelledError):
        await housekeeping
    await parts.close(0.0 if fast else drain_timeout)
    stop.ignore_from_now()
    return EXIT_OK


def run_worker(settings: Settings, name: str = "w0") -> int:
    """Entry point of a worker that runs alone (after fork): uvloop, logging, serve."""
    setup_logging(settings.log_file, process=name)
    return _run(serve(settings, name), name)


def run_cluster_worker(runtime_dir: Path, name: str) -> int:
    """Entry point of a worker started by the supervisor."""
    from worker.lifecycle import serve_cluster  # ZeroMQ only in the cluster

    # stderr until the snapshot names the log file.
    setup_logging(None, process=name)
    return _run(serve_cluster(runtime_dir, name), name)


def _run(main: Awaitable[int], name: str) -> int:
    import uvloop

    try:
        return uvloop.run(main)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except BootError as exc:
        log_event("boot_failed", logging.ERROR, worker=name, error=str(exc))
        print(f"sendguard: {name}: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED
    finally:
        flush_log()  # lines of the loop's last turns (the loop is gone)
