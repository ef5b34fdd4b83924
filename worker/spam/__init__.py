"""Spam classification at the end of DATA: the backend interface.

Every backend answers one question per message through ``scan``. A backend
that cannot answer (timeout, refused connection, malformed reply) raises
``ScannerUnavailable``; the caller turns that into the ``spam.on_error``
action. ``make_scanner`` builds the configured backend and puts the per-scan
deadline around it, so no backend can hold a session longer than
``spam.timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BACKENDS",
    "ScanRequest",
    "ScanResult",
    "ScannerUnavailable",
    "SpamScanner",
    "make_scanner",
]

BACKENDS = ("builtin", "rspamd", "spamd")


@dataclass(frozen=True, slots=True)
class ScanRequest:
    message: bytes
    mail_from: str  # "" is the null sender
    rcpt_tos: tuple[str, ...]
    client_ip: str
    helo: str
    user: str  # the authenticated account
    session_id: str


@dataclass(frozen=True, slots=True)
class ScanResult:
    spam: bool
    score: float
    symbols: tuple[str, ...]
    backend: str
    action: str = ""  # rspamd's action; empty for the other backends


class ScannerUnavailable(Exception):
    """The backend gave no usable verdict: timeout, refused, malformed answer."""


class SpamScanner(Protocol):
    name: str

    async def scan(self, request: ScanRequest) -> ScanResult:
        """Classify one message; raise ``ScannerUnavailable`` when there is no verdict."""
        ...

    async def close(self) -> None: ...


class _Deadline:
    """Bounds every scan of ``inner`` by ``timeout`` seconds."""

    def __init__(self, inner: SpamScanner, timeout: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.timeout = timeout

    async def scan(self, request: ScanRequest) -> ScanResult:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.inner.scan(request)
        except TimeoutError:
            # Only the deadline raises TimeoutError here: backends turn their own
            # socket errors into ScannerUnavailable before they reach this point.
            raise ScannerUnavailable(f"{self.name}: timeout after {self.timeout:g}s") from None

    async def close(self) -> None:
        await self.inner.close()


def make_scanner(
    backend: str, url: str, timeout: float, rspamd_spam_actions: Sequence[str]
) -> SpamScanner:
    """The configured backend, with the per-scan ``timeout`` (seconds) enforced.

    Raises ``ValueError`` naming the ``spam.*`` key for an unknown backend, a
    non-positive timeout or a URL the backend cannot use.
    """
    # Imported here because the backends import the types defined above.
    from worker.spam.builtin import BuiltinScanner
    from worker.spam.rspamd import RspamdScanner
    from worker.spam.spamd import SpamdScanner

    if not timeout > 0:
        raise ValueError(f"spam.timeout: must be positive, got {timeout!r}")
    inner: SpamScanner
    if backend == "builtin":
        inner = BuiltinScanner()
    elif backend == "rspamd":
        inner = RspamdScanner(url, spam_actions=rspamd_spam_actions)
    elif backend == "spamd":
        inner = SpamdScanner(url)
    else:
        raise ValueError(f"spam.backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return _Deadline(inner, timeout)
