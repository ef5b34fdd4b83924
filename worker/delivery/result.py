"""What one delivery attempt says about one recipient.

A :class:`Result` is what the queue manager records in the spool (as the
recipient's ``status`` and ``last_error``) and what a delivery status
notification reports (Status, Remote-MTA, Diagnostic-Code). The text of
``last_error`` follows Postfix's habit of naming the host and the command
the reply answered, because that is what support staff paste into tickets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.spool.record import Status

DELIVERED = Status.DELIVERED
DEFERRED = Status.DEFERRED
BOUNCED = Status.BOUNCED

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
# A reply text is the server's to choose; keep the spool record and the DSN
# line bounded whatever it sends.
_MAX_TEXT = 400


@dataclass(frozen=True, slots=True)
class Result:
    """One recipient's outcome: ``status`` is delivered, deferred or bounced.

    ``code`` and ``reply`` are set when a remote server answered, ``host``
    names it (``mx.example.org[192.0.2.1]``) and ``stage`` says which command
    the answer was to. ``status_code`` is the RFC 3463 code for a DSN.
    """

    status: Status
    detail: str
    code: int | None = None
    reply: str = ""
    host: str | None = None
    stage: str | None = None
    enhanced: str | None = None

    @property
    def status_code(self) -> str:
        if self.enhanced:
            return self.enhanced
        if self.code is not None and 200 <= self.code < 600:
            return f"{self.code // 100}.0.0"
        return {DELIVERED: "2.0.0", BOUNCED: "5.0.0"}.get(self.status, "4.0.0")

    @property
    def remote_mta(self) -> str | None:
        """The host name a DSN's Remote-MTA field names, without the address."""
        if self.host is None:
            return None
        return self.host.split("[", 1)[0] or None

    def expired(self, queued_for: str) -> Result:
        """This deferral turned final because the message was queued too long."""
        return Result(BOUNCED, f"message expired after {queued_for} in the queue; "
                      f"last error: {self.detail}", self.code, self.reply, self.host,
                      self.stage, self.enhanced or "4.4.7")


def classify(code: int) -> Status:
    """2xx delivered, 5xx bounced; anything else (4xx, nonsense) is retried."""
    if 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600:
        return BOUNCED
    return DEFERRED


def clean_reply(text: str) -> str:
    """One line, printable, bounded: a reply as it goes into logs and DSNs."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not joined.isprintable():
        joined = "".join(c if c.isprintable() else "?" for c in joined)
    return joined[:_MAX_TEXT]


def remote(code: int, message: str, host: str, stage: str) -> Result:
    """A result from a server's reply to ``stage`` ("MAIL FROM", "RCPT TO", ...)."""
    reply = clean_reply(message)
    match = _ENHANCED.match(reply)
    enhanced = match.group(0) if match and match.group(1) == str(code)[0] else None
    return Result(classify(code), f"{host} said: {code} {reply} (in reply to {stage})",
                  code, reply, host, stage, enhanced)


def local(status: Status, detail: str, enhanced: str) -> Result:
    """A result decided here (DNS, connection, size, SMTPUTF8), not by a server."""
    return Result(status, clean_reply(detail), enhanced=enhanced)


def duration_text(seconds: float) -> str:
    """``432000`` → ``"5 days"``; for the expiry message and the DSN text."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size, 1)
            count_text = f"{count:g}"
            return f"{count_text} {unit}{'' if count_text == '1' else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"
