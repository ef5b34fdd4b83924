"""A message as it goes on the wire to the next hop: CRLF line ends, no line over 998 octets.

Clients (web applications above all) submit lines longer than SMTP's 998
octets; the gateway accepts them (SPEC §3) and, like Postfix's
``smtp_line_length_limit``, breaks them on delivery so that a strict next
hop takes the message. A break keeps every byte of the line:

- where the line has a space or a tab within the limit, the line is broken
  before the last such one (a fold: for a header, or a MIME part's header
  inside the body, unfolding gives the line back exactly);
- where it has none (base64, long URLs, minified HTML), CRLF SPACE is
  inserted as Postfix does, "to minimize the damage to MIME formatted
  mail", never inside a UTF-8 character or a quoted-printable ``=XX``.

Line ends become CRLF the way aiosmtplib would convert them while sending
(a bare CR or LF is a line end), so the size declared with ``SIZE=`` is the
size sent. The result of :func:`for_delivery` is a fixed point: applying it
again changes nothing, so anything that must see the delivered bytes (a
signature) can apply it first.
"""

from __future__ import annotations

import re

LINE_LIMIT = 998  # octets, without the CRLF (RFC 5321 §4.5.3.1.6)

# The same rule as aiosmtplib's LINE_ENDINGS_REGEX.
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_LONE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_WHITESPACE = (b" ", b"\t")


def for_delivery(message: bytes, limit: int = LINE_LIMIT) -> bytes:
    """``message`` with CRLF line ends only, ending in CRLF, and no line longer than ``limit``."""
    if _LONE_CR_OR_LF.search(message) is not None:
        message = _LINE_END.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if len(message) <= limit:
        return message
    lines = message.split(b"\r\n")
    if max(map(len, lines)) <= limit:
        return message
    return b"\r\n".join(piece for line in lines for piece in break_line(line, limit))


def break_line(line: bytes, limit: int = LINE_LIMIT) -> list[bytes]:
    """``line`` as pieces of at most ``limit`` octets (joined with CRLF on the wire)."""
    pieces: list[bytes] = []
    while len(line) > limit:
        cut = max(line.rfind(space, 1, limit + 1) for space in _WHITESPACE)
        if cut > 0 and line[:cut].strip(b" \t"):
            pieces.append(line[:cut])
            line = line[cut:]  # starts with the space or tab: a continuation
            continue
        cut = _hard_cut(line, limit)
        pieces.append(line[:cut])
        line = b" " + line[cut:]
    pieces.append(line)
    return pieces


def _hard_cut(line: bytes, limit: int) -> int:
    """Where to cut ``line`` (longer than ``limit``) with no whitespace to fold at."""
    cut = limit
    # Not between the bytes of one UTF-8 character (continuation bytes are 10xxxxxx).
    while cut > limit - 3 and 0x80 <= line[cut] < 0xC0:
        cut -= 1
    if 0x80 <= line[cut] < 0xC0:
        cut = limit  # not UTF-8 after all: any cut is as good as another
    # Not inside a quoted-printable escape.
    escape = line.rfind(b"=", cut - 2, cut)
    if escape > 0:
        cut = escape
    return cut
