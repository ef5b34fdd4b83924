"""Delivery status notifications (RFC 3464) for recipients that failed for good.

A DSN is a ``multipart/report; report-type=delivery-status`` message from
the null sender with three parts: a human-readable explanation, the
``message/delivery-status`` fields (one per-message group, one group per
failed recipient) and the original message's header (``text/rfc822-headers``,
RFC 6522), never its body. It is queued like any other message, from ``<>``
to the original envelope sender, so a DSN that cannot be delivered produces
no further DSN (RFC 5321 §6.1: no loops).
"""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Sequence

from worker.delivery.result import Result
from worker.headers import header_end
from worker.spool import SpoolRecord

# The original header is returned so the sender can tell which message it
# was; a runaway header must not make the DSN itself undeliverable.
_MAX_HEADER_BYTES = 64 * 1024
_CRLF = b"\r\n"


def _crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)


def original_header(message: bytes) -> bytes:
    """The header block of ``message`` with CRLF line ends, bounded in size."""
    bounds = header_end(message, _MAX_HEADER_BYTES + 4)
    if bounds is not None:
        return _crlf(message[: bounds[0]]) + _CRLF
    head = message[:_MAX_HEADER_BYTES]
    # Cut at a line end so no header is left half-written.
    cut = head.rfind(b"\n")
    return _crlf(head[: cut + 1] if cut >= 0 else head).rstrip(_CRLF) + _CRLF


def _address_type(address: str) -> str:
    # RFC 6533: an internationalised address is reported with type utf-8.
    return "rfc822" if address.isascii() else "utf-8"


def _field_value(text: str) -> str:
    return " ".join(text.split())


def _status_fields(record: SpoolRecord, failed: Sequence[tuple[str, Result]], hostname: str,
                   now: float) -> str:
    lines = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Sendguard-Queue-ID: {record.queue_id}",
        f"Arrival-Date: {email.utils.formatdate(record.received_at)}",
        "",
    ]
    for rcpt, result in failed:
        lines.append(f"Final-Recipient: {_address_type(rcpt)}; {rcpt}")
        lines.append("Action: failed")
        lines.append(f"Status: {result.status_code}")
        if result.remote_mta:
            lines.append(f"Remote-MTA: dns; {result.remote_mta}")
        if result.code is not None:
            lines.append(f"Diagnostic-Code: smtp; {result.code} {_field_value(result.reply)}")
        else:
            lines.append(f"Diagnostic-Code: X-Sendguard; {_field_value(result.detail)}")
        lines.append(f"Last-Attempt-Date: {email.utils.formatdate(now)}")
        lines.append("")
    return "\r\n".join(lines)


def _explanation(record: SpoolRecord, failed: Sequence[tuple[str, Result]], hostname: str,
                 expired_after: str | None) -> str:
    arrival = email.utils.formatdate(record.received_at)
    lines = [
        f"This is the mail delivery system at {hostname}.",
        "",
        f"Your message sent on {arrival}",
        f"(queue id {record.queue_id}) could not be delivered to the recipients below.",
    ]
    if expired_after:
        lines += ["", f"The message stayed in the queue for {expired_after}, the longest time",
                  "allowed, without the recipient's mail server accepting it."]
    lines += ["", "The original message's header is attached; its text is not.", ""]
    for rcpt, result in failed:
        lines.append(f"<{rcpt}>: {result.detail}")
    return "\r\n".join(lines) + "\r\n"


def build_dsn(record: SpoolRecord, failed: Sequence[tuple[str, Result]], *, hostname: str,
              now: float, queue_id: str, expired_after: str | None = None) -> bytes:
    """The DSN for ``failed`` (recipient, result) pairs of ``record``, as message bytes."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}"  # RFC 2046: at most 70 characters
    explanation = _explanation(record, failed, hostname, expired_after).encode("utf-8")
    status = _status_fields(record, failed, hostname, now).encode("utf-8")
    headers = original_header(record.message)
    text_cte = "7bit" if explanation.isascii() else "8bit"
    status_cte = "7bit" if status.isascii() else "8bit"
    headers_cte = "7bit" if headers.isascii() else "8bit"
    subject = ("Undelivered Mail Returned to Sender" if not expired_after
               else "Undelivered Mail Returned to Sender (expired)")
    head = "\r\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{record.mail_from}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{queue_id}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]).encode("utf-8")
    delimiter = b"--" + boundary.encode("ascii")
    parts = [
        head,
        delimiter,
        b"Content-Description: Notification",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: " + text_cte.encode(),
        b"",
        explanation,
        delimiter,
        b"Content-Description: Delivery report",
        b"Content-Type: message/delivery-status",
        b"Content-Transfer-Encoding: " + status_cte.encode(),
        b"",
        status,
        delimiter,
        b"Content-Description: Undelivered Message Headers",
        b"Content-Type: text/rfc822-headers",
        b"Content-Transfer-Encoding: " + headers_cte.encode(),
        b"",
        headers,
        delimiter + b"--",
        b"",
    ]
    return _CRLF.join(parts)


def bounce_record(record: SpoolRecord, failed: Sequence[tuple[str, Result]], *, hostname: str,
                  now: float, expired_after: str | None = None) -> SpoolRecord:
    """A spool record carrying the DSN: from ``<>`` to the original envelope sender.

    It keeps the original's client address and account for the logs; being
    from the null sender, it is never counted against that client.
    """
    dsn = SpoolRecord.new(
        session_id=record.session_id,
        client_ip=record.client_ip,
        account=record.account,
        helo=hostname,
        mail_from="",
        rcpt_tos=[record.mail_from],
        message=b"",
        received_at=now,
    )
    dsn.message = build_dsn(record, failed, hostname=hostname, now=now, queue_id=dsn.queue_id,
                            expired_after=expired_after)
    return dsn
