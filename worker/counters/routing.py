"""The engine's side of the counter ring: each call goes to its keys' owners.

A call's ops go to their owners through ``router.py`` (grouped by owner,
tried again after "moved" or "retry"). A decision whose keys live on
several owners is a reservation on each of them, released on all if any
refuses; after "moved" or "retry" a reservation starts again under a new
shard rid once the partial one is released, so nothing counts twice.

Reads are answered from this node's shard when it owns the keys or holds
their replica (an exact copy: the owner replicates every change, in order,
before it answers). A reservation whose limited counters are covered by
leases this node holds is decided here too (``leases.py``); otherwise it
asks the owner, and borrows for the next ones in the same request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cluster import wire
from cluster.counting import Op, Outcome, judge
from cluster.ring import Ring
from cluster.wire import Status
from worker.counters.client import RESERVATION_TTL, CounterUnavailable
from worker.counters.leases import Lease, LeaseBook, Shape, Tally, Use
from worker.counters.links import RingLinks
from worker.counters.owner import OwnedKeys
from worker.counters.router import (
    BACKOFF,
    Call,
    OwnerRouter,
    Reply,
    gather_replies,
    granted,
    merge,
    quietly,
)
from worker.counters.shard import CounterShard

# One owner's ops of a decision: owner, op positions, limited shapes (shape ->
# op positions), plain-count op positions, whether leases can decide them.
_Group = tuple[str, list[int], dict[Shape, list[int]], list[int], bool]
_PLANS = 4096
_ALL = 2**31 - 1  # unused units of a lease whose size is not known: all of them


class _Held:
    """A reservation this node made for its engine: what to release, where."""

    __slots__ = ("shard_rid", "ops", "outcome", "expires", "owners", "asked", "uses")

    def __init__(self, shard_rid: str, ops: tuple[Op, ...], outcome: Outcome, expires: float,
                 owners: tuple[str, ...], asked: list[int], uses: list[Use]) -> None:
        self.shard_rid = shard_rid
        self.ops = ops
        self.outcome = outcome
        self.expires = expires
        self.owners = owners  # each op's owner when it was reserved
        self.asked = asked  # the ops reserved at their owners (the rest spent leases)
        self.uses = uses

    def rid_of(self, index: int) -> str:
        return _part_rid(self.shard_rid, self.owners[index])


def _part_rid(shard_rid: str, owner: str) -> str:
    # Each owner's part is its own reservation: a node that holds one part as
    # a replica and owns another must not take the second for a replay of
    # the first. The part keeps its id when its keys move to a new owner.
    return f"{shard_rid}@{owner}"


class RoutedCounters:
    """The `CounterClient` a worker's engine uses: every call goes to the keys'
    owners on the node's current ring, or to leases it holds from them."""

    def __init__(self, links: RingLinks, owned: OwnedKeys, shard: CounterShard) -> None:
        self._links = links
        self._owned = owned
        self._shard = shard
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._reserving: dict[str, asyncio.Future[Outcome]] = {}
        self._book = LeaseBook(self._ended)
        self._plans: dict[tuple[Op, ...], list[_Group]] = {}
        self._plans_ring: Ring | None = None
        # Off: every reservation goes to its owners (to measure, or to compare).
        self.leasing = True
        self._router = OwnerRouter(links, owned, shard)

    # -- the CounterClient protocol -------------------------------------------------

    async def check(self, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._router.call()
        try:
            counts = [0] * len(ops)
            for idx, reply in await self._router.route("check", "", ops, range(len(ops)), call):
                for j, n in zip(idx, reply[wire.A_VALUE][1], strict=True):
                    counts[j] = n
            self._book.adjust(ops, range(len(ops)), counts)
            return judge(ops, counts)
        finally:
            self._router.observed(call)

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._router.call()
        try:
            now = asyncio.get_running_loop().time()
            while self._held and next(iter(self._held.values())).expires <= now:
                self._held.popitem(last=False)
            held = self._held.get(rid)
            if held is not None:
                return held.outcome
            # A second call with the same rid while the first runs waits for it.
            running = self._reserving.get(rid)
            if running is not None:
                return await asyncio.shield(running)
            running = self._reserving[rid] = asyncio.get_running_loop().create_future()
            try:
                outcome = await self._reserve_once(rid, ops, call)
            except asyncio.CancelledError:
                running.cancel()
                raise
            except Exception as exc:
                running.set_exception(exc)
                running.exception()  # retrieved: nobody else may be waiting
                raise
            else:
                running.set_result(outcome)
            finally:
                del self._reserving[rid]
            return outcome
        finally:
            self._router.observed(call)

    async def release(self, rid: str) -> bool:
        """Release a reservation on every current owner of its keys, and give
        back what it spent of leases."""
        call = self._router.call()
        try:
            held = self._held.get(rid)
            if held is None or held.expires <= asyncio.get_running_loop().time():
                return False
            uses, held.uses = held.uses, []
            late = self._give_back(uses)
            if late is not None:
                await late
            if not held.asked:
                return True
            parts = await self._router.route("release", held.shard_rid, held.ops, held.asked, call,
                                      held.rid_of)
            return all(reply[wire.A_VALUE] for _, reply in parts)
        finally:
            self._router.observed(call)

    async def add(self, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._router.call()
        try:
            return merge(len(ops), await self._router.route("add", "", ops, range(len(ops)), call))
        finally:
            self._router.observed(call)

    async def mark(self, ops: Sequence[Op]) -> None:
        ops, call = tuple(ops), self._router.call()
        try:
            await self._router.route("mark", "", ops, range(len(ops)), call)
        finally:
            self._router.observed(call)

    async def reset(self, keys: Sequence[str]) -> int:
        """Forget every count of `keys` and their part of open reservations at
        their owners (and replicas); how many counters held a count. A lease
        still open keeps its units counted until its borrower returns them."""
        return (await self.reset_once(keys, self._links.rid()))[0]

    async def reset_once(self, keys: Sequence[str], rid: str,
                         timeout: float | None = None) -> tuple[int, list[str]]:
        """`reset` named `rid`: asked again with the same `rid` (from this node or
        any other), an owner answers what it cleared the first time and clears
        nothing. Returns (counters cleared, owners asked)."""
        parts = await self._router.by_key("reset", keys, lambda owner: f"{rid}@{owner}", timeout)
        return (sum(int(reply[wire.A_VALUE]) for _, reply in parts),
                sorted({owner for owner, _ in parts}))

    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per key, its rows as its owner sees them (`CounterShard.rows`)."""
        rows: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        for _, reply in await self._router.by_key("inspect", keys):
            rows.update(reply[wire.A_VALUE])
        return rows

    async def close(self) -> None:
        """Return what this node holds of leases, and send its tallies."""
        self._router.closing = True
        ended = self._book.close()
        if ended:
            self._ended(ended)

    # -- reserving ------------------------------------------------------------------

    async def _reserve_once(self, rid: str, ops: tuple[Op, ...], call: Call) -> Outcome:
        links, book, loop = self._links, self._book, asyncio.get_running_loop()
        delay = BACKOFF[0]
        patient = True
        while True:
            ring, epoch = await links.ring_for(call.deadline)
            now = time.time()
            plans = []
            waiting: list[asyncio.Future[None]] = []
            for owner, idx, limited, plain, leasable in self._plan(ops, ring):
                covered = self.leasing and leasable and bool(limited) and \
                    book.covers(ops, limited, now)
                if not covered and self.leasing and patient:
                    waiting += [book.wait(s, max(ops[i].amount for i in sub))
                                for s, sub in limited.items() if s in book.asking]
                plans.append((owner, idx, limited, plain, leasable, covered))
            if waiting:
                # A lease for these is on its way: decide on it, not per message.
                # Not for long: that request began before this call, and this
                # call still needs the time to ask the owner itself.
                patience = (call.deadline - loop.time()) / 2
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, patience))
                patient = len(done) == len(waiting)
                continue
            counts = [0] * len(ops)
            uses: list[Use] = []
            asked: list[int] = []
            requests: list[tuple[str, list[int], list[list[Any]], list[Shape]]] = []
            for owner, idx, limited, plain, leasable, covered in plans:
                if covered:
                    seen = self._seen_here(ops, idx, ring)
                    uses += book.spend(ops, limited, plain, now, counts)
                    for i, n in seen.items():
                        counts[i] = n
                    continue
                asks: list[list[Any]] = []
                shapes: list[Shape] = []
                if self.leasing and leasable:
                    for shape, sub in limited.items():
                        if book.covers(ops, {shape: sub}, now):
                            continue
                        book.retire(shape)  # too little left for this decision: return it
                        if book.wants_lease(shape, now):
                            ask = [links.rid(), book.want(shape, max(ops[i].amount for i in sub)),
                                   [idx.index(i) for i in sub]]
                            asks.append(ask)
                            shapes.append(shape)
                            book.asking[shape] = (loop.create_future(), ask)
                asked += idx
                requests.append((owner, idx, asks, shapes))
            if not requests:
                outcome = Outcome(True, tuple(counts), None)
                self._keep(rid, "", ops, outcome, (), [], uses)
                return outcome
            # Fresh on every attempt: an owner that saw an earlier,
            # released attempt must count this one, not replay that one.
            shard_rid = f"{rid}/{links.rid()}"
            owners = tuple(self._router.locate(ring, op.key)[0] for op in ops)

            def rid_of(index: int, shard_rid: str = shard_rid,
                       owners: tuple[str, ...] = owners) -> str:
                # Bound now: an undo in the background outlives this attempt.
                return _part_rid(shard_rid, owners[index])

            jobs = []
            for owner, idx, asks, shapes in requests:
                item = [links.rid(), epoch, "reserve", rid_of(idx[0]),
                        [ops[i] for i in idx], asks or None]
                jobs.append(self._borrow(owner, item, shapes, call))
            try:
                replies = await gather_replies(jobs)
            except BaseException:
                self._give_back_later(uses)
                raise  # cancellation
            parts: list[tuple[list[int], Reply | BaseException]] = [
                (r[1], reply) for r, reply in zip(requests, replies, strict=True)]
            good = [(idx, r) for idx, r in parts if isinstance(r, list)]
            failed = [r for _, r in parts if isinstance(r, Exception)]
            refused = [r for _, r in good if r[wire.A_STATUS] == Status.ERROR]
            unsettled = [r for _, r in good if r[wire.A_STATUS] in (Status.MOVED, Status.RETRY)]
            # Undo wherever it may have counted: granted, or no answer at all.
            held_by = [i for idx, r in parts if not isinstance(r, list) or granted(r)
                       for i in idx]
            if not (failed or refused or unsettled):
                for idx, reply in good:
                    outcome = reply[wire.A_VALUE]
                    for j, n in zip(idx, outcome[1], strict=True):
                        counts[j] = n
                denied = min((idx[r[wire.A_VALUE][2]] for idx, r in good
                              if not r[wire.A_VALUE][0]), default=None)
                outcome = Outcome(denied is None, tuple(counts), denied)
                if outcome.ok:
                    self._keep(rid, shard_rid, ops, outcome, owners, asked, uses)
                else:
                    self._give_back_later(uses)
                    await self._undo(shard_rid, ops, held_by, call, rid_of)
                return outcome
            self._give_back_later(uses)
            await self._undo(shard_rid, ops, held_by, None if failed or refused else call,
                             rid_of)
            if failed:
                raise failed[0]
            if refused:
                raise CounterUnavailable(f"counter owner refused: {refused[0][wire.A_DETAIL]}")
            delay = await self._router.settle_wait(max(r[wire.A_EPOCH] for r in unsettled), delay,
                                            call)

    def _seen_here(self, ops: tuple[Op, ...], idx: list[int], ring: Ring) -> dict[int, int]:
        """Counts before a decision taken on leases, of the ops whose keys this
        node owns or replicates, as `check` would give them (the engine judges
        shadow limits by them); the others are the lease's own estimate."""
        links = self._links
        if not links.active:
            return {}
        here = [i for i in idx if links.name in self._router.locate(ring, ops[i].key)]
        if not here:
            return {}
        mine = [ops[i] for i in here]
        counts = list(self._shard.check(mine).counts)
        self._book.adjust(mine, range(len(mine)), counts)
        return dict(zip(here, counts, strict=True))

    def _plan(self, ops: tuple[Op, ...], ring: Ring) -> list[_Group]:
        """The decision's ops by owner, with their shapes (`LeaseBook.shapes`).
        Remembered per ring: an engine sends the same decisions again and again."""
        if ring is not self._plans_ring:
            self._plans, self._plans_ring = {}, ring
        plan = self._plans.get(ops)
        if plan is None:
            if len(self._plans) >= _PLANS:
                self._plans.clear()
            by_owner: dict[str, list[int]] = {}
            for i, op in enumerate(ops):
                by_owner.setdefault(self._router.locate(ring, op.key)[0], []).append(i)
            plan = self._plans[ops] = [(owner, idx, *LeaseBook.shapes(ops, idx))
                                       for owner, idx in by_owner.items()]
        return plan

    async def _borrow(self, owner: str, item: list[Any], shapes: list[Shape],
                      call: Call) -> Reply:
        """Send a reserve; take the leases its answer grants."""
        try:
            try:
                reply = await self._router.send(owner, item, call)
            except BaseException:
                self._unanswered(item, shapes)
                raise
            self._take(item, shapes, reply)
            return reply
        finally:
            self._asked(shapes)

    def _take(self, item: list[Any], shapes: list[Shape], reply: Reply) -> None:
        """The leases an owner's answer to `item` granted, for `shapes` in order."""
        grants = reply[wire.A_GRANT] if reply[wire.A_STATUS] == Status.OK else None
        for n, shape in enumerate(shapes):
            if grants is not None and n < len(grants):
                self._book.granted(shape, item[wire.R_EXTRA][n][0], grants[n])

    def _unanswered(self, item: list[Any], shapes: list[Shape]) -> None:
        """No answer to `item`: the owner may have lent all the same. Whatever it
        lent comes back (it takes back at most what it lent), or the units
        would hold the limit's room until the window passes."""
        ring = self._links.ring
        for n, shape in enumerate(shapes if ring is not None else ()):
            key, series, windows = shape
            ops = tuple(Op(key, series, w, m, 0) for w, m in windows)
            self._router.now_or_later("return", item[wire.R_EXTRA][n][0], ops,
                                      [_ALL] * len(windows), ring)  # type: ignore[arg-type]

    def _asked(self, shapes: list[Shape]) -> None:
        """The lease requests for `shapes` are over: decisions waiting on them go on."""
        for shape in shapes:
            asking = self._book.asking.pop(shape, None)
            if asking is not None and not asking[0].done():
                asking[0].set_result(None)

    def _keep(self, rid: str, shard_rid: str, ops: tuple[Op, ...], outcome: Outcome,
              owners: tuple[str, ...], asked: list[int], uses: list[Use]) -> None:
        expires = asyncio.get_running_loop().time() + RESERVATION_TTL
        self._held[rid] = _Held(shard_rid, ops, outcome, expires, owners, asked, uses)

    def _give_back(self, uses: list[Use]) -> Coroutine[Any, Any, None] | None:
        """Give back to leases and tallies what a decision spent; what already
        went to the owners is taken back there, in its bucket, by the job
        returned (the caller awaits it, or it runs in the background)."""
        late = self._book.give_back(uses)
        if not late:
            return None
        ops = tuple(Op(key, series, window, None, -amount, at=at)
                    for (key, series, window), amount, at in late)
        return quietly(self._router.route("mark", "", ops, range(len(ops)), self._router.call()),
                        "a released lease use")

    def _give_back_later(self, uses: list[Use]) -> None:
        job = self._give_back(uses)
        if job is not None:
            self._links.spawn(job)

    async def _undo(self, shard_rid: str, ops: tuple[Op, ...], indices: list[int],
                    call: Call | None, rid_of: Callable[[int], str]) -> None:
        """Release the parts of a reservation that did not go through everywhere.
        Without a `call` it runs in the background: the caller is failing anyway."""
        if not indices:
            return
        own = call or self._router.call()
        job = self._router.route("release", shard_rid, ops, indices, own, rid_of)
        if call is None:
            self._links.spawn(quietly(job, f"reservation {shard_rid}"))
        else:
            await quietly(job, f"reservation {shard_rid}")

    # -- leases and tallies that ended ---------------------------------------------------

    def _ended(self, ended: list[Lease | Tally]) -> None:
        """Renew the ended leases that were spent from, return what the others
        did not spend, send what tallies counted: at once, so that a request
        this iteration sends next goes after them."""
        ring = self._links.ring
        if ring is None:
            return
        renew: dict[str, list[tuple[Shape, str, list[int]]]] = {}
        for held in ended:
            if isinstance(held, Lease):
                key, series, windows = held.shape
                unused = list(held.left)  # the lease is done: its units no longer move
                if held.renew and self.leasing and not self._router.closing:
                    # The return goes in the renewal: one op at the owner.
                    renew.setdefault(ring.owner(key), []).append((held.shape, held.lease_id,
                                                                  unused))
                elif any(unused):
                    self._return(held.shape, held.lease_id, unused)
            elif held.amount > 0:
                key, series, window = held.counter
                ops = (Op(key, series, window, None, held.amount, at=held.at),)
                self._router.now_or_later("mark", "", ops, None, ring)
        # Only leases that ended with their bucket are renewed, and the book
        # ends those no earlier than their expiry: the owner lends the next
        # bucket's.
        for owner, ending in renew.items():
            self._renew(owner, ending)

    def _return(self, shape: Shape, lease_id: str, unused: list[int]) -> None:
        """Give back what a lease did not spend; tried again while its owner keeps it."""
        ring = self._links.ring
        if ring is None or not any(unused):
            return
        key, series, windows = shape
        ops = tuple(Op(key, series, w, m, 0) for w, m in windows)
        self._router.now_or_later("return", lease_id, ops, unused, ring)

    def _renew(self, owner: str, ending: list[tuple[Shape, str, list[int]]]) -> None:
        """Renew at `owner` the leases of `ending` (shape, lease id, unused units):
        one `renew` item returns each and asks for the next bucket's lease of
        its shape. Decisions on these shapes wait for its answer rather than
        ask themselves."""
        links, book = self._links, self._book
        loop = asyncio.get_running_loop()
        now = time.time()
        ops: list[Op] = []
        asks: list[list[Any]] = []
        asked: list[Shape] = []
        for shape, old_id, unused in ending:
            if self._router.closing or links.ring is None or shape in book.asking or \
                    shape in book.leases or book.refused.get(shape, 0) > now:
                self._return(shape, old_id, unused)  # no renewal: just the return
                continue
            key, series, windows = shape
            first = len(ops)
            ops += [Op(key, series, w, m, 0) for w, m in windows]
            # A lease spent to the last unit needs no return.
            ask = [links.rid(), book.want(shape, 0), list(range(first, len(ops))),
                   old_id if any(unused) else "", unused]
            book.asking[shape] = (loop.create_future(), ask)
            asks.append(ask)
            asked.append(shape)
        if not asks:
            return
        item = [links.rid(), links.epoch, "renew", "", ops, asks]
        if owner == links.name:
            reply, wait = self._owned.apply(item)
            if wait is None:
                self._renewed(item, asked, reply)
            else:  # usable once the replica holds it
                wait.add_done_callback(lambda done: self._renewed(item, asked, done))
            return
        peer = links.peers.get(owner)
        if peer is None:
            self._renewed(item, asked, CounterUnavailable(f"no link to {owner}"))
            return
        answer = peer.ask(item, links.deadline())
        answer.add_done_callback(lambda done: self._renewed(item, asked, done))

    def _renewed(self, item: list[Any], shapes: list[Shape],
                 answer: Reply | asyncio.Future[Reply] | BaseException) -> None:
        """Take the leases a `renew` granted. Without an "ok" the old leases go
        back the ordinary way (a return is taken once, however often it is
        sent); without any answer the new ones may have been lent all the
        same, and come back too."""
        try:
            if isinstance(answer, asyncio.Future):
                if answer.cancelled():
                    answer = CounterUnavailable("the renewal was cancelled")
                else:
                    failed = answer.exception()
                    answer = answer.result() if failed is None else failed
            if isinstance(answer, list) and answer[wire.A_STATUS] == Status.OK:
                self._take(item, shapes, answer)
                return
            for shape, ask in zip(shapes, item[wire.R_EXTRA], strict=True):
                if ask[3]:
                    self._return(shape, ask[3], ask[4])
            if not isinstance(answer, list):
                self._unanswered(item, shapes)
        finally:
            self._asked(shapes)
