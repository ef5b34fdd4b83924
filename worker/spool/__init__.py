"""Durable message spool of one worker; see ``store`` for the entry points."""

from __future__ import annotations

from .base import BaseSpool, SpoolError, SpoolLocked, SpoolWriteError
from .record import CorruptRecord, Recipient, SpoolRecord, Status, decode, encode, new_queue_id
from .segspool import SegmentSpool
from .store import Spool

__all__ = [
    "BaseSpool",
    "CorruptRecord",
    "SegmentSpool",
    "Recipient",
    "Spool",
    "SpoolError",
    "SpoolLocked",
    "SpoolRecord",
    "SpoolWriteError",
    "Status",
    "decode",
    "encode",
    "new_queue_id",
]
