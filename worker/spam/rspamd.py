"""rspamd adapter: one HTTP/1.1 ``POST /checkv2`` per message.

Request (rspamd's "normal worker" protocol, as ``rspamc`` sends it)::

    POST /checkv2 HTTP/1.1
    Host: 127.0.0.1:11333
    Content-Length: <message size>
    Connection: close
    From: <envelope sender, "<>" for the null sender>
    Rcpt: <one header per envelope recipient>
    IP: <client IP>
    Helo: <client HELO>
    User: <authenticated account>
    Queue-Id: <session id>

    <message>

The answer is a JSON object; ``action``, ``score`` and ``symbols`` are used.
The message counts as spam when its ``action`` is one of
``spam.rspamd_spam_actions``. A fresh connection per scan keeps the client
free of pooling state; rspamd is normally on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from worker.spam import ScannerUnavailable, ScanRequest, ScanResult
from worker.spam.answer import read_headers, read_sized_body

# A verdict is a few KB; anything far larger is not an rspamd answer.
MAX_ANSWER = 4 * 1024 * 1024


class RspamdScanner:
    name = "rspamd"

    def __init__(self, url: str, spam_actions: Sequence[str] = ("reject",)) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"spam.url: rspamd needs an http://host[:port] URL, got {url!r}")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"spam.url: bad port in {url!r}") from None
        self.host = parts.hostname
        self.port = port
        self.path = parts.path.rstrip("/") + "/checkv2"
        self.spam_actions = frozenset(spam_actions)
        self._host_header = parts.netloc.rpartition("@")[2]

    async def scan(self, request: ScanRequest) -> ScanResult:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise ScannerUnavailable(
                f"rspamd: cannot connect to {self._host_header}: {exc}"
            ) from exc
        try:
            writer.write(self._request_head(request))
            writer.write(request.message)
            await writer.drain()
            status, body = await _read_response(reader)
        except OSError as exc:
            raise ScannerUnavailable(f"rspamd: connection failed: {exc!r}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if status != 200:
            raise ScannerUnavailable(f"rspamd: HTTP {status}{_error_text(body)}")
        return self._result(body)

    async def close(self) -> None:
        """Nothing is kept open between scans."""

    def _request_head(self, request: ScanRequest) -> bytes:
        fields = [
            ("Host", self._host_header),
            ("Content-Length", str(len(request.message))),
            ("Connection", "close"),
            ("From", request.mail_from or "<>"),
        ]
        fields += [("Rcpt", rcpt) for rcpt in request.rcpt_tos]
        fields += [
            (name, value)
            for name, value in (
                ("IP", request.client_ip),
                ("Helo", request.helo),
                ("User", request.user),
                ("Queue-Id", request.session_id),
            )
            if value
        ]
        lines = [f"POST {self.path} HTTP/1.1"]
        # A CR or LF from the client (say, in its HELO) must not start a new header.
        lines += [f"{name}: {_one_line(value)}" for name, value in fields]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def _result(self, body: bytes) -> ScanResult:
        try:
            answer = json.loads(body)
        except ValueError:
            raise ScannerUnavailable(f"rspamd: answer is not JSON: {body[:80]!r}") from None
        if not isinstance(answer, dict):
            raise ScannerUnavailable(f"rspamd: answer is not a JSON object: {body[:80]!r}")
        action = answer.get("action")
        score = answer.get("score")
        symbols = answer.get("symbols", {})
        if not isinstance(action, str):
            raise ScannerUnavailable(f"rspamd: answer has no action{_error_text(body)}")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise ScannerUnavailable(f"rspamd: answer has no numeric score: {score!r}")
        if not isinstance(symbols, dict):
            raise ScannerUnavailable(f"rspamd: symbols is not an object: {symbols!r}")
        return ScanResult(
            spam=action in self.spam_actions,
            score=float(score),
            symbols=tuple(sorted(symbols)),
            backend=self.name,
            action=action,
        )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status code and body of one HTTP/1.x response."""
    try:
        status_line = await reader.readline()
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            if not status_line:
                raise ScannerUnavailable("rspamd: connection closed without an answer")
            raise ScannerUnavailable(f"rspamd: not an HTTP answer: {status_line[:80]!r}")
        headers = await read_headers(reader, "rspamd")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            sized = await read_sized_body(reader, headers, "rspamd", MAX_ANSWER)
            body = sized if sized is not None else await reader.read(MAX_ANSWER + 1)
            if len(body) > MAX_ANSWER:
                raise ScannerUnavailable("rspamd: answer too large")
    except asyncio.IncompleteReadError:
        raise ScannerUnavailable("rspamd: connection closed in the middle of the answer") from None
    except ValueError as exc:  # an overlong line or a bad number
        raise ScannerUnavailable(f"rspamd: malformed answer: {exc}") from None
    return int(code), body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        if size == 0:
            return bytes(body)
        if len(body) + size > MAX_ANSWER:
            raise ScannerUnavailable("rspamd: answer too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _error_text(body: bytes) -> str:
    """rspamd explains a refusal as ``{"error": "..."}``; show that if present."""
    try:
        answer: Any = json.loads(body)
    except ValueError:
        return ""
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return f": {answer['error']}"
    return ""


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
