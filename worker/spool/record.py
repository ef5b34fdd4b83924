"""Self-describing spool records.

One frame on disk::

    b"sendguard-spool/1\\n"          magic line; the digit is the format version
    u32 big-endian                   length of the msgpack header
    msgpack map                      the header (below)
    body                             ``header["size"]`` bytes
    b"END " + 32 hex digits + b"\\n"  blake2b-128 of every byte before "END "

A frame is valid only if its END marker is present and its checksum matches,
so a torn write (crash mid-write, disk full, RLIMIT_FSIZE) is never mistaken
for a record: like Postfix's queue files, no END, no message.

Two kinds of frame share the layout. ``kind = "msg"`` carries a whole
message and its delivery state (a record file holds exactly one of these);
``kind = "del"`` is a tombstone with an empty body, used only inside the
segment log.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

FORMAT_VERSION = 1
MAGIC = b"sendguard-spool/%d\n" % FORMAT_VERSION
_MAGIC_PREFIX = b"sendguard-spool/"
_LEN = struct.Struct(">I")
_END = b"END "
_DIGEST_SIZE = 16
_END_LEN = len(_END) + 2 * _DIGEST_SIZE + 1
# A header holds the envelope, so it is small; anything larger means the
# length field itself is damaged.
_MAX_HEADER = 16 * 1024 * 1024

STATUSES = frozenset({"pending", "delivered", "deferred", "bounced"})
FINAL_STATUSES = frozenset({"delivered", "bounced"})

QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TIME_DIGITS = 11  # 62**11 > 2**64 ns, good until the year 2554
_RAND_DIGITS = 11  # 64 random bits


class CorruptRecord(ValueError):
    """Bytes that are not a complete, intact spool frame."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def new_queue_id() -> str:
    """22 characters of [0-9A-Za-z]: nanosecond time then 64 random bits.

    The alphabet is in ASCII order and the width is fixed, so ids sort by
    creation time; the random part keeps them unique across workers, hosts
    and restarts without any coordination.
    """
    return _b62(time.time_ns(), _TIME_DIGITS) + _b62(secrets.randbits(64), _RAND_DIGITS)


def is_queue_id(value: object) -> bool:
    return isinstance(value, str) and QUEUE_ID_RE.fullmatch(value) is not None


@dataclass(slots=True)
class SpoolRecord:
    """A queued message and its delivery state.

    ``recipients`` holds one dict per envelope recipient:
    ``{"rcpt": str, "status": "pending"|"delivered"|"deferred"|"bounced",
    "last_error": str | None}``.
    """

    queue_id: str
    session_id: str
    client_ip: str
    account: str
    helo: str
    mail_from: str
    rcpt_tos: list[str]
    message: bytes
    received_at: float
    attempts: int = 0
    next_attempt: float = 0.0
    recipients: list[dict[str, Any]] = field(default_factory=list)
    # Whether delivery has counted this message as undeliverable against its
    # client's bounce ratio (SPEC §3.6), so it is counted once and uncounted
    # once; kept on disk so a restart neither forgets nor repeats the mark.
    counted_undeliverable: bool = False
    # Held by the operator (``sendguard queue hold``): not attempted until released;
    # kept on disk, so a hold survives a restart.
    held: bool = False

    @classmethod
    def new(
        cls,
        *,
        session_id: str,
        client_ip: str,
        account: str,
        helo: str,
        mail_from: str,
        rcpt_tos: Iterable[str],
        message: bytes,
        received_at: float | None = None,
        queue_id: str | None = None,
    ) -> SpoolRecord:
        """A fresh record: new queue id, every recipient pending, due now."""
        now = time.time() if received_at is None else received_at
        rcpts = list(rcpt_tos)
        return cls(
            queue_id=queue_id or new_queue_id(),
            session_id=session_id,
            client_ip=client_ip,
            account=account,
            helo=helo,
            mail_from=mail_from,
            rcpt_tos=rcpts,
            message=bytes(message),
            received_at=now,
            attempts=0,
            next_attempt=now,
            recipients=[{"rcpt": r, "status": "pending", "last_error": None} for r in rcpts],
        )

    @property
    def done(self) -> bool:
        """Every recipient has a final outcome; the record can be removed."""
        return all(r["status"] in FINAL_STATUSES for r in self.recipients)


@dataclass(frozen=True, slots=True)
class Removal:
    """A tombstone read back from the segment log."""

    queue_id: str


def _frame(header: dict[str, Any], body: bytes | memoryview) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    head = MAGIC + _LEN.pack(len(packed)) + packed
    h.update(head)
    h.update(body)
    return b"".join((head, body, _END, h.hexdigest().encode("ascii"), b"\n"))


def encode(record: SpoolRecord) -> bytes:
    """The record as one ``kind = "msg"`` frame.

    Raises ValueError for a record that decode() would refuse: writing it
    would acknowledge a message only to quarantine it at the next start.
    """
    try:
        numbers = (float(record.received_at), int(record.attempts), float(record.next_attempt))
    except (TypeError, ValueError):
        raise ValueError("received_at, attempts and next_attempt must be numbers") from None
    if not isinstance(record.message, bytes | bytearray | memoryview):
        raise ValueError("message must be bytes")
    header = {
        "v": FORMAT_VERSION,
        "kind": "msg",
        "queue_id": record.queue_id,
        "session_id": record.session_id,
        "client_ip": record.client_ip,
        "account": record.account,
        "helo": record.helo,
        "mail_from": record.mail_from,
        "rcpt_tos": list(record.rcpt_tos) if isinstance(record.rcpt_tos, list | tuple) else None,
        "received_at": numbers[0],
        "attempts": numbers[1],
        "next_attempt": numbers[2],
        "recipients": (
            [dict(r) if isinstance(r, dict) else r for r in record.recipients]
            if isinstance(record.recipients, list | tuple)
            else None
        ),
        "size": len(record.message),
    }
    # Written only when set: frames without the field (older writers) read
    # back as False, and readers that predate it ignore it.
    if record.counted_undeliverable:
        header["undeliverable"] = True
    if record.held:
        header["held"] = True
    problem = _header_problem(header)
    if problem is not None:
        raise ValueError(problem)
    return _frame(header, record.message)


