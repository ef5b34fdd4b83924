"""The open SMTP sessions of one worker, for graceful shutdown and status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.smtp import GatewaySMTP


class SessionRegistry:
    def __init__(self) -> None:
        self._open: set[GatewaySMTP] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.total = 0

    def add(self, session: GatewaySMTP) -> None:
        self._open.add(session)
        self.total += 1
        self._empty.clear()

    def discard(self, session: GatewaySMTP) -> None:
        self._open.discard(session)
        if not self._open:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    async def drain(self, timeout: float) -> int:
        """Ask every session to finish; after ``timeout`` end the rest. Returns how many were cut."""
        deadline = time.monotonic() + timeout
        for session in list(self._open):
            session.begin_drain()
        try:
            await asyncio.wait_for(self._empty.wait(), max(0.0, deadline - time.monotonic()))
            return 0
        except TimeoutError:
            pass
        remaining = list(self._open)
        await asyncio.gather(*(s.end_now() for s in remaining), return_exceptions=True)
        # A TLS peer that never answers our close_notify would hold the
        # connection open: give it a moment, then drop it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), 1.0)
        for session in list(self._open):
            session.abort()
        return len(remaining)
