"""The DATA part of an SMTP session, read as SPEC §3 ("Content") wants it.

aiosmtpd reads DATA line by line with a 1001-byte line limit (long lines
get ``500 Line too long``) and splits lines only at CRLF, so a client that
ends lines with a bare LF keeps its dot-stuffing. Here:

- a line may be of any length; only the whole DATA is bounded
  (``server.max_message_size``, counted as received, as aiosmtpd counts);
- a bare LF ends a line too: dot-unstuffing applies after it, and the
  stored message has CRLF line ends only;
- DATA ends only at ``<CR><LF>.<CR><LF>`` (or ``.<CR><LF>`` right after
  the DATA command): ``<LF>.<CR><LF>`` and ``<CR><LF>.<LF>`` are content,
  so a message cannot smuggle a second one past the gateway, and a lone
  dot that did not end DATA is kept as content.

The reader uses only the public ``asyncio.StreamReader`` API: it looks
for ``.<CR><LF>`` and checks the two bytes before it, so whatever the
client pipelined after the end of DATA stays in the reader for the next
command.
"""

from __future__ import annotations

import asyncio
import re

_DOT_CRLF = b".\r\n"
# A dot that starts a line (after CRLF or a bare LF) and is not alone on it.
_STUFFED_DOT = re.compile(rb"(?m)^\.(?!\r?\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class TooMuchData(Exception):
    """DATA went past the size limit; it was read to its end and dropped."""


async def read_data(reader: asyncio.StreamReader, limit: int | None) -> bytes:
    """The raw DATA (dot-stuffed, as sent) up to its end marker, which is consumed.

    Raises :class:`TooMuchData` after reading to the end when more than
    ``limit`` bytes came (``None`` or 0: no limit), and whatever the reader
    raises when the connection ends first.
    """
    pieces: list[bytes] = []
    size = 0
    # The two bytes before what is read next; DATA's own CRLF comes first.
    tail = b"\r\n"
    while True:
        try:
            piece = await reader.readuntil(_DOT_CRLF)
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the reader's limit: take what cannot hold one.
            piece = await reader.read(exc.consumed)
        else:
            before = (tail + piece[:-3])[-2:]
            if before == b"\r\n":
                piece = piece[:-3]
                size += len(piece)
                if limit and size > limit:
                    raise TooMuchData
                pieces.append(piece)
                return b"".join(pieces)
        size += len(piece)
        tail = (tail + piece)[-2:]
        if limit and size > limit:
            pieces.clear()  # keep reading to the end, but keep nothing
        else:
            pieces.append(piece)


def unstuff(raw: bytes) -> bytes:
    """The message from raw DATA: dots unstuffed after any line end, CRLF line ends only."""
    if raw.startswith(b".") or b"\n." in raw:
        raw = _STUFFED_DOT.sub(b"", raw)
    if _BARE_LF.search(raw) is not None:
        raw = _BARE_LF.sub(b"\r\n", raw)
    return raw
