"""SpamAssassin adapter: one SPAMC/1.5 ``SYMBOLS`` request per message.

Request, then the sending side is shut down as ``spamc`` does::

    SYMBOLS SPAMC/1.5
    Content-length: <size of what follows>

    Received: from <helo> (unknown [<client ip>]) by sendguard with ESMTPSA id <sid>; <date>
    <message>

Answer::

    SPAMD/1.1 0 EX_OK
    Content-length: 24
    Spam: True ; 15.0 / 5.0

    GTUBE,MISSING_DATE,...

SpamAssassin learns the client IP, HELO and authentication only from
``Received`` headers, so the adapter prepends the header this gateway's own
hop would carry; "ESMTPSA" tells SpamAssassin that the client authenticated.
The header goes to spamd only, never into the queued message.

``url`` is ``host:port`` (``[v6addr]:port``; the port defaults to 783) or
the path of spamd's UNIX socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from email.utils import formatdate

from cluster.hostport import BadPort, split_host_port
from worker.spam import ScannerUnavailable, ScanRequest, ScanResult
from worker.spam.answer import read_headers, read_sized_body

DEFAULT_PORT = 783
# The SYMBOLS body is a comma-separated list of rule names.
MAX_ANSWER = 256 * 1024

_SPAM_HEADER = re.compile(
    r"(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE
)
_STATUS = re.compile(r"SPAMD/\d+\.\d+\s+(\d+)\s*(.*)")
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def parse_address(url: str) -> tuple[str, int] | str:
    """``(host, port)`` for TCP, or the socket path for a UNIX socket."""
    url = url.strip()
    if url.startswith("/"):
        return url
    try:
        host, port = split_host_port(url, DEFAULT_PORT)
    except BadPort:
        raise ValueError(f"spam.url: bad spamd port in {url!r}") from None
    except ValueError:
        raise ValueError(f"spam.url: spamd needs host:port, got {url!r}") from None
    if "/" in host:
        raise ValueError(f"spam.url: spamd needs host:port, got {url!r}")
    return host, port


class SpamdScanner:
    name = "spamd"

    def __init__(self, url: str) -> None:
        self.address = parse_address(url)
        self._where = url

    async def scan(self, request: ScanRequest) -> ScanResult:
        try:
            if isinstance(self.address, str):
                reader, writer = await asyncio.open_unix_connection(self.address)
            else:
                reader, writer = await asyncio.open_connection(*self.address)
        except OSError as exc:
            raise ScannerUnavailable(f"spamd: cannot connect to {self._where}: {exc}") from exc
        try:
            trace = _received(request)
            head = (
                f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(trace) + len(request.message)}\r\n\r\n"
            )
            writer.write(head.encode("ascii"))
            writer.write(trace)
            writer.write(request.message)
            # spamd reads by Content-length, but old versions wait for EOF.
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
            return await _read_answer(reader)
        except OSError as exc:
            raise ScannerUnavailable(f"spamd: connection failed: {exc!r}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Nothing is kept open between scans."""


async def _read_answer(reader: asyncio.StreamReader) -> ScanResult:
    try:
        status_line = (await reader.readline()).decode("latin-1").strip()
        if not status_line:
            raise ScannerUnavailable("spamd: connection closed without an answer")
        status = _STATUS.fullmatch(status_line)
        if status is None:
            raise ScannerUnavailable(f"spamd: not a SPAMD answer: {status_line[:80]!r}")
        if status[1] != "0":
            raise ScannerUnavailable(f"spamd: error {status[1]} {status[2]}".rstrip())
        headers = await read_headers(reader, "spamd")
        body = await read_sized_body(reader, headers, "spamd", MAX_ANSWER)
        if body is None:
            body = await reader.read(MAX_ANSWER)
    except asyncio.IncompleteReadError:
        raise ScannerUnavailable("spamd: connection closed in the middle of the answer") from None
    except ValueError as exc:  # an overlong line or a bad number
        raise ScannerUnavailable(f"spamd: malformed answer: {exc}") from None
    verdict = _SPAM_HEADER.fullmatch(headers.get("spam", ""))
    if verdict is None:
        raise ScannerUnavailable(f"spamd: answer has no valid Spam header: {headers.get('spam')!r}")
    symbols = body.decode("latin-1").replace("\r", "").replace("\n", ",").split(",")
    return ScanResult(
        spam=verdict[1].lower() in ("true", "yes"),
        score=float(verdict[2]),
        symbols=tuple(symbol.strip() for symbol in symbols if symbol.strip()),
        backend="spamd",
    )


def _received(request: ScanRequest) -> bytes:
    # Client-supplied text is reduced to header-safe characters.
    helo = _UNSAFE.sub("", request.helo)[:255] or "unknown"
    ip = _UNSAFE.sub("", request.client_ip)
    sid = _UNSAFE.sub("", request.session_id)
    ip_part = f" (unknown [{ip}])" if ip else ""
    return (
        f"Received: from {helo}{ip_part}\r\n\tby sendguard with ESMTPSA id {sid};\r\n"
        f"\t{formatdate()}\r\n"
    ).encode("ascii")