def encode_removal(queue_id: str) -> bytes:
    """A tombstone frame for the segment log."""
    if not is_queue_id(queue_id):
        raise ValueError(f"bad queue id {queue_id!r}")
    return _frame({"v": FORMAT_VERSION, "kind": "del", "queue_id": queue_id, "size": 0}, b"")


_STR_FIELDS = ("queue_id", "session_id", "client_ip", "account", "helo", "mail_from")


def _header_problem(header: dict[Any, Any]) -> str | None:
    for name in _STR_FIELDS:
        if not isinstance(header.get(name), str):
            return f"header field {name} missing or not a string"
    if not is_queue_id(header["queue_id"]):
        return f"bad queue id {header['queue_id']!r}"
    rcpt_tos = header.get("rcpt_tos")
    if not isinstance(rcpt_tos, list) or not all(isinstance(r, str) for r in rcpt_tos):
        return "header field rcpt_tos is not a list of strings"
    for name in ("received_at", "next_attempt"):
        if not isinstance(header.get(name), float):
            return f"header field {name} missing or not a float"
    attempts = header.get("attempts")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        return "header field attempts is not a count"
    recipients = header.get("recipients")
    if not isinstance(recipients, list):
        return "header field recipients is not a list"
    for r in recipients:
        if (
            not isinstance(r, dict)
            or set(r) != {"rcpt", "status", "last_error"}
            or not isinstance(r["rcpt"], str)
            or r["status"] not in STATUSES
            or not (r["last_error"] is None or isinstance(r["last_error"], str))
        ):
            return f"bad recipient state {r!r}"
    if not isinstance(header.get("undeliverable", False), bool):
        return "header field undeliverable is not a boolean"
    if not isinstance(header.get("held", False), bool):
        return "header field held is not a boolean"
    return None


def _record_from(header: dict[Any, Any], body: bytes) -> SpoolRecord:
    problem = _header_problem(header)
    if problem is not None:
        raise CorruptRecord(problem)
    return SpoolRecord(
        queue_id=header["queue_id"],
        session_id=header["session_id"],
        client_ip=header["client_ip"],
        account=header["account"],
        helo=header["helo"],
        mail_from=header["mail_from"],
        rcpt_tos=header["rcpt_tos"],
        message=body,
        received_at=header["received_at"],
        attempts=header["attempts"],
        next_attempt=header["next_attempt"],
        recipients=header["recipients"],
        counted_undeliverable=header.get("undeliverable", False),
        held=header.get("held", False),
    )


def decode_at(data: bytes | memoryview, offset: int = 0) -> tuple[SpoolRecord | Removal, int]:
    """Decode the frame starting at ``offset``; return it and the offset after it."""
    view = memoryview(data)
    end_of_data = len(view)
    pos = offset
    if bytes(view[pos : pos + len(_MAGIC_PREFIX)]) != _MAGIC_PREFIX:
        raise CorruptRecord("no magic line")
    nl = bytes(view[pos : pos + 32]).find(b"\n")
    if nl < 0:
        raise CorruptRecord("magic line not terminated")
    magic = bytes(view[pos : pos + nl + 1])
    if magic != MAGIC:
        raise CorruptRecord(f"unsupported format {magic[:-1]!r}")
    pos += len(MAGIC)
    if pos + _LEN.size > end_of_data:
        raise CorruptRecord("truncated before header length")
    (hlen,) = _LEN.unpack_from(view, pos)
    pos += _LEN.size
    if hlen > _MAX_HEADER or pos + hlen > end_of_data:
        raise CorruptRecord("truncated header")
    try:
        header = msgpack.unpackb(view[pos : pos + hlen], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptRecord(f"unreadable header: {exc}") from None
    pos += hlen
    if not isinstance(header, dict):
        raise CorruptRecord("header is not a map")
    size = header.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CorruptRecord("header field size missing or bad")
    body_end = pos + size
    if body_end + _END_LEN > end_of_data:
        raise CorruptRecord("truncated body or missing END marker")
    marker = bytes(view[body_end : body_end + _END_LEN])
    if not marker.startswith(_END) or not marker.endswith(b"\n"):
        raise CorruptRecord("missing END marker")
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(view[offset:body_end])
    if marker[len(_END) : -1] != h.hexdigest().encode("ascii"):
        raise CorruptRecord("checksum mismatch")
    if header.get("v") != FORMAT_VERSION:
        raise CorruptRecord(f"header version {header.get('v')!r} does not match magic line")
    kind = header.get("kind")
    after = body_end + _END_LEN
    if kind == "msg":
        return _record_from(header, bytes(view[pos:body_end])), after
    if kind == "del":
        if not is_queue_id(header.get("queue_id")):
            raise CorruptRecord("tombstone without a valid queue id")
        return Removal(header["queue_id"]), after
    raise CorruptRecord(f"unknown frame kind {kind!r}")


def decode(data: bytes | memoryview) -> SpoolRecord:
    """Decode a record file: exactly one ``kind = "msg"`` frame, nothing after it."""
    entry, end = decode_at(data, 0)
    if not isinstance(entry, SpoolRecord):
        raise CorruptRecord("a record file holds a tombstone")
    if end != len(data):
        raise CorruptRecord(f"{len(data) - end} bytes after the END marker")
    return entry
