"""A trailing-window counter for one (key, series, window).

Time is cut into buckets of `window / SLOTS` seconds, numbered
`floor(t / width)`. A bucket stays counted until its end is at least a full
window in the past, so the counted span is between `window` and
`window + width` long: the estimate can only be high, which makes a limit
under-admit by at most one bucket's worth of time, never over-admit.
"""

from __future__ import annotations

import math

# SPEC §3 allows buckets of at most 1/60 of the window.
SLOTS = 60


def bucket_index(window: float, t: float) -> int:
    """The bucket holding time `t` in a window of `window` seconds."""
    return math.floor(t / (window / SLOTS))


def oldest_counted(window: float, now: float) -> int:
    """Index of the oldest bucket still counted at `now`."""
    return math.floor(now / (window / SLOTS)) - SLOTS


class TrailingWindow:
    __slots__ = ("window", "width", "buckets", "total", "max", "_low")

    def __init__(self, window: float) -> None:
        self.window = window
        self.width = window / SLOTS
        # Sparse on purpose: most keys see a few messages, not one per bucket.
        self.buckets: dict[int, int] = {}
        self.total = 0
        self.max: int | None = None  # the limit of the latest decision that counted here
        self._low = -math.inf  # oldest bucket index still kept, as of the last prune

    def index(self, t: float) -> int:
        return math.floor(t / self.width)

    def count(self, now: float) -> int:
        # Same arithmetic as oldest_counted(), without the call on the hot path.
        low = math.floor(now / self.width) - SLOTS
        if low > self._low:
            self._prune(low)
        return self.total

    def add(self, index: int, amount: int) -> int:
        """Add `amount` (possibly negative) to bucket `index`, never below zero.

        Returns the change actually applied, so a caller can undo exactly it.
        """
        buckets = self.buckets
        old = buckets.get(index, 0)
        new = old + amount
        if new <= 0:
            if old:
                del buckets[index]
            self.total -= old
            return -old
        buckets[index] = new
        self.total += amount
        return amount

    def merge_max(self, index: int, value: int) -> None:
        old = self.buckets.get(index, 0)
        if value > old:
            self.buckets[index] = value
            self.total += value - old

    def clears_at(self, now: float, limit: int | None = None) -> float | None:
        """When one more fits under `limit` (at or over it), otherwise when the
        oldest counted bucket stops being counted; None if empty."""
        left = self.count(now)
        if not left:
            return None
        order = sorted(self.buckets)
        if limit is None or left + 1 <= limit:
            return (order[0] + SLOTS + 1) * self.width
        for index in order:
            left -= self.buckets[index]
            if left + 1 <= limit:
                return (index + SLOTS + 1) * self.width
        return (order[-1] + SLOTS + 1) * self.width

    def ends_at(self, index: int) -> float:
        """When bucket `index` stops being counted."""
        return (index + SLOTS + 1) * self.width

    def _prune(self, low: int) -> None:
        self._low = low
        stale = [i for i in self.buckets if i < low]
        for i in stale:
            self.total -= self.buckets.pop(i)
