"""Reading segment files: frames back to back, with resynchronisation.

A segment is a run of frames (see ``record``). A damaged frame cannot be
skipped by its length, since the length may be what is damaged, so the
reader looks for the next magic line and accepts a frame there only if its
checksum holds. One bad byte thus costs one frame, not the rest of the
segment: the frames after it were acknowledged too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .record import MAGIC, CorruptRecord, Removal, SpoolRecord, decode_at


@dataclass(slots=True)
class Entry:
    item: SpoolRecord | Removal
    start: int
    end: int


@dataclass(slots=True)
class Scan:
    entries: list[Entry] = field(default_factory=list)
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # start, end, reason


def scan(data: bytes) -> Scan:
    out = Scan()
    pos = 0
    while pos < len(data):
        try:
            item, end = decode_at(data, pos)
        except CorruptRecord as exc:
            nxt = data.find(MAGIC, pos + 1)
            while nxt != -1:
                try:
                    decode_at(data, nxt)
                    break
                except CorruptRecord:
                    nxt = data.find(MAGIC, nxt + 1)
            stop = len(data) if nxt == -1 else nxt
            out.bad.append((pos, stop, exc.reason))
            pos = stop
            continue
        out.entries.append(Entry(item, pos, end))
        pos = end
    return out


def replay(scans: Iterable[Scan]) -> dict[str, SpoolRecord]:
    """The live records after applying the scans' entries in order."""
    live: dict[str, SpoolRecord] = {}
    for sc in scans:
        for e in sc.entries:
            if isinstance(e.item, Removal):
                live.pop(e.item.queue_id, None)
            else:
                live[e.item.queue_id] = e.item
    return live
