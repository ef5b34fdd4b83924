"""The counters a worker owns: check, reserve/confirm/release, add, mark.

Every method is synchronous and runs to completion, so on one event loop a
check-and-add is atomic without locks (the owner is the only writer).

Reservations are remembered per request id until their ttl, also after
confirm or release: a retried reserve or confirm that arrives late must get
the first answer instead of counting again. An open reservation past its
ttl keeps its counts: the one failure that leaves it open is a worker that
died between its spool write and the confirm, and a message that may have
been acknowledged must go on counting (it can only under-admit). Confirming
is therefore optional: release is what undoes a reservation. Keys whose
every bucket has left its window are evicted a few at a time on every call,
so memory stays bounded without a housekeeping task; `expire()` does a full
pass.

Reservations are also indexed by the keys they touch, so exporting a few
keys (replication does it for every change) costs what those keys hold, not
what the whole shard holds.

Time never runs backwards inside a shard: if the clock steps back, windows
stop sliding until it catches up, which can only under-admit.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from cluster.counting import Op, Outcome
from worker.counters.window import TrailingWindow, bucket_index, oldest_counted

EXPORT_VERSION = 1

OPEN = "open"
CONFIRMED = "confirmed"
RELEASED = "released"
DENIED = "denied"
_STATES = (OPEN, CONFIRMED, RELEASED, DENIED)

# Heap entries examined per call, plus two per op: eviction outpaces the
# keys a call can create, so the backlog of dead keys cannot grow.
_SWEEP_BUDGET = 8

# (key, series, window, bucket index, amount applied)
_Entry = tuple[str, str, float, int, int]


class _Key:
    __slots__ = ("windows", "expires")

    def __init__(self) -> None:
        self.windows: dict[tuple[str, float], TrailingWindow] = {}
        self.expires = -math.inf  # when the newest bucket of any window stops counting


class _Reservation:
    __slots__ = ("outcome", "state", "expires", "keys", "entries")

    def __init__(
        self,
        outcome: Outcome,
        state: str,
        expires: float,
        keys: tuple[str, ...],
        entries: tuple[_Entry, ...],
    ) -> None:
        self.outcome = outcome
        self.state = state
        self.expires = expires
        self.keys = keys
        self.entries = entries


class CounterShard:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        # Wall-clock by default: `mark()` receives acceptance times taken by
        # other processes, which must share the time base.
        self._clock = clock
        self._last = -math.inf
        self._keys: dict[str, _Key] = {}
        self._key_heap: list[tuple[float, str]] = []
        self._reservations: dict[str, _Reservation] = {}
        self._rsv_heap: list[tuple[float, str]] = []
        # key -> rids of the reservations in `_reservations` that touch it;
        # a dict for its insertion order, entries removed once empty.
        self._rsv_by_key: dict[str, dict[str, None]] = {}

    # -- decisions -------------------------------------------------------

    def check(self, ops: Sequence[Op]) -> Outcome:
        """Would this decision fit? Counts nothing."""
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        return self._evaluate(ops, now)

    def reserve(self, rid: str, ops: Sequence[Op], ttl: float = 120.0) -> Outcome:
        """Add every op's amount if all fit, else nothing; remember it under `rid`.

        A repeated reserve with a known `rid` returns the first Outcome and
        adds nothing, whatever ops it carries.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        known = self._live_reservation(rid, now)
        if known is not None:
            return known.outcome
        outcome = self._evaluate(ops, now)
        keys = tuple({op.key: None for op in ops})
        if outcome.ok:
            rec = _Reservation(outcome, OPEN, now + ttl, keys, self._apply(ops, now))
        else:
            rec = _Reservation(outcome, DENIED, now + ttl, keys, ())
        self._store_reservation(rid, rec)
        return outcome

    def confirm(self, rid: str) -> bool:
        """Make a reservation permanent.

        False when it is unknown, expired (and so released), released or
        denied: the caller may then `add` if the event must still count.
        A repeated confirm returns True again.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        rec = self._live_reservation(rid, now)
        if rec is None or rec.state in (RELEASED, DENIED):
            return False
        if rec.state == OPEN:
            rec.state = CONFIRMED
            rec.entries = ()  # nothing left to undo
        return True

    def release(self, rid: str) -> bool:
        """Subtract exactly what the reservation added, from the buckets it added to.

        False when there is nothing to release: unknown, expired (released
        by expiry already), denied or confirmed. A repeated release returns
        True again and subtracts nothing.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        rec = self._live_reservation(rid, now)
        if rec is None or rec.state in (CONFIRMED, DENIED):
            return False
        if rec.state == OPEN:
            self._undo(rec)
        return True

    def add(self, ops: Sequence[Op]) -> Outcome:
        """Count unconditionally (a failed AUTH); the Outcome is as `check` saw it before."""
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        outcome = self._evaluate(ops, now)
        self._apply(ops, now)
        return outcome

    def mark(self, ops: Sequence[Op]) -> None:
        """Add each op's amount to the bucket holding `op.at` (default now).

        The amount may be negative (unflag a message once delivered); no
        bucket goes below zero. A time already outside the op's window is
        ignored: that event no longer counts anywhere. `max` is ignored.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        for op in ops:
            if not op.amount:
                continue
            index = bucket_index(op.window, now if op.at is None else op.at)
            if index < oldest_counted(op.window, now):
                continue
            if op.amount < 0:
                key = self._keys.get(op.key)
                counter = key.windows.get((op.series, op.window)) if key is not None else None
                if counter is not None:
                    counter.add(index, op.amount)
                continue
            key, counter = self._counter(op.key, op.series, op.window)
            counter.add(index, op.amount)
            self._extend(op.key, key, counter.ends_at(index))

    def reset(self, keys: Iterable[str]) -> int:
        """Forget every count of ``keys`` (``sendguard counters reset``); returns how many
        counters (series and window) held something.

        Open reservations keep their other keys but no longer undo anything on
        these: a release after the reset must not take back a later message's count.
        """
        now = self._now()
        cleared = 0
        for name in dict.fromkeys(keys):
            key = self._keys.pop(name, None)
            if key is not None:
                cleared += sum(1 for counter in key.windows.values() if counter.count(now))
            for rid in self._rsv_by_key.get(name, {}):
                rec = self._reservations.get(rid)
                if rec is not None:
                    rec.entries = tuple(e for e in rec.entries if e[0] != name)
        return cleared

    # -- housekeeping ----------------------------------------------------

    def expire(self) -> int:
        """Release reservations past their ttl and evict keys with nothing left in
        any window. Returns how many reservations and keys were dropped."""
        return self._sweep(self._now(), math.inf)

    def snapshot(self, key: str) -> list[dict[str, Any]]:
        """Per (series, window) of `key`: its count, when the oldest counted
        bucket stops counting (None when empty), and every counted bucket as
        [when it stops counting, count], oldest first."""
        now = self._now()
        entry = self._keys.get(key)
        if entry is None:
            return []
        return [
            {
                "series": series,
                "window": float(window),
                "count": counter.count(now),
                "clears_at": counter.clears_at(now),
                "buckets": [[counter.ends_at(index), n]
                            for index, n in sorted(counter.buckets.items())],
            }
            for (series, window), counter in sorted(entry.windows.items())
        ]

    def export(
        self,
        keys: Iterable[str] | None = None,
        reservations: Iterable[str] | None = None,
    ) -> list[Any]:
        """Plain data (msgpack-ready) for `keys` (default all) and the
        reservations that touch them: only those among `reservations` (rids)
        when given, so a change can ship just the reservation it made.

        Layout: [version, keys, reservations] with
            keys:         [[key, [[series, window, [[index, count], ...]], ...]], ...]
            reservations: [[rid, state, expires, outcome, [key, ...],
                            [[key, series, window, index, amount], ...]], ...]
        """
        now = self._now()
        wanted = None if keys is None else set(keys)
        names = self._keys if wanted is None else [k for k in wanted if k in self._keys]
        out_keys: list[Any] = []
        for name in names:
            series_out = []
            for (series, window), counter in self._keys[name].windows.items():
                if counter.count(now):
                    buckets = [[i, n] for i, n in sorted(counter.buckets.items())]
                    series_out.append([series, float(window), buckets])
            if series_out:
                out_keys.append([name, series_out])
        out_rsv: list[Any] = []
        for rid in self._exported_rids(wanted, reservations):
            rec = self._reservations.get(rid)
            if rec is None or rec.expires <= now:
                continue
            if wanted is not None and wanted.isdisjoint(rec.keys):
                continue
            entries = [list(e) for e in rec.entries if wanted is None or e[0] in wanted]
            rec_keys = [k for k in rec.keys if wanted is None or k in wanted]
            out_rsv.append([rid, rec.state, rec.expires, rec.outcome.to_wire(), rec_keys, entries])
        return [EXPORT_VERSION, out_keys, out_rsv]

    def import_(self, data: Any) -> None:
        """Merge an `export()`: per bucket the larger count wins, so importing
        the same data twice counts it once.

        A reservation already finished here (confirmed or released) stays
        finished; one finished on the other side is finished here too.
        Expired reservations and buckets already out of their window are
        skipped.
        """
        if not isinstance(data, (list, tuple)) or len(data) != 3:
            raise ValueError("counter import must be [version, keys, reservations]")
        version, keys, reservations = data
        if version != EXPORT_VERSION:
            raise ValueError(f"counter import version {version!r} is not {EXPORT_VERSION}")
        now = self._now()
        # Reservations first: a release subtracts from local buckets before
        # the max-merge, or the merge would bring the amount back.
        for rid, state, expires, outcome, rec_keys, entries in reservations:
            if state not in _STATES:
                raise ValueError(f"counter import: unknown reservation state {state!r}")
            if expires <= now:
                continue
            self._merge_reservation(
                rid,
                _Reservation(
                    Outcome.from_wire(outcome),
                    state,
                    float(expires),
                    tuple(dict.fromkeys(rec_keys)),  # hashable and unique, as indexed
                    tuple((k, s, float(w), int(i), int(a)) for k, s, w, i, a in entries),
                ),
                now,
            )
        for name, series_list in keys:
            for series, window, buckets in series_list:
                low = oldest_counted(float(window), now)
                live = [(int(i), int(n)) for i, n in buckets if i >= low and n > 0]
                if not live:
                    continue
                key, counter = self._counter(name, series, float(window))
                for index, n in live:
                    counter.merge_max(index, n)
                self._extend(name, key, counter.ends_at(max(i for i, _ in live)))

    def keys(self) -> Iterator[str]:
        # A copy: callers may export or mark while iterating.
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    # -- internals -------------------------------------------------------

    def _exported_rids(self, wanted: set[str] | None, rids: Iterable[str] | None) -> Iterable[str]:
        if rids is not None:
            return dict.fromkeys(rids)
        if wanted is None:
            return list(self._reservations)
        return dict.fromkeys(r for key in wanted for r in self._rsv_by_key.get(key, ()))

    def _now(self) -> float:
        t = self._clock()
        if t > self._last:
            self._last = t
        return self._last

    def _evaluate(self, ops: Sequence[Op], now: float) -> Outcome:
        keys = self._keys
        counts: list[int] = []
        denied: int | None = None
        # Two ops on one counter in one decision must fit together.
        pending: dict[tuple[str, str, float], int] = {}
        for i, op in enumerate(ops):
            if op.amount < 0:
                raise ValueError(f"negative amount outside mark(): {op!r}")
            key = keys.get(op.key)
            counter = key.windows.get((op.series, op.window)) if key is not None else None
            n = counter.count(now) if counter is not None else 0
            counts.append(n)
            ident = (op.key, op.series, op.window)
            added = pending.get(ident, 0) + op.amount
            pending[ident] = added
            if denied is None and op.max is not None and n + added > op.max:
                denied = i
        return Outcome(denied is None, tuple(counts), denied)

    def _apply(self, ops: Sequence[Op], now: float) -> tuple[_Entry, ...]:
        entries: list[_Entry] = []
        for op in ops:
            if op.amount <= 0:
                continue
            key, counter = self._counter(op.key, op.series, op.window)
            index = counter.index(now)
            applied = counter.add(index, op.amount)
            self._extend(op.key, key, counter.ends_at(index))
            entries.append((op.key, op.series, op.window, index, applied))
        return tuple(entries)

    def _counter(self, name: str, series: str, window: float) -> tuple[_Key, TrailingWindow]:
        """The counter, created if missing; the caller must `_extend` it."""
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = _Key()
        ident = (series, window)
        counter = key.windows.get(ident)
        if counter is None:
            counter = key.windows[ident] = TrailingWindow(window)
        return key, counter

    def _extend(self, name: str, key: _Key, until: float) -> None:
        if until > key.expires:
            # One heap entry per key: pushed when the key gets its first
            # count; a later, longer life is picked up when the entry pops.
            if key.expires == -math.inf:
                heapq.heappush(self._key_heap, (until, name))
            key.expires = until

    def _undo(self, rec: _Reservation) -> None:
        for name, series, window, index, amount in rec.entries:
            key = self._keys.get(name)
            counter = key.windows.get((series, window)) if key is not None else None
            if counter is not None:
                counter.add(index, -amount)
        rec.entries = ()
        rec.state = RELEASED

    def _live_reservation(self, rid: str, now: float) -> _Reservation | None:
        rec = self._reservations.get(rid)
        if rec is None:
            return None
        if rec.expires <= now:
            self._drop_reservation(rid, rec)
            return None
        return rec

    def _store_reservation(self, rid: str, rec: _Reservation) -> None:
        """Keep `rec` under `rid`, which the caller made sure is free."""
        self._reservations[rid] = rec
        heapq.heappush(self._rsv_heap, (rec.expires, rid))
        self._index(rid, rec.keys)

    def _index(self, rid: str, keys: Iterable[str]) -> None:
        for key in keys:
            self._rsv_by_key.setdefault(key, {})[rid] = None

    def _drop_reservation(self, rid: str, rec: _Reservation) -> None:
        # Only expiry drops a record; an open one keeps what it counted.
        del self._reservations[rid]
        for key in rec.keys:
            rids = self._rsv_by_key.get(key)
            if rids is not None:
                rids.pop(rid, None)
                if not rids:
                    del self._rsv_by_key[key]

    def _merge_reservation(self, rid: str, incoming: _Reservation, now: float) -> None:
        local = self._live_reservation(rid, now)
        if local is None:
            self._store_reservation(rid, incoming)
            return
        if local.state != OPEN:
            return
        if incoming.state == RELEASED:
            self._undo(local)
        elif incoming.state == CONFIRMED:
            local.state = CONFIRMED
            local.entries = ()
        elif incoming.state == OPEN:
            # The same decision exported key by key: join the parts.
            have = {e[0] for e in local.entries}
            local.entries += tuple(e for e in incoming.entries if e[0] not in have)
            local.keys = tuple(dict.fromkeys(local.keys + incoming.keys))
            self._index(rid, incoming.keys)

    def _sweep(self, now: float, budget: float) -> int:
        dropped = 0
        heap = self._rsv_heap
        while budget > 0 and heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            budget -= 1
            rec = self._reservations.get(rid)
            # The record may be a newer one under a reused rid, with its own entry.
            if rec is not None and rec.expires <= now:
                self._drop_reservation(rid, rec)
                dropped += 1
        heap = self._key_heap
        while budget > 0 and heap and heap[0][0] <= now:
            _, name = heapq.heappop(heap)
            budget -= 1
            key = self._keys.get(name)
            if key is None:
                continue  # reset: gone already, or back with an entry of its own
            if key.expires <= now:
                del self._keys[name]
                dropped += 1
            else:
                heapq.heappush(heap, (key.expires, name))
        return dropped
