"""Every reply of SPEC §2, to the letter; ``{sid}`` and friends are filled in per use."""

from __future__ import annotations

AUTH_REQUIRED = "550 5.1.0 {sid} authentication failed"
AUTH_FAILED = "535 5.7.8 {sid} authentication failed"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_THROTTLED = "454 4.7.0 {sid} too many authentication failures, try later"
AUTH_OK = "235 2.7.0 Authentication successful"
SENDER_REJECTED = "550 5.1.0 <{sender}> sender rejected"
POLICY_VIOLATION = "550 5.1.0 {sid} policy violation"
INVALID_DESTINATION = "550 5.1.1 {sid} invalid destination domains"
DESTINATION_TEMPFAIL = "451 4.4.3 {sid} destination domain lookup failed, try later"
SPAM_DETECTED = "550 5.1.0 {sid} spam detected"
SCAN_UNAVAILABLE = "451 4.7.1 {sid} content scan unavailable, try later"
POLICY_TEMPFAIL = "451 4.3.0 {sid} temporary policy failure, try later"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
SPOOL_TEMPFAIL = "451 4.3.0 {sid} temporary failure, try later"
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
BAD_ADDRESS = "501 5.1.3 {sid} bad address syntax"
INTERNAL_ERROR = "451 4.3.0 {sid} temporary failure, try later"
TOO_MANY_CONNECTIONS = "421 4.7.0 {sid} too many connections from your address, try later"
TIMEOUT = "421 4.4.2 {sid} timeout, closing connection"
TOO_MANY_ERRORS = "421 4.7.0 {sid} too many errors, closing connection"
SHUTTING_DOWN = "421 4.3.2 {sid} service shutting down"
BANNER_IDENT = "ESMTP sendguard {sid}"

# Replies of our own, for situations SPEC §2 does not name.
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"
UNKNOWN_COMMAND = "500 5.5.2 {sid} command not recognized"
LINE_TOO_LONG = "500 5.5.2 {sid} line too long"


class Decided(str):
    """A reply whose decision line the engine has written (the SMTP layer logs the others)."""

    __slots__ = ()


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to echo in a reply: no control characters, no bytes that are not UTF-8."""
    if text.isprintable() and text.isascii() and len(text) <= limit:
        return text
    cleaned = "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else "?"
                      for c in text[:limit])
    return cleaned
