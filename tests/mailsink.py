"""A next hop for tests: an aiosmtpd server in a thread that keeps every message it accepts.

aiosmtpd is a strict receiver on purpose: it refuses a line over 1,000
octets (``500 Line too long``) and splits lines only at CRLF, so a bare CR
or LF in what the gateway delivers stays visible in ``content``, which is
the message exactly as received, dot-stuffing undone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass(frozen=True)
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    content: bytes

    @property
    def body(self) -> bytes:
        return self.content.split(b"\r\n\r\n", 1)[1]


class _Keeper:
    def __init__(self, sink: MailSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sink.add(Delivered(envelope.mail_from, list(envelope.rcpt_tos),
                                list(envelope.mail_options), envelope.original_content))
        return "250 2.0.0 Ok: kept"


class MailSink:
    def __init__(self) -> None:
        self.port = 0
        self._messages: list[Delivered] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def add(self, message: Delivered) -> None:
        with self._lock:
            self._messages.append(message)

    @property
    def messages(self) -> list[Delivered]:
        with self._lock:
            return list(self._messages)

    def wait(self, count: int, timeout: float = 30.0) -> list[Delivered]:
        """The first ``count`` messages, once they arrived; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the sink got {len(self.messages)} of {count} messages "
                                     f"within {timeout:g} s")
            time.sleep(0.05)
        return self.messages[:count]

    def start(self) -> MailSink:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()),
                                        name="mailsink", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the sink did not start")
        return self

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop, self._stop = loop, asyncio.Event()
        keeper = _Keeper(self)
        server = await loop.create_server(
            lambda: SMTP(keeper, hostname="sink.test", enable_SMTPUTF8=True,
                         data_size_limit=None, loop=loop), "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
