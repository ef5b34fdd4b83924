"""POST a JSON object to ``compromise.notify_url``, with bounded retries and backoff.

Runs on the coordinator's event loop, in a task per notification: neither
the suspension nor any SMTP session waits for it. A notification is tried
once and then after each of :data:`RETRY_DELAYS` (about half a minute in
all) while the receiver fails: no connection, a timeout, a 5xx, 408 or 429.
Any other 4xx means the receiver will not take it however often it is
sent: it is given up at once. A notification given up, or cut short by a
restart of the coordinator, is logged (``compromise_notify_failed``); the
suspension itself is in the audit log either way.

aiohttp is the client because the coordinator already runs its admin API
on it; one session is kept for all notifications.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from cluster.logjson import log_event

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)   # seconds between attempts
TIMEOUT = 5.0                                # per attempt
MAX_IN_FLIGHT = 1000                         # notifications being tried at once
_RETRY_STATUSES = frozenset({408, 429})


class Notifier:
    def __init__(self, on_result: Callable[[str], None] = lambda result: None,
                 delays: Sequence[float] = RETRY_DELAYS, timeout: float = TIMEOUT) -> None:
        # Told "delivered", "retried" (once per retry) or "failed" (the metrics).
        self.on_result = on_result
        self.delays = tuple(delays)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def notify(self, url: str, payload: dict[str, Any]) -> asyncio.Task[bool] | None:
        """Start sending ``payload``; the task's result says whether it was delivered."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            log_event("compromise_notify_failed", logging.ERROR, url=shown(url),
                      account=payload.get("account"), error="too many notifications in flight")
            self.on_result("failed")
            return None
        task = asyncio.create_task(self._deliver(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _deliver(self, url: str, payload: dict[str, Any]) -> bool:
        try:
            return await self._attempts(url, payload)
        except asyncio.CancelledError:
            log_event("compromise_notify_failed", logging.ERROR, url=shown(url),
                      account=payload.get("account"), error="the coordinator stopped")
            self.on_result("failed")
            raise

    async def _attempts(self, url: str, payload: dict[str, Any]) -> bool:
        account = payload.get("account")
        for attempt in range(1, len(self.delays) + 2):
            error, retry = await self._post(url, payload)
            if error is None:
                log_event("compromise_notified", url=shown(url), account=account,
                          attempt=attempt)
                self.on_result("delivered")
                return True
            if not retry or attempt > len(self.delays):
                log_event("compromise_notify_failed", logging.ERROR, url=shown(url),
                          account=account, attempt=attempt, error=error)
                self.on_result("failed")
                return False
            delay = self.delays[attempt - 1]
            log_event("compromise_notify_retry", logging.WARNING, url=shown(url),
                      account=account, attempt=attempt, error=error, retry_in=delay)
            self.on_result("retried")
            await asyncio.sleep(delay)
        return False  # not reached: the last attempt returns above

    async def _post(self, url: str, payload: dict[str, Any]) -> tuple[str | None, bool]:
        """None when the receiver took it; else what went wrong and whether to try again."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(url, json=payload) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None, False
                retry = response.status >= 500 or response.status in _RETRY_STATUSES
                return f"HTTP {response.status}", retry
        except TimeoutError:
            return f"no answer within {self.timeout:g} s", True
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}", True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None


def shown(url: str) -> str:
    """The URL without its query string or credentials, which may hold a secret token."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
