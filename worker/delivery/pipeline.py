"""SMTP transactions with PIPELINING (RFC 2920) on a connection aiosmtplib opened.

aiosmtplib (5.x) sends one command and waits for its reply: its protocol
keeps one reply at a time and drops bytes that arrive while a parsed reply
waits to be picked up, so several commands in flight cannot go through it.
When the next hop offers PIPELINING, the connection, once aiosmtplib has
done the greeting, EHLO and STARTTLS, is handed to :class:`ReplyReader`
(``transport.set_protocol``), which queues every reply in order however the
bytes are split or joined; a transaction then writes MAIL FROM, every RCPT
TO and DATA at once and reads their replies, then the message. That is two
round trips per message instead of three plus one per recipient, and as
many fewer wake-ups of the event loop on both sides.

The replies decide the outcome exactly as in lock-step: a refused MAIL
makes the RCPTs and DATA fail with 503 (ignored), DATA is answered 354 only
when a recipient was accepted (a server that says 354 anyway gets a lone
"." and the transaction is reset).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from aiosmtplib import SMTPResponse
from aiosmtplib.errors import (
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)

# As aiosmtplib bounds them.
MAX_LINE = 8192
MAX_REPLY = MAX_LINE * 4
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def command(*parts: bytes) -> bytes:
    """One command line; ValueError if a part holds a control character (injection)."""
    for part in parts:
        if _CONTROL.search(part):
            raise ValueError("command argument contains a control character")
    return b" ".join(parts) + b"\r\n"


def data_block(message: bytes) -> bytes:
    """The message as sent after 354: CRLF line endings, leading dots doubled, the final dot."""
    message = _LINE_ENDINGS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return _LEADING_DOT.sub(b"..", message) + b".\r\n"


class ReplyReader(asyncio.Protocol):
    """The replies of one SMTP connection, queued in order."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        transport.set_protocol(self)

    @property
    def connected(self) -> bool:
        return self._lost is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.connected:
            raise SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def reply(self, timeout: float | None) -> SMTPResponse:
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                self._fail(SMTPReadTimeoutError("Timed out waiting for server response"))
                self.transport.abort()
                raise self._lost from None  # type: ignore[misc]
            finally:
                self._waiter = None
        return self._replies.popleft()

    def close(self) -> None:
        self.transport.close()

    # -- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._fail(exc)
            self.transport.abort()
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    # -- internals ----------------------------------------------------------------------

    def _parse(self) -> None:
        start = 0
        while True:
            lines: list[bytes] = []
            end = start
            while True:
                newline = self._buffer.find(b"\n", end)
                if newline < 0:
                    if len(self._buffer) - start > MAX_REPLY:
                        raise SMTPResponseException(-1, "Response too long")
                    del self._buffer[:start]
                    return
                line = bytes(self._buffer[end:newline + 1])
                end = newline + 1
                if len(line) > MAX_LINE or end - start > MAX_REPLY:
                    raise SMTPResponseException(-1, "Response too long")
                if not line[:3].isdigit():
                    raise SMTPResponseException(
                        -1, "Malformed SMTP response line: "
                        + line.decode("utf-8", "replace").strip())
                lines.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    break
            code = int(self._buffer[start:start + 3])
            text = b"\n".join(lines).decode("utf-8", "surrogateescape")
            self._replies.append(SMTPResponse(code, text))
            start = end

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
