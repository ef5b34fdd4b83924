"""When a full rate-limit window lets the next message in, for the refusal's decision line.

A refused client (and ``sendguard why``) is told when to try again: the
time the oldest counts of the full window leave it, by the owner's rows
(``inspect``). A burst of refusals of one counter asks its owner once: the
answer is kept for a few seconds (a reset or a released reservation can
move it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.counting import Op
from worker.counters.client import CounterClient, CounterUnavailable

_KEPT = 10_000
_KEPT_FOR = 5.0


class LimitClears:
    def __init__(self, counters: CounterClient, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self.clock = clock
        # (key, series, window) -> (when the window lets the next one in, when that was asked)
        self._known: dict[tuple[str, str, float], tuple[float, float]] = {}

    async def clears_at(self, op: Op) -> float | None:
        """When enough of ``op``'s full window has passed for ``op.amount`` more to fit."""
        ident, now = (op.key, op.series, op.window), self.clock()
        known = self._known.get(ident)
        if known is not None and known[0] > now and now - known[1] < _KEPT_FOR:
            return known[0]
        try:
            rows = (await self.counters.inspect([op.key])).get(op.key, [])
        except CounterUnavailable:
            return None
        row = next((row for row in rows if row.get("series") == op.series
                    and row.get("window") == op.window), {})
        clears = fits_again_at(row, op.max or 0, op.amount)
        if clears is None:
            return None
        if len(self._known) >= _KEPT:
            self._known.clear()
        self._known[ident] = (float(clears), now)
        return float(clears)


def fits_again_at(row: dict[str, object], limit: int, amount: int) -> float | None:
    """When enough of a full window's oldest counts have left it for ``amount`` more to fit
    under ``limit``, from an owner's row (``CounterShard.rows``)."""
    buckets = row.get("buckets")
    count = row.get("count")
    if not isinstance(buckets, list) or not isinstance(count, int):
        clears = row.get("clears_at")  # an owner that does not list its buckets
        return float(clears) if isinstance(clears, (int, float)) else None
    excess = count + amount - limit
    for ends_at, n in buckets:
        excess -= n
        if excess <= 0:
            return float(ends_at)
    return None  # it can never fit (a message larger than the limit)
