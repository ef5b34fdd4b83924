"""Where a message's header section ends: the first empty line (RFC 5322 §2.1).

Every part that looks at the header (the gateway's own headers, the
built-in content scan and its MIME parts, the header a bounce quotes) asks
this one function, so they agree on a message whose lines end in bare LF,
or in both kinds (the gateway stores CRLF, but a MIME part may hold
anything).
"""

from __future__ import annotations

import re

_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


def header_end(message: bytes, limit: int | None = None) -> tuple[int, int] | None:
    """``(end of the header, start of the body)``, or None when no empty line comes
    within the first ``limit`` bytes.

    The header ends before the line end of its last line; the body starts after
    the empty line. A message that starts with an empty line has no header:
    ``(0, start of the line after it)``."""
    if message.startswith((b"\n", b"\r\n")):
        return 0, message.index(b"\n") + 1
    found = _EMPTY_LINE.search(message, 0, len(message) if limit is None else limit)
    return None if found is None else (found.start(), found.end())


def after_last_header_line(message: bytes, limit: int | None = None) -> int:
    """The offset just past the line end of the last header line (where a header
    line can be added), 0 when there is no header, and the whole length for a
    message that is all header, ending with a line end."""
    bounds = header_end(message, limit)
    if bounds is None:
        return len(message) if message.endswith(b"\n") else 0
    end = bounds[0]
    if end == 0:
        return 0
    return end + (2 if message.startswith(b"\r\n", end) else 1)


def header_section(message: bytes) -> bytes:
    """The header lines of ``message`` (without the empty line); all of it when it has no
    empty line."""
    bounds = header_end(message)
    return message if bounds is None else message[:bounds[0]]
