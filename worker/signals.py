"""SIGTERM and SIGINT as events a worker's steps wait for (documented API, docs/OPERATIONS.md).

SIGTERM drains (stop accepting, let open transactions finish within
``server.drain_timeout``, then 421 the rest); SIGINT stops at once. The
handlers only set events; the steps that wait for them decide what to do.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import Any


class StopSignals:
    def __init__(self) -> None:
        self.any = asyncio.Event()
        self.fast = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.any.set)
        loop.add_signal_handler(signal.SIGINT, self._fast)

    def ignore_from_now(self) -> None:
        """The worker is done: a SIGTERM from here on changes nothing.

        Closing the loop would give SIGTERM back its default, which kills,
        and a late one is expected (the supervisor may TERM a worker that
        the ring has just retired): it must not turn exit 0 into death by
        signal. SIGINT keeps its meaning (stop at once).
        """
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the default was back for an instant

    def _fast(self) -> None:
        self.fast.set()
        self.any.set()


async def first(*waitables: Awaitable[Any], timeout: float | None = None) -> None:
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
