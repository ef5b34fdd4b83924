"""The header lines and sized body of a scanner daemon's answer (SPAMD and HTTP/1.x alike).

Both protocols answer with a status line, ``Name: value`` lines up to an
empty line, and a body whose size ``Content-length`` gives. The status
line and the bodies without a length differ, and stay with each backend.
"""

from __future__ import annotations

import asyncio

from worker.spam import ScannerUnavailable


async def read_headers(reader: asyncio.StreamReader, who: str) -> dict[str, str]:
    """The answer's header lines, names lower-cased; ``who`` names the daemon in errors."""
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ScannerUnavailable(f"{who}: connection closed in the answer headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ScannerUnavailable(f"{who}: bad answer header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()


async def read_sized_body(reader: asyncio.StreamReader, headers: dict[str, str], who: str,
                          limit: int) -> bytes | None:
    """The body ``Content-length`` announces (at most ``limit`` bytes), or None without one.
    ValueError for a length that is not a number."""
    if "content-length" not in headers:
        return None
    length = int(headers["content-length"])
    if not 0 <= length <= limit:
        raise ScannerUnavailable(f"{who}: answer too large ({length} bytes)")
    return await reader.readexactly(length)
