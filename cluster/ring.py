"""Which worker owns a counter key: a consistent-hash ring with virtual nodes.

Pure and deterministic: every process that builds a ring from the same
member names gets the same answers, whatever the order the names came in
and whatever the interpreter's hash seed (blake2b, not Python's seeded string hash).

Each member is placed at ``vnodes`` points on a 64-bit circle. A key belongs
to the first point at or after its own hash, going clockwise; its replica is
the member of the next point that belongs to a different member. That
choice is what makes failover safe: when an owner leaves the ring, every key
it owned falls to the next point of another member, which is exactly the
replica that already holds the key's counts.

A key is placed by its subject, the part after its kind (``ip:``,
``spam:``, ``bounce:``, ``auth-fail:`` of one address share ``127.0.0.5``):
the keys of one client address live with one owner, so a decision touches
at most one owner per subject instead of one per key.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence

DEFAULT_VNODES = 128


def point(text: str) -> int:
    """The position of `text` on the ring."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def subject(key: str) -> str:
    """``"spam:127.0.0.5"`` → ``"127.0.0.5"``; a key without a kind is its own subject."""
    return key.partition(":")[2] or key


class Ring:
    def __init__(self, members: Sequence[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        names = sorted(set(members))
        if any(not name for name in names):
            raise ValueError("ring member names must be non-empty")
        self.members: tuple[str, ...] = tuple(names)
        self.vnodes = vnodes
        # Sorting by (point, name) breaks a 64-bit collision the same way everywhere.
        placed = sorted((point(f"{name}#{i}"), name) for name in names for i in range(vnodes))
        self._points = [p for p, _ in placed]
        self._names = [name for _, name in placed]
        # The replica of each point, computed once: the next point owned by
        # someone else. With one member there is none.
        self._next: list[str | None] = self._next_distinct()

    def _next_distinct(self) -> list[str | None]:
        count = len(self._names)
        if len(self.members) < 2:
            return [None] * count
        result: list[str | None] = [None] * count
        # Walk the circle backwards twice so every point sees a different
        # member ahead of it, including those near the wrap-around.
        ahead: str | None = None
        ahead_name: str | None = None
        for step in range(2 * count - 1, -1, -1):
            name = self._names[step % count]
            if step < count:
                result[step] = ahead if ahead_name == name else ahead_name
            if name != ahead_name:
                ahead, ahead_name = ahead_name, name
        return result

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, name: object) -> bool:
        return name in self.members

    def _slot(self, key: str) -> int:
        if not self._points:
            raise LookupError("the ring has no members")
        index = bisect.bisect_left(self._points, point(subject(key)))
        return 0 if index == len(self._points) else index

    def owner(self, key: str) -> str:
        return self._names[self._slot(key)]

    def replica(self, key: str) -> str | None:
        """The next distinct member clockwise from the owner; None with one member."""
        return self._next[self._slot(key)]

    def locate(self, key: str) -> tuple[str, str | None]:
        """(owner, replica) with one hash of the key."""
        slot = self._slot(key)
        return self._names[slot], self._next[slot]

    def owners(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Keys grouped by owner, each group in the order the keys came."""
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self.owner(key), []).append(key)
        return groups

    def __repr__(self) -> str:
        return f"Ring({list(self.members)!r}, vnodes={self.vnodes})"
