"""The counters a worker owns: check, reserve/release, add, mark, lend/return/renew, reset.

Every method is synchronous and runs to completion, so on one event loop a
check-and-add is atomic without locks (the owner is the only writer).

Reservations are remembered per request id until their ttl, also after a
release: a retried reserve that arrives late must get the first answer
instead of counting again. A reservation is the message's count: it is
never confirmed, and one still open at its ttl keeps its counts (a worker
that died after its spool write may have acknowledged the message, and
keeping the count can only under-admit). Release is what undoes one.

A lease (`lend`) is a reservation of a few units of a limited counter that
its borrower spends by itself until the lease expires (see
``worker.counters.leases``): the units are counted at once, in the bucket
the whole lease lies in, and `return_lease` takes back what was not used
(`renew`: that, and the next lease lent, in one step). An unreturned lease
simply stays counted.

Keys whose every bucket has left its window are evicted a few at a time on
every call, so memory stays bounded without a housekeeping task; `expire()`
does a full pass. Reservations are also indexed by the keys they touch, so
exporting a few keys (replication does it for every change) costs what
those keys hold, not what the whole shard holds.

Ops are read by position (`cluster.counting`), so the plain lists of a
decoded frame are used as they are.

Time never runs backwards inside a shard: if the clock steps back, windows
stop sliding until it catches up, which can only under-admit.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from cluster.counting import AMOUNT, AT, KEY, MAX, SERIES, WINDOW, Outcome
from worker.counters.window import (
    SLOTS,
    CounterTable,
    bucket_index,
    clears_at,
    ends_at,
    oldest_counted,
)

EXPORT_VERSION = 2

OPEN = "open"
RELEASED = "released"
DENIED = "denied"
RETURNED = "returned"  # a lease whose unused units were taken back
RESET = "reset"  # not a reservation: a reset done, remembered by its id
_STATES = (OPEN, RELEASED, DENIED, RETURNED, RESET)

# Heap entries examined per call, plus two per op: eviction outpaces the
# keys a call can create, so the backlog of dead keys cannot grow.
_SWEEP_BUDGET = 8

# A lease is granted only while every counter it touches has at least this
# much room left after it, and takes at most 1/_LEND_SHARE of the room:
# small limits, and any limit close to being reached, stay per message.
LEND_MIN_ROOM = 64
_LEND_SHARE = 4

# (key, series, window, bucket index, amount applied)
_Entry = tuple[str, str, float, int, int]
Ops = Sequence[Sequence[Any]]


class _Reservation:
    # `lease_end`: when a lease stops being spendable; 0 for a reservation.
    __slots__ = ("outcome", "state", "expires", "keys", "entries", "lease_end")

    def __init__(
        self,
        outcome: Outcome,
        state: str,
        expires: float,
        keys: tuple[str, ...],
        entries: tuple[_Entry, ...],
        lease_end: float = 0.0,
    ) -> None:
        self.outcome = outcome
        self.state = state
        self.expires = expires
        self.keys = keys
        self.entries = entries
        self.lease_end = lease_end


class CounterShard:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        # Wall-clock by default: `mark()` receives acceptance times taken by
        # other processes, and leases expire by it in the borrower.
        self._clock = clock
        self._last = -math.inf
        self._table = CounterTable()
        self._reservations: dict[str, _Reservation] = {}
        self._rsv_heap: list[tuple[float, str]] = []
        # key -> rids of the reservations in `_reservations` that touch it;
        # a dict for its insertion order, entries removed once empty.
        self._rsv_by_key: dict[str, dict[str, None]] = {}

    # -- decisions -------------------------------------------------------

    def check(self, ops: Ops) -> Outcome:
        """Would this decision fit? Counts nothing."""
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        return self._evaluate(ops, now)

    def reserve(self, rid: str, ops: Ops, ttl: float = 120.0) -> Outcome:
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
        keys = tuple({op[KEY]: None for op in ops})
        if outcome.ok:
            rec = _Reservation(outcome, OPEN, now + ttl, keys, self._apply(ops, now))
        else:
            rec = _Reservation(outcome, DENIED, now + ttl, keys, ())
        self._store_reservation(rid, rec)
        return outcome

    def release(self, rid: str) -> bool:
        """Subtract exactly what the reservation added, from the buckets it added to.

        False when there is nothing to release: unknown, expired, denied or
        a lease. A repeated release returns True again and subtracts nothing.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        rec = self._live_reservation(rid, now)
        if rec is None or rec.state in (DENIED, RESET) or rec.lease_end:
            return False
        if rec.state == OPEN:
            self._undo(rec)
        return True

    def add(self, ops: Ops) -> Outcome:
        """Count unconditionally (a failed AUTH); the Outcome is as `check` saw it before."""
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        outcome = self._evaluate(ops, now)
        self._apply(ops, now)
        return outcome

    def mark(self, ops: Ops) -> None:
        """Add each op's amount to the bucket holding `op.at` (default now).

        The amount may be negative (unflag a message once delivered); no
        bucket goes below zero. A time already outside the op's window is
        ignored: that event no longer counts anywhere. `max` is ignored.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        table = self._table
        for op in ops:
            amount, window = op[AMOUNT], op[WINDOW]
            if not amount:
                continue
            at = op[AT]
            index = bucket_index(window, now if at is None else at)
            if index < oldest_counted(window, now):
                continue
            table.add(op[KEY], op[SERIES], window, None, index, amount, now)

    # -- leases ----------------------------------------------------------

    def lend(self, rid: str, ops: Ops, want: int, ttl: float,
             longest: float = 1.0) -> tuple[int, float, tuple[int, ...]]:
        """Lend up to `want` units of every op's counter (all limited) under `rid`.

        Returns (units, expires, counts before): units is 0 when any
        counter has too little room left. The lease ends with the bucket
        it began in (on every window, and at the next multiple of `longest`
        seconds at the latest), so
        counting its units in that bucket outlives any use of them. The
        record is kept `ttl` past the end, for the return. A repeated
        `rid` answers what it granted the first time, counting nothing.
        """
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET + 2 * len(ops))
        known = self._live_reservation(rid, now)
        if known is not None:
            units = known.entries[0][4] if known.state == OPEN and known.entries else 0
            return units, known.lease_end, known.outcome.counts
        outcome = self._evaluate(ops, now)
        room = min(op[MAX] - n for op, n in zip(ops, outcome.counts, strict=True))
        units = min(want, room // _LEND_SHARE, room - LEND_MIN_ROOM)
        # On a grid of `longest` seconds: leases that end together come back
        # together, in one frame per owner.
        expires = (math.floor(now / longest) + 1) * longest
        for op in ops:
            width = op[WINDOW] / SLOTS
            expires = min(expires, (math.floor(now / width) + 1) * width)
        if units <= 0:
            return 0, expires, outcome.counts
        entries = []
        for op in ops:
            index = bucket_index(op[WINDOW], now)
            self._table.add(op[KEY], op[SERIES], op[WINDOW], op[MAX], index, units, now)
            entries.append((op[KEY], op[SERIES], op[WINDOW], index, units))
        keys = tuple({op[KEY]: None for op in ops})
        self._store_reservation(rid, _Reservation(outcome, OPEN, expires + ttl, keys,
                                                  tuple(entries), expires))
        return units, expires, outcome.counts

    def return_lease(self, rid: str, unused: Sequence[int]) -> bool:
        """Take back `unused[i]` units of the lease's i-th counter. False when
        the lease is unknown or already returned (a repeat takes nothing)."""
        now = self._now()
        self._sweep(now, _SWEEP_BUDGET)
        rec = self._live_reservation(rid, now)
        if rec is None or not rec.lease_end or rec.state != OPEN:
            return False
        if len(unused) != len(rec.entries):
            raise ValueError(f"lease {rid}: {len(unused)} unused counts for "
                             f"{len(rec.entries)} counters")
        kept = []
        for (name, series, window, index, amount), back in zip(rec.entries, unused, strict=True):
            back = min(max(0, int(back)), amount)
            if back:
                back = -self._table.add(name, series, window, None, index, -back, now)
            kept.append((name, series, window, index, amount - back))
        rec.entries = tuple(kept)
        rec.state = RETURNED
        return True

    def renew(self, renewals: Sequence[tuple[str, Sequence[int], str, Ops, int]], ttl: float,
              longest: float = 1.0) -> tuple[list[str], list[tuple[int, float, tuple[int, ...]]]]:
        """For each `(old rid, unused, new rid, ops, want)`: `return_lease(old rid,
        unused)` (skipped for an old rid of ""), then `lend(new rid, ops, want)`,
        the next lease sized on the counts the return left. Exactly a return
        followed by a lend, in one step: the new lease is counted as of its
        own expiry as any lease is, and near a limit the old one still comes
        back while nothing more is lent. Every renewal is checked before any
        changes anything. Returns (old rids taken back, grants as `lend`)."""
        now = self._now()
        for old, unused, _, ops, _ in renewals:
            rec = self._live_reservation(old, now) if old else None
            if rec is not None and rec.lease_end and rec.state == OPEN and \
                    len(unused) != len(rec.entries):
                raise ValueError(f"lease {old}: {len(unused)} unused counts for "
                                 f"{len(rec.entries)} counters")
            if not ops or any(op[MAX] is None for op in ops):
                raise ValueError("a lease is for limited counters only")
        returned = [old for old, unused, *_ in renewals if old and self.return_lease(old, unused)]
        grants = [self.lend(new, ops, want, ttl, longest) for _, _, new, ops, want in renewals]
        return returned, grants

    # -- support ---------------------------------------------------------

    def reset(self, keys: Iterable[str], rid: str | None = None, ttl: float = 600.0) -> int:
        """Forget every count of `keys` and every reservation's part on them;
        returns how many counters (series and window) held a count.

        A lease still open keeps its units counted: its borrower may still
        spend them, and forgetting them could admit more than the limit.
        With a `rid` the reset is remembered (and exported with the keys) for
        `ttl` seconds: a repeat, here or on the replica that took over,
        answers the first count and clears nothing, since counts that came
        after the first must stay."""
        now = self._now()
        names = tuple(dict.fromkeys(keys))
        if rid is not None:
            known = self._live_reservation(rid, now)
            if known is not None:
                return known.outcome.counts[0] if known.outcome.counts else 0
        cleared = 0
        for name in names:
            cleared += sum(1 for *_, buckets in self._table.counters(name, now) if buckets)
            self._table.clear(name)
            for held in list(self._rsv_by_key.get(name, ())):
                rec = self._reservations[held]
                mine = [e for e in rec.entries if e[0] == name]
                if rec.lease_end and rec.state == OPEN and rec.expires > now:
                    for entry in mine:
                        if entry[4] > 0:
                            self._table.add(name, entry[1], entry[2], None, entry[3], entry[4],
                                            now)
                elif mine:
                    # Nothing left here to undo; the record stays, indexed, so
                    # that a repeated reserve is still answered as before.
                    rec.entries = tuple(e for e in rec.entries if e[0] != name)
        if rid is not None:
            self._store_reservation(rid, _Reservation(Outcome(True, (cleared,), None), RESET,
                                                      now + ttl, names, ()))
        return cleared

    def reservations_of(self, keys: Iterable[str]) -> list[str]:
        """The ids of the reservations and leases that touch `keys`."""
        return list(self._exported_rids(set(keys), None))

    def rows(self, key: str) -> list[dict[str, Any]]:
        """Per (series, window) of `key` with a count: the count; the limit of the
        last decision that counted on it (`max`, None if none had one);
        `clears_at`, at or over that limit when enough of the window has
        passed for one more to fit, otherwise when the oldest counted bucket
        stops counting; and `buckets`, every counted bucket as [when it stops
        counting, count], oldest first. Times are epoch seconds."""
        now = self._now()
        rows = []
        for series, window, limit, buckets in self._table.counters(key, now):
            width = window / SLOTS
            rows.append({"series": series, "window": float(window),
                         "count": sum(buckets.values()), "max": limit,
                         "clears_at": clears_at(buckets, width, limit),
                         "buckets": [[ends_at(width, i), n] for i, n in sorted(buckets.items())]})
        return rows

    def snapshot(self, key: str) -> list[dict[str, Any]]:
        """`rows` as any backend gives them, without the limit: series, window,
        count, clears_at (when the oldest counted bucket stops counting) and
        buckets."""
        rows = self.rows(key)
        for row in rows:
            del row["max"]
            row["clears_at"] = row["buckets"][0][0]
        return rows

    # -- housekeeping ----------------------------------------------------

    def expire(self) -> int:
        """Drop reservations past their ttl and evict keys with nothing left in
        any window. Returns how many reservations and keys were dropped."""
        return self._sweep(self._now(), math.inf)

    def export(
        self,
        keys: Iterable[str] | None = None,
        reservations: Iterable[str] | None = None,
    ) -> list[Any]:
        """Plain data (msgpack-ready) for `keys` (default all) and the
        reservations that touch them: only those among `reservations` (rids)
        when given, so a change can ship just the reservation it made.

        Every key asked for is listed, an empty one with no series, so
        that an exact import (a replica's) forgets it too.

        Layout: [version, keys, reservations] with
            keys:         [[key, [[series, window, max, [[index, count], ...]], ...]], ...]
            reservations: [[rid, state, expires, outcome, [key, ...],
                            [[key, series, window, index, amount], ...], lease_end], ...]
        """
        now = self._now()
        wanted = None if keys is None else set(keys)
        names = self._table.names() if wanted is None else wanted
        out_keys: list[Any] = []
        for name in names:
            series_out = [[series, float(window), limit, [[i, n] for i, n in sorted(b.items())]]
                          for series, window, limit, b in self._table.counters(name, now) if b]
            if series_out or wanted is not None:
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
            out_rsv.append([rid, rec.state, rec.expires, rec.outcome.to_wire(), rec_keys,
                            entries, rec.lease_end])
        return [EXPORT_VERSION, out_keys, out_rsv]

    def import_(self, data: Any, exact: bool = False) -> None:
        """Apply an `export()`.

        Merged by default (hand-offs, which may come from several holders):
        per bucket the larger count wins, so importing the same data twice
        counts it once; a reservation already finished here stays
        finished, and one finished on the other side is finished here too.

        `exact` (a replica, from its owner, in the order the owner sent
        them): each key listed replaces this shard's copy, and each
        reservation's state and entries replace the copy's.

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
        for rid, state, expires, outcome, rec_keys, entries, lease_end in reservations:
            if state not in _STATES:
                raise ValueError(f"counter import: unknown reservation state {state!r}")
            if expires <= now:
                continue
            incoming = _Reservation(
                Outcome.from_wire(outcome),
                state,
                float(expires),
                tuple(dict.fromkeys(rec_keys)),  # hashable and unique, as indexed
                tuple((k, s, float(w), int(i), int(a)) for k, s, w, i, a in entries),
                float(lease_end),
            )
            if exact:
                self._replace_reservation(rid, incoming, now)
            else:
                self._merge_reservation(rid, incoming, now)
        table = self._table
        for name, series_list in keys:
            live = []
            for series, window, limit, buckets in series_list:
                window = float(window)
                low = oldest_counted(window, now)
                live.append((series, window, limit,
                             [(int(i), int(n)) for i, n in buckets if i >= low and n > 0]))
            if exact:
                table.replace(name, live)
                continue
            for series, window, limit, pairs in live:
                for i, n in pairs:
                    table.merge_max(name, series, window, limit, i, n, now)

    def keys(self) -> Iterator[str]:
        # A copy: callers may export or mark while iterating.
        return self._table.names()

    def __len__(self) -> int:
        return len(self._table)

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

    def _evaluate(self, ops: Ops, now: float) -> Outcome:
        totals = self._table.totals
        seen: dict[str, dict[tuple[str, float], int]] = {}
        counts: list[int] = []
        denied: int | None = None
        # Two ops on one counter in one decision must fit together.
        pending: dict[tuple[str, str, float], int] = {}
        for i, op in enumerate(ops):
            name, series, window, limit, amount = op[KEY], op[SERIES], op[WINDOW], op[MAX], \
                op[AMOUNT]
            if amount < 0:
                raise ValueError(f"negative amount outside mark(): {op!r}")
            held = seen.get(name)
            if held is None:
                held = seen[name] = totals(name, now)
            n = held.get((series, window), 0)
            counts.append(n)
            if limit is not None and denied is None:
                ident = (name, series, window)
                added = pending.get(ident, 0) + amount
                pending[ident] = added
                if n + added > limit:
                    denied = i
            elif amount:
                ident = (name, series, window)
                pending[ident] = pending.get(ident, 0) + amount
        return Outcome(denied is None, tuple(counts), denied)

    def _apply(self, ops: Ops, now: float) -> tuple[_Entry, ...]:
        # One change per key: a packed key is unpacked and packed once.
        by_key: dict[str, list[tuple[str, float, int | None, int, int]]] = {}
        for op in ops:
            amount = op[AMOUNT]
            if amount > 0:
                window = op[WINDOW]
                by_key.setdefault(op[KEY], []).append(
                    (op[SERIES], window, op[MAX], math.floor(now / (window / SLOTS)), amount))
        entries: list[_Entry] = []
        for name, changes in by_key.items():
            for (series, window, _, index, _), applied in zip(
                    changes, self._table.add_many(name, changes, now), strict=True):
                entries.append((name, series, window, index, applied))
        return tuple(entries)

    def _subtract(self, entries: Iterable[_Entry]) -> None:
        now = self._now()
        for name, series, window, index, amount in entries:
            if amount:
                self._table.add(name, series, window, None, index, -amount, now)

    def _undo(self, rec: _Reservation) -> None:
        self._subtract(rec.entries)
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
        elif incoming.state == RETURNED:
            # Take back here what the owner took back, before the max-merge.
            back = {e[:4]: e[4] for e in incoming.entries}
            self._subtract(e[:4] + (e[4] - back[e[:4]],) for e in local.entries
                           if e[:4] in back and e[4] > back[e[:4]])
            local.entries = tuple(e[:4] + (back.get(e[:4], e[4]),) for e in local.entries)
            local.state = RETURNED
        elif incoming.state == OPEN:
            # The same decision exported key by key: join the parts.
            have = {e[0] for e in local.entries}
            local.entries += tuple(e for e in incoming.entries if e[0] not in have)
            local.keys = tuple(dict.fromkeys(local.keys + incoming.keys))
            self._index(rid, incoming.keys)

    def _replace_reservation(self, rid: str, incoming: _Reservation, now: float) -> None:
        local = self._live_reservation(rid, now)
        if local is None:
            self._store_reservation(rid, incoming)
            return
        # Counts come with the keys' own data: only the record changes here.
        exported = set(incoming.keys)
        local.state = incoming.state
        local.outcome = incoming.outcome
        local.entries = tuple(e for e in local.entries if e[0] not in exported) + \
            incoming.entries
        new_keys = tuple(k for k in incoming.keys if k not in local.keys)
        if new_keys:
            local.keys += new_keys
            self._index(rid, new_keys)

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
        evicted, _ = self._table.sweep(now, budget)
        return dropped + evicted

