"""Submission duties (RFC 6409 §8): a trace header, and Message-ID/Date when missing."""

from __future__ import annotations

import email.utils
import time

from worker.policies import Client

_HEADER_SCAN_LIMIT = 256 * 1024


def prepare_message(content: bytes, hostname: str, client: Client, queue_id: str,
                    scan_note: str = "", now: float | None = None) -> bytes:
    now = time.time() if now is None else now
    date = email.utils.formatdate(now)
    user = client.account.user if client.account else ""
    received = (
        f"Received: from {_clean(client.helo) or 'unknown'} ([{client.ip}])\r\n"
        f"\tby {hostname} (sendguard) with ESMTPSA id {queue_id}\r\n"
        f"\t(session {client.sid}; authenticated as {_clean(user)});\r\n"
        f"\t{date}\r\n"
    ).encode("utf-8", "surrogateescape")
    head_end = _header_end(content)
    head = content[:head_end].lower()
    added = []
    if not _has_header(head, b"message-id"):
        added.append(f"Message-ID: <{queue_id}@{hostname}>\r\n")
    if not _has_header(head, b"date"):
        added.append(f"Date: {date}\r\n")
    if scan_note:
        added.append(f"X-Spam-Scan: {_clean(scan_note)}\r\n")
    if not added:
        return received + content
    extra = "".join(added).encode("ascii", "replace")
    return received + content[:head_end] + extra + content[head_end:]


def _header_end(content: bytes) -> int:
    """Offset just past the last header line (before the blank line), or 0."""
    limit = content[:_HEADER_SCAN_LIMIT]
    if limit.startswith((b"\r\n", b"\n")):
        return 0
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = limit.find(separator)
        if index >= 0:
            return index + len(separator) // 2
    return len(content) if content.endswith(b"\n") else 0


def _has_header(head: bytes, name: bytes) -> bool:
    return head.startswith(name + b":") or (b"\n" + name + b":") in head


def _clean(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:200]
