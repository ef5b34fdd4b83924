"""The open SMTP sessions of one worker, for graceful shutdown and status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

# After our 421 a TLS peer may take a moment to answer the close; past this
# the connection is dropped so the worker can exit.
_CLOSE_GRACE = 1.0


class Session(Protocol):
    """What the registry asks of an open session (worker/smtp.py's protocol object)."""

    def begin_drain(self) -> None: ...
    async def end_now(self) -> None: ...
    def abort(self) -> None: ...


class SessionRegistry:
    def __init__(self) -> None:
        self._open: set[Session] = set()
        self._closing: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gone = asyncio.Event()
        self._gone.set()
        self.total = 0

    def add(self, session: Session) -> None:
        self._open.add(session)
        self.total += 1
        self._idle.clear()
        self._gone.clear()

    def finished(self, session: Session) -> None:
        """We said goodbye; the connection may still be closing."""
        if session in self._open:
            self._open.discard(session)
            self._closing.add(session)
        self._update()

    def discard(self, session: Session) -> None:
        """The connection is gone."""
        self._open.discard(session)
        self._closing.discard(session)
        self._update()

    def _update(self) -> None:
        if not self._open:
            self._idle.set()
            if not self._closing:
                self._gone.set()

    def __len__(self) -> int:
        return len(self._open)

    async def drain(self, timeout: float) -> int:
        """Ask every session to finish; after ``timeout`` end the rest.

        Returns how many sessions were cut.
        """
        deadline = time.monotonic() + timeout
        for session in list(self._open):
            session.begin_drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        remaining = list(self._open)
        await asyncio.gather(*(s.end_now() for s in remaining), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), _CLOSE_GRACE)
        for session in list(self._open | self._closing):
            session.abort()
        return len(remaining)
