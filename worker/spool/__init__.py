"""Durable message spool of one worker; see ``store`` for the entry points."""

from __future__ import annotations

from .record import CorruptRecord, SpoolRecord, decode, encode, new_queue_id
from .store import (
    BaseSpool,
    FileSpool,
    SegmentSpool,
    Spool,
    SpoolError,
    SpoolLocked,
    SpoolWriteError,
)

__all__ = [
    "BaseSpool",
    "CorruptRecord",
    "FileSpool",
    "SegmentSpool",
    "Spool",
    "SpoolError",
    "SpoolLocked",
    "SpoolRecord",
    "SpoolWriteError",
    "decode",
    "encode",
    "new_queue_id",
]
