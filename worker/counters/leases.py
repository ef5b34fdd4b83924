"""Quota leases, the borrower's side: decide locally on units an owner lent.

A round trip per message costs more than the rest of the counter path, so
an owner may lend a node a few units of a limited counter (`CounterShard.lend`):
the units are counted at the owner, and at its replica, at once, in the
bucket the whole lease lies in; the borrower spends them by itself until
the lease expires (at the end of that bucket, within a second), then
returns what it did not spend. So:

- nothing is ever admitted past a limit: every unit spent was counted
  before it was lent, in a bucket that is counted at least as long as the
  message it admitted;
- a lease unspent and not yet returned only holds room back: it may
  under-admit elsewhere by at most what is lent, for at most one bucket;
- a borrower that dies leaves its leases counted (they expire at the owner
  as an open reservation does); an owner that dies left them at its replica;
- near a limit the owner lends nothing (`LEND_MIN_ROOM`), and every
  message is reserved at the owner again: small limits stay exact per
  message.

One lease is for one *shape*: a (key, series) and the windows and limits
of a decision on it, e.g. an account's three message limits. A decision
is decided here only when every limited shape it has on an owner is
covered; its plain counts on that owner (the bounce ratio's "accepted")
are then tallied here and sent as one `mark` per bucket, in the bucket of
their time, when the tally's bucket ends (within a second).

Lease sizes follow the rate each shape was spent at, so what is lent and
unused stays small.

A lease that ends with its bucket having been spent from is *renewed*:
one op at the owner returns what it did not spend and lends the next
bucket's (`renew` set by the ending; the caller sends it, and the owner
replicates both changes once). So a shape spent from every second costs
one op per owner per second, not a return, a lend and a round trip on the
first decision of each second; one not spent from in a bucket is returned
and not renewed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from cluster.counting import AMOUNT, KEY, MAX, SERIES, WINDOW
from worker.counters.window import SLOTS

# A lease or a tally ends at the next multiple of this many seconds at the
# latest (the owner lends on the same grid).
LONGEST = 1.0
_WANT_MIN, _WANT_MAX = 4, 5000
_SEEN_MAX = 65536  # shapes whose recent decisions are remembered

Shape = tuple[str, str, tuple[tuple[float, int], ...]]  # key, series, ((window, max), ...)
Counter = tuple[str, str, float]  # key, series, window


class Lease:
    __slots__ = ("lease_id", "shape", "units", "left", "counts", "expires", "started", "done",
                 "renew")

    def __init__(self, lease_id: str, shape: Shape, units: int, expires: float,
                 counts: Sequence[int]) -> None:
        self.lease_id = lease_id
        self.shape = shape
        self.units = units
        self.left = [units] * len(shape[2])  # per window of the shape
        self.counts = list(counts)  # each counter's count at the owner before the lease
        self.expires = expires  # wall clock, as the owner's shard keeps time
        self.started = time.time()
        self.done = False  # returned, or being returned: spend nothing more
        self.renew = False  # ended with its bucket, spent: ask for the next bucket's


class Tally:
    """Plain counts of one counter spent here, for one bucket."""

    __slots__ = ("counter", "amount", "at", "index", "done")

    def __init__(self, counter: Counter, at: float, index: int) -> None:
        self.counter = counter
        self.amount = 0
        self.at = at
        self.index = index
        self.done = False


# A decision's use of the book, to give back if the decision is released:
# (lease, [(window position, amount)]) or (tally, amount).
Use = tuple[Lease, list[tuple[int, int]]] | tuple[Tally, int]


class LeaseBook:
    """The leases and tallies this node holds. `on_end(lease or tally)` is
    called when one ends (returned or sent by the caller)."""

    def __init__(self, on_end: Callable[[list[Lease | Tally]], None]) -> None:
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self.leases: dict[Shape, Lease] = {}
        self._by_counter: dict[Counter, tuple[Lease, int]] = {}
        self.tallies: dict[Counter, Tally] = {}
        # Shapes with a lease request in flight, and the request's ask
        # ([lease id, units wanted, op positions]): decisions on them wait for
        # it, and add what they need to the ask while it is not sent yet.
        self.asking: dict[Shape, tuple[asyncio.Future[None], list[Any]]] = {}
        # Shapes an owner would not lend to until then (wall clock).
        self.refused: dict[Shape, float] = {}
        self._rate: dict[Shape, float] = {}
        # Decisions per shape not covered by a lease: [second, in it, in the one before].
        self._seen: dict[Shape, list[int]] = {}
        self._ending: dict[float, list[Lease | Tally]] = {}

    # -- shapes --------------------------------------------------------------------

    @staticmethod
    def shapes(ops: Sequence[Sequence[Any]], indices: Sequence[int]
               ) -> tuple[dict[Shape, list[int]], list[int], bool]:
        """The limited shapes among `ops[indices]` (shape -> op indices), the
        plain-count ops, and whether every op can be decided from leases."""
        by_series: dict[tuple[str, str], list[int]] = {}
        for i in indices:
            by_series.setdefault((ops[i][KEY], ops[i][SERIES]), []).append(i)
        limited: dict[Shape, list[int]] = {}
        plain: list[int] = []
        leasable = True
        for (key, series), idx in by_series.items():
            maxes = [ops[i][MAX] for i in idx]
            if all(m is None for m in maxes):
                plain.extend(idx)
                continue
            windows = tuple((ops[i][WINDOW], ops[i][MAX]) for i in idx)
            if any(m is None for m in maxes) or len({w for w, _ in windows}) != len(windows):
                leasable = False  # mixed, or one counter twice: per message
                continue
            limited[(key, series, windows)] = idx
        return limited, plain, leasable

    def covers(self, ops: Sequence[Sequence[Any]], limited: dict[Shape, list[int]],
               now: float) -> bool:
        for shape, idx in limited.items():
            lease = self.leases.get(shape)
            if lease is None or lease.done or now >= lease.expires:
                return False
            left = lease.left
            for j, i in enumerate(idx):
                if left[j] < ops[i][AMOUNT]:
                    return False
        return True

    def spend(self, ops: Sequence[Sequence[Any]], limited: dict[Shape, list[int]],
              plain: list[int], now: float, counts: list[int]) -> list[Use]:
        """Spend what `covers` said is there; tally the plain counts; fill in
        `counts` (each op's count before, as far as this node knows)."""
        uses: list[Use] = []
        for shape, idx in limited.items():
            lease = self.leases[shape]
            spent = []
            for j, i in enumerate(idx):
                amount = ops[i][AMOUNT]
                counts[i] = lease.counts[j] + lease.units - lease.left[j]
                lease.left[j] -= amount
                spent.append((j, amount))
            uses.append((lease, spent))
        for i in plain:
            amount = ops[i][AMOUNT]
            if amount <= 0:
                continue
            tally = self._tally((ops[i][KEY], ops[i][SERIES], ops[i][WINDOW]), now)
            counts[i] = tally.amount
            tally.amount += amount
            uses.append((tally, amount))
        return uses

    def give_back(self, uses: list[Use]) -> list[tuple[Counter, int, float]]:
        """Undo `spend`; returns what was already sent to owners and must be
        taken back there: (counter, amount, time of its bucket)."""
        late: list[tuple[Counter, int, float]] = []
        for held, spent in uses:
            if isinstance(held, Lease):
                assert isinstance(spent, list)
                key, series, windows = held.shape
                # A time in the lease's own bucket (it began before it ended).
                at = min(held.started, held.expires - 1e-6)
                for j, amount in spent:
                    if held.done:
                        late.append(((key, series, windows[j][0]), amount, at))
                    else:
                        held.left[j] += amount
            else:
                assert isinstance(spent, int)
                if held.done:
                    late.append((held.counter, spent, held.at))
                else:
                    held.amount -= spent
        return late

    def adjust(self, ops: Sequence[Sequence[Any]], indices: Sequence[int],
               counts: list[int]) -> None:
        """Counts read at an owner or replica, as this node sees them: less what
        it holds lent and unspent, plus what it tallied and has not sent."""
        if not self._by_counter and not self.tallies:
            return
        for j, i in enumerate(indices):
            counter = (ops[i][KEY], ops[i][SERIES], ops[i][WINDOW])
            held = self._by_counter.get(counter)
            if held is not None and not held[0].done:
                counts[j] = max(0, counts[j] - held[0].left[held[1]])
            tally = self.tallies.get(counter)
            if tally is not None and not tally.done:
                counts[j] += tally.amount

    # -- asking ----------------------------------------------------------------------

    def want(self, shape: Shape, needed: int) -> int:
        """Units to ask for: three times what this shape was spent at over the next
        lease's life, and at least what the decision asking needs. Arrivals
        are bursty: a lease sized to the mean runs out before its bucket ends
        about as often as not, and the next decision then pays a round trip.
        What is lent and not spent only holds room until the bucket ends, and
        the owner lends at most a quarter of the room (`CounterShard.lend`)."""
        life = self.life(shape[2], time.time())
        rate = self._rate.get(shape, 0.0)
        return max(_WANT_MIN, min(_WANT_MAX, math.ceil(rate * life * 3) + needed))

    def wait(self, shape: Shape, needed: int) -> asyncio.Future[None]:
        """The lease request in flight for `shape`, asked for `needed` more units."""
        future, ask = self.asking[shape]
        ask[1] = min(_WANT_MAX, ask[1] + needed)  # too late once the frame left: harmless
        return future

    @staticmethod
    def life(windows: Sequence[tuple[float, Any]], now: float) -> float:
        end = _next_tick(now)
        for window, _ in windows:
            width = window / SLOTS
            end = min(end, (math.floor(now / width) + 1) * width)
        return end - now

    def granted(self, shape: Shape, lease_id: str, grant: Sequence[Any]) -> None:
        units, expires, counts = grant
        if not units:
            self.refused[shape] = float(expires)  # not asked for again in this bucket
            return
        self.refused.pop(shape, None)
        old = self.leases.get(shape)
        if old is not None:
            self._end(old)
        lease = Lease(lease_id, shape, int(units), float(expires), counts)
        self.leases[shape] = lease
        key, series, windows = shape
        for j, (window, _) in enumerate(windows):
            self._by_counter[(key, series, window)] = (lease, j)
        self._at(lease.expires, lease)

    def wants_lease(self, shape: Shape, now: float) -> bool:
        """Whether to ask for a lease along with a decision on `shape` that no
        lease covers: not while one is being asked for or the owner just
        said no, and only for a shape with more than one decision in the
        last second or two. A lease for one decision would only add its
        return to the traffic."""
        second = math.floor(now)
        seen = self._seen.get(shape)
        if seen is None:
            if len(self._seen) >= _SEEN_MAX:
                self._seen = {s: v for s, v in self._seen.items() if v[0] >= second - 1}
            seen = self._seen[shape] = [second, 0, 0]
        if seen[0] != second:
            seen[2] = seen[1] if seen[0] == second - 1 else 0
            seen[0], seen[1] = second, 0
        seen[1] += 1
        if seen[1] + seen[2] < 2:
            return False
        until = self.refused.get(shape)
        if until is not None and now < until:
            return False
        return shape not in self.asking

    def retire(self, shape: Shape) -> None:
        """End the shape's lease now (spent too far for the next decision)."""
        lease = self.leases.get(shape)
        if lease is not None:
            self._end(lease)

    # -- endings -----------------------------------------------------------------------

    def _tally(self, counter: Counter, now: float) -> Tally:
        window = counter[2]
        width = window / SLOTS
        index = math.floor(now / width)
        tally = self.tallies.get(counter)
        if tally is not None and tally.index == index and not tally.done:
            return tally
        if tally is not None:
            self._end(tally)
        tally = self.tallies[counter] = Tally(counter, now, index)
        self._at(min((index + 1) * width, _next_tick(now)), tally)
        return tally

    def _at(self, expires: float, held: Lease | Tally) -> None:
        group = self._ending.get(expires)
        if group is None:
            group = self._ending[expires] = []
            # One timer per moment: leases of one bucket end together, so
            # their returns to one owner go in one frame.
            self._loop.call_later(max(0.0, expires - time.time()), self._expire, expires)
        group.append(held)

    def _expire(self, expires: float) -> None:
        early = expires - time.time()
        if early > 0:
            # The loop's timers may fire a little early (whole milliseconds, a
            # loop time cached at the start of its turn); ended here, a lease
            # is returned and renewed in this same turn, in one op.
            self._loop.call_later(max(early, 0.001), self._expire, expires)
            return
        ended = [h for h in self._ending.pop(expires, []) if not h.done]
        for held in ended:
            if isinstance(held, Lease):
                held.renew = held.units > min(held.left)
            self._forget(held)
            held.done = True
        if ended:
            self._on_end(ended)

    def _end(self, held: Lease | Tally) -> None:
        if held.done:
            return
        self._forget(held)
        held.done = True
        self._on_end([held])

    def _forget(self, held: Lease | Tally) -> None:
        if isinstance(held, Lease):
            if self.leases.get(held.shape) is held:
                del self.leases[held.shape]
                key, series, windows = held.shape
                for window, _ in windows:
                    counter = (key, series, window)
                    if self._by_counter.get(counter, (None,))[0] is held:
                        del self._by_counter[counter]
            elapsed = max(time.time() - held.started, 0.05)
            spent = held.units - min(held.left)
            old = self._rate.get(held.shape, 0.0)
            self._rate[held.shape] = 0.5 * old + 0.5 * spent / elapsed
        elif self.tallies.get(held.counter) is held:
            del self.tallies[held.counter]

    def close(self) -> list[Lease | Tally]:
        """Everything still held, ended now (to return and send before the node closes)."""
        held: list[Lease | Tally] = [*self.leases.values(), *self.tallies.values()]
        for item in held:
            self._forget(item)
            item.done = True
        self._ending.clear()
        return held


def _next_tick(now: float) -> float:
    """The next multiple of LONGEST: what ends then ends together (one timer,
    one frame per owner)."""
    return (math.floor(now / LONGEST) + 1) * LONGEST
