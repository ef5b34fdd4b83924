"""Submission duties (RFC 6409 §8): a trace header, and Message-ID/Date when missing.

Also the content scan's outcome, as ``X-Spam-*`` headers under the trace
header, so a tenant's mailbox filter (or support staff) can see what the
scanner thought of a message that was delivered anyway.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time

from worker.client import Client
from worker.headers import after_last_header_line
from worker.spam import ScanResult

_HEADER_SCAN_LIMIT = 256 * 1024
_FOLD_AT = 76


def complete_headers(content: bytes, hostname: str, queue_id: str, now: float,
                     sender: str = "") -> bytes:
    """The client's message with From (the envelope sender), Message-ID and Date when missing.

    Done before the content scan, so a scanner does not score the absence of
    headers the gateway adds anyway.
    """
    head_end = after_last_header_line(content, _HEADER_SCAN_LIMIT)
    head = content[:head_end].lower()
    added = []
    if sender and not _has_header(head, b"from"):
        added.append(f"From: <{sender}>\r\n")
    if not _has_header(head, b"message-id"):
        added.append(f"Message-ID: <{queue_id}@{hostname}>\r\n")
    if not _has_header(head, b"date"):
        added.append(f"Date: {email.utils.formatdate(now)}\r\n")
    if not added:
        return content
    extra = "".join(added).encode("utf-8", "surrogateescape")
    return content[:head_end] + extra + content[head_end:]


def trace_headers(hostname: str, client: Client, queue_id: str, spam_header: str = "",
                  now: float | None = None) -> bytes:
    """Our ``Received:`` line, then the ``X-Spam-*`` lines of :func:`spam_headers`.

    The login name stays out (SPEC §3): a recipient must not learn which
    account of the tenant sent the message; support staff find it from the
    session id.
    """
    now = time.time() if now is None else now
    received = (
        f"Received: from {_clean(client.helo) or 'unknown'} ([{client.ip}])\r\n"
        f"\tby {hostname} (sendguard) with ESMTPSA id {queue_id}\r\n"
        f"\t(session {client.sid});\r\n"
        f"\t{email.utils.formatdate(now)}\r\n"
    )
    return received.encode("utf-8", "surrogateescape") + spam_header.encode("ascii", "replace")


def spam_headers(scan: ScanResult, skipped: str = "") -> str:
    """``X-Spam-*`` lines for an accepted message; ``skipped`` is why no scan happened."""
    if skipped:
        return f"X-Spam-Scan: skipped ({_clean(skipped)})\r\n"
    verdict = "yes" if scan.spam else "no"
    fields = [_clean(scan.backend), f"spam={verdict}", f"score={round(scan.score, 3):g}"]
    if scan.action:
        fields.append(f"action={_clean(scan.action)}")
    lines = [f"X-Spam-Scan: {'; '.join(fields)}\r\n"]
    if scan.spam:
        # The flag SpamAssassin writes; Sieve and Dovecot rules commonly test it.
        lines.append("X-Spam-Flag: YES\r\n")
    if scan.symbols:
        lines.append(_folded("X-Spam-Symbols", [_clean(s) for s in scan.symbols]))
    return "".join(lines)


def _folded(name: str, words: list[str]) -> str:
    """``Name: a, b, c`` folded under 78 characters a line (RFC 5322 §2.2.3)."""
    lines: list[str] = []
    line = f"{name}:"
    for index, word in enumerate(words):
        piece = f" {word}" + ("," if index < len(words) - 1 else "")
        if len(line) + len(piece) > _FOLD_AT and line.strip() != f"{name}:":
            lines.append(line)
            line = "\t" + piece.lstrip()
        else:
            line += piece
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def header_fields(content: bytes, names: tuple[bytes, ...]) -> list[str]:
    """The unfolded values of the header fields called ``names``, in order."""
    head = content[:after_last_header_line(content, _HEADER_SCAN_LIMIT)]
    return [_FOLD.sub(b"", match.group(1)).decode("utf-8", "surrogateescape").strip()
            for match in _field_pattern(names).finditer(head)]


@functools.lru_cache(maxsize=8)
def _field_pattern(names: tuple[bytes, ...]) -> re.Pattern[bytes]:
    # A field starts a line; its continuation lines start with a space or a tab.
    alternatives = b"|".join(re.escape(name) for name in names)
    return re.compile(rb"^(?:" + alternatives + rb")[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                      re.IGNORECASE | re.MULTILINE)


_FOLD = re.compile(rb"\r?\n")


def _has_header(head: bytes, name: bytes) -> bool:
    return head.startswith(name + b":") or (b"\n" + name + b":") in head


def _clean(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:200]
