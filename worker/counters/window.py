"""Trailing-window counters, and how a shard keeps a million keys of them small.

Time is cut into buckets of `window / SLOTS` seconds, numbered
`floor(t / width)`. A bucket stays counted until its end is at least a full
window in the past, so the counted span is between `window` and
`window + width` long: the estimate can only be high, which makes a limit
under-admit by at most one bucket's worth of time, never over-admit.

Most keys are client addresses that send a few messages and go quiet, so
`CounterTable` keeps a key's buckets packed in one ``bytes`` object (16
bytes a bucket: which counter, count, bucket index) until it has more than
`PACKED_MAX` of them; a busier key gets one `TrailingWindow` per counter,
which keeps its total and answers without unpacking. Which counter a
packed bucket belongs to is a number standing for (series, window, limit),
shared by the whole table. An object per counter, a dict of buckets each
and a tuple per (series, window) cost about 1,900 bytes a key; packed, a
key with three windows costs about a sixth of that.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Iterator

# SPEC §3 allows buckets of at most 1/60 of the window.
SLOTS = 60

# A key's buckets packed: counter id, count, bucket index.
_BUCKET = struct.Struct("<IIq")
PACKED_MAX = 8

# series, window, limit (None: none known), bucket width
_Info = tuple[str, float, "int | None", float]
# series, window, the limit of the latest decision that counted, {index: count}
Counter = tuple[str, float, "int | None", dict[int, int]]


def bucket_index(window: float, t: float) -> int:
    """The bucket holding time `t` in a window of `window` seconds."""
    return math.floor(t / (window / SLOTS))


def oldest_counted(window: float, now: float) -> int:
    """Index of the oldest bucket still counted at `now`."""
    return math.floor(now / (window / SLOTS)) - SLOTS


def ends_at(width: float, index: int) -> float:
    """When bucket `index` stops being counted."""
    return (index + SLOTS + 1) * width


def clears_at(buckets: dict[int, int], width: float, limit: int | None) -> float | None:
    """When one more fits under `limit` (at or over it), otherwise when the
    oldest counted bucket stops being counted; None if empty. `buckets`
    are the counted ones."""
    left = sum(buckets.values())
    if not left:
        return None
    order = sorted(buckets)
    if limit is None or left + 1 <= limit:
        return ends_at(width, order[0])
    for index in order:
        left -= buckets[index]
        if left + 1 <= limit:
            return ends_at(width, index)
    return ends_at(width, order[-1])


class TrailingWindow:
    """One counter of a busy key."""

    __slots__ = ("window", "width", "buckets", "total", "max", "_low")

    def __init__(self, window: float) -> None:
        self.window = window
        self.width = window / SLOTS
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
        self.count(now)
        return clears_at(self.buckets, self.width, limit)

    def ends_at(self, index: int) -> float:
        """When bucket `index` stops being counted."""
        return ends_at(self.width, index)

    def _prune(self, low: int) -> None:
        self._low = low
        stale = [i for i in self.buckets if i < low]
        for i in stale:
            self.total -= self.buckets.pop(i)


class _Wide:
    """A busy key: one TrailingWindow per (series, window)."""

    __slots__ = ("windows",)

    def __init__(self) -> None:
        self.windows: dict[tuple[str, float], TrailingWindow] = {}


class CounterTable:
    """Every counter of a shard, by key. Keys whose buckets have all left
    their windows are evicted by `sweep`, a few at a time."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes | _Wide] = {}
        self._info: list[_Info] = []
        self._ids: dict[tuple[str, float, int | None], int] = {}
        # (when the key may have nothing left, key): one entry per key, pushed
        # when the key is created and again when it pops still counting.
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def names(self) -> Iterator[str]:
        return iter(list(self._keys))

    def count(self, name: str, series: str, window: float, now: float) -> int:
        entry = self._keys.get(name)
        if entry is None:
            return 0
        if type(entry) is bytes:
            low = math.floor(now / (window / SLOTS)) - SLOTS
            info, total = self._info, 0
            for cid, n, index in _BUCKET.iter_unpack(entry):
                item = info[cid]
                if index >= low and item[0] == series and item[1] == window:
                    total += n
            return total
        counter = entry.windows.get((series, window))  # type: ignore[union-attr]
        return counter.count(now) if counter is not None else 0

    def totals(self, name: str, now: float) -> dict[tuple[str, float], int]:
        """Every counter's count, by (series, window): one look at a packed key."""
        entry = self._keys.get(name)
        if entry is None:
            return {}
        out: dict[tuple[str, float], int] = {}
        if type(entry) is bytes:
            info = self._info
            for cid, n, index in _BUCKET.iter_unpack(entry):
                series, window, _, width = info[cid]
                if index >= math.floor(now / width) - SLOTS:
                    out[(series, window)] = out.get((series, window), 0) + n
        else:
            for ident, counter in entry.windows.items():  # type: ignore[union-attr]
                out[ident] = counter.count(now)
        return out

    def add(self, name: str, series: str, window: float, limit: int | None, index: int,
            amount: int, now: float) -> int:
        """Add `amount` (possibly negative) to a bucket, never below zero; a
        limit given is remembered as the counter's latest. Returns the
        change applied."""
        return self._change(name, [(series, window, limit, index, amount)], now, False)[0]

    def add_many(self, name: str, changes: list[tuple[str, float, int | None, int, int]],
                 now: float) -> list[int]:
        """`add` of several (series, window, limit, index, amount) of one key at once."""
        return self._change(name, changes, now, False)

    def merge_max(self, name: str, series: str, window: float, limit: int | None, index: int,
                  value: int, now: float) -> None:
        """The bucket becomes `value` if that is more (a hand-off, a replica)."""
        self._change(name, [(series, window, limit, index, value)], now, True)

    def counters(self, name: str, now: float) -> list[Counter]:
        """The key's counters with their counted buckets, by (series, window)."""
        entry = self._keys.get(name)
        if entry is None:
            return []
        out: dict[tuple[str, float], Counter] = {}
        if type(entry) is bytes:
            info = self._info
            for cid, n, index in _BUCKET.iter_unpack(entry):
                series, window, limit, width = info[cid]
                if index < math.floor(now / width) - SLOTS:
                    continue
                counter = out.get((series, window))
                if counter is None:
                    counter = out[(series, window)] = (series, window, limit, {})
                counter[3][index] = n
        else:
            for (series, window), wide in entry.windows.items():  # type: ignore[union-attr]
                if wide.count(now):
                    out[(series, window)] = (series, window, wide.max, dict(wide.buckets))
        return [out[ident] for ident in sorted(out)]

    def clear(self, name: str) -> bool:
        """Forget the key; whether it had anything counted."""
        entry = self._keys.pop(name, None)
        return entry is not None and self._until(entry) > -math.inf

    def replace(self, name: str, counters: list[tuple[str, float, int | None,
                                                       list[tuple[int, int]]]]) -> None:
        """The key holds exactly `counters` (series, window, limit, [(index, count)])."""
        buckets = [[self._id(series, window, limit), n, index]
                   for series, window, limit, pairs in counters for index, n in pairs if n > 0]
        entry = self._keys.get(name)
        if not buckets:
            if entry is not None:
                del self._keys[name]
            return
        packed: bytes | _Wide = self._widen(buckets) if len(buckets) > PACKED_MAX else \
            b"".join([_BUCKET.pack(*bucket) for bucket in buckets])
        self._keys[name] = packed
        if entry is None:
            # Replaced in place otherwise: a replica rewrites a busy key on
            # every change, and each new entry here would stay until it expires.
            heapq.heappush(self._heap, (self._until(packed), name))

    def sweep(self, now: float, budget: float) -> tuple[int, float]:
        """Evict keys with nothing counted left; (how many, budget left)."""
        dropped, heap = 0, self._heap
        while budget > 0 and heap and heap[0][0] <= now:
            _, name = heapq.heappop(heap)
            budget -= 1
            entry = self._keys.get(name)
            if entry is None:
                continue
            until = self._until(entry)
            if until <= now:
                del self._keys[name]
                dropped += 1
            else:
                heapq.heappush(heap, (until, name))
        return dropped, budget

    # -- internals -------------------------------------------------------

    def _id(self, series: str, window: float, limit: int | None) -> int:
        ident = (series, window, limit)
        cid = self._ids.get(ident)
        if cid is None:
            cid = self._ids[ident] = len(self._info)
            self._info.append((series, window, limit, window / SLOTS))
        return cid

    def _until(self, entry: bytes | _Wide) -> float:
        """When the key's newest bucket stops counting (-inf when empty)."""
        until = -math.inf
        if type(entry) is bytes:
            info = self._info
            for cid, _, index in _BUCKET.iter_unpack(entry):
                until = max(until, ends_at(info[cid][3], index))
        else:
            for counter in entry.windows.values():  # type: ignore[union-attr]
                if counter.buckets:
                    until = max(until, counter.ends_at(max(counter.buckets)))
        return until

    def _change(self, name: str, changes: list[tuple[str, float, int | None, int, int]],
                now: float, merge: bool) -> list[int]:
        entry = self._keys.get(name)
        if entry is None:
            if all(amount <= 0 for *_, amount in changes):
                return [0] * len(changes)
            entry = self._keys[name] = b""
            heapq.heappush(self._heap, (max(ends_at(c[1] / SLOTS, c[3]) for c in changes), name))
        if type(entry) is not bytes:
            return [self._change_wide(entry, *change, merge)  # type: ignore[arg-type]
                    for change in changes]
        info = self._info
        kept: list[list[int]] = []
        # Buckets left in their windows, by (series, window) and index.
        by_counter: dict[tuple[str, float], dict[int, list[int]]] = {}
        for record in _BUCKET.iter_unpack(entry):
            item = info[record[0]]
            if record[2] < math.floor(now / item[3]) - SLOTS:
                continue  # left its window: dropped while the key is rewritten anyway
            bucket = list(record)
            kept.append(bucket)
            by_counter.setdefault((item[0], item[1]), {})[record[2]] = bucket
        applied = []
        for series, window, limit, index, amount in changes:
            buckets = by_counter.setdefault((series, window), {})
            if buckets:
                cid = next(iter(buckets.values()))[0]
                if limit is not None and info[cid][2] != limit:
                    cid = self._id(series, window, limit)
                    for bucket in buckets.values():
                        bucket[0] = cid
            else:
                cid = self._id(series, window, limit)
            found = buckets.get(index)
            if found is None:
                done = amount if amount > 0 else 0
                if done:
                    found = buckets[index] = [cid, amount, index]
                    kept.append(found)
            elif merge:
                done = max(0, amount - found[1])
                found[1] += done
            elif found[1] + amount <= 0:
                done = -found[1]
                found[1] = 0
            else:
                done = amount
                found[1] += amount
            applied.append(done)
        kept = [bucket for bucket in kept if bucket[1] > 0]
        if len(kept) > PACKED_MAX:
            self._keys[name] = self._widen(kept)
        else:
            self._keys[name] = b"".join([_BUCKET.pack(*bucket) for bucket in kept])
        return applied

    def _change_wide(self, entry: _Wide, series: str, window: float, limit: int | None,
                     index: int, amount: int, merge: bool) -> int:
        counter = entry.windows.get((series, window))
        if counter is None:
            if amount <= 0:
                return 0
            counter = entry.windows[(series, window)] = TrailingWindow(window)
        if limit is not None:
            counter.max = limit
        if merge:
            old = counter.buckets.get(index, 0)
            counter.merge_max(index, amount)
            return max(0, amount - old)
        return counter.add(index, amount)

    def _widen(self, buckets: list[list[int]]) -> _Wide:
        wide = _Wide()
        for cid, n, index in buckets:
            series, window, limit, _ = self._info[cid]
            counter = wide.windows.get((series, window))
            if counter is None:
                counter = wide.windows[(series, window)] = TrailingWindow(window)
                counter.max = limit
            counter.add(index, n)
        return wide
