"""The engine's side of the counter ring: each call goes to its keys' owners.

A call's ops are grouped by owner on the node's current ring, one request
per owner (a local owner is called directly, with no socket). A decision
whose keys live on several owners is a reservation on each of them, then
confirmed or released on all. After "moved" or "retry" a call waits for
the ring to settle and tries again; a reservation starts again under a new
shard rid once the partial one is released, so nothing counts twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster import wire
from cluster.counting import Op, Outcome
from cluster.ring import Ring
from worker.counters.client import RESERVATION_TTL, CounterUnavailable
from worker.counters.owner import ERROR, MOVED, OK, RETRY

if TYPE_CHECKING:
    from worker.counters.node import CounterNode

log = logging.getLogger(__name__)

_BACKOFF = (0.002, 0.05)

# A read of counts that only grow (messages, failed AUTHs) may be answered by
# this node's replica copy instead of a round trip: an owner replicates every
# change before it answers, so the copy is never lower than anything the
# owner has acknowledged, and the message itself is still decided by the
# owner's reservation at the end of DATA. The bounce ratio's counts go down
# when a deferred message is delivered, so they are always read from the owner.
_READ_AT_REPLICA = frozenset({"msg", "fail"})
_LOCAL_REPLICA = "\0replica"


@dataclass
class _Held:
    """A reservation this node made for its engine: what to confirm, where."""

    shard_rid: str
    ops: tuple[Op, ...]
    outcome: Outcome
    expires: float
    owners: tuple[str, ...] = ()  # each op's owner when it was reserved

    def rid_of(self, index: int) -> str:
        return _part_rid(self.shard_rid, self.owners[index])


def _part_rid(shard_rid: str, owner: str) -> str:
    # Each owner's part is its own reservation: a node that holds one part as
    # a replica and owns another must not take the second for a replay of
    # the first. The part keeps its id when its keys move to a new owner.
    return f"{shard_rid}@{owner}"


class Call:
    """One engine call: its deadline, and whether it crossed a socket."""

    __slots__ = ("deadline", "remote", "started")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.remote = False
        self.started = time.perf_counter()


class RoutedCounters:
    """The `CounterClient` a worker's engine uses: every call goes to the keys'
    owners on the node's current ring."""

    def __init__(self, node: CounterNode) -> None:
        self._node = node
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._reserving: dict[str, asyncio.Future[Outcome]] = {}

    async def check(self, ops: Sequence[Op]) -> Outcome:
        return await self._decision("check", ops)

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        return await self._reserve(rid, ops)

    async def confirm(self, rid: str) -> bool:
        return await self._settle("confirm", rid)

    async def release(self, rid: str) -> bool:
        return await self._settle("release", rid)

    async def add(self, ops: Sequence[Op]) -> Outcome:
        return await self._decision("add", ops)

    async def mark(self, ops: Sequence[Op]) -> None:
        await self._decision("mark", ops)

    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Each key's rows as its owner sees them (``CounterShard.snapshot``)."""
        return {key: await self._node.inspect(key) for key in keys}

    async def _decision(self, kind: str, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._node._call()
        try:
            return _merge(len(ops), await self._route(kind, "", ops, range(len(ops)), call))
        finally:
            self._observed(call)

    async def _reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._node._call()
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
            self._observed(call)

    async def _reserve_once(self, rid: str, ops: tuple[Op, ...], call: Call) -> Outcome:
        delay = _BACKOFF[0]
        while True:
            ring, epoch = await self._node._ring_for(call)
            # Fresh on every attempt: an owner that saw an earlier,
            # released attempt must count this one, not replay that one.
            shard_rid = f"{rid}/{self._node._rid()}"
            owners = tuple(ring.owner(op.key) for op in ops)

            def rid_of(index: int, shard_rid: str = shard_rid,
                       owners: tuple[str, ...] = owners) -> str:
                # Bound now: an undo in the background outlives this attempt.
                return _part_rid(shard_rid, owners[index])

            parts = await self._send_groups("reserve", shard_rid, ops, range(len(ops)), ring,
                                            epoch, call, rid_of)
            replies = [(idx, r) for idx, r in parts if isinstance(r, wire.CounterReply)]
            failed = [r for _, r in parts if not isinstance(r, wire.CounterReply)]
            refused = [r for _, r in replies if r.status == ERROR]
            unsettled = [r for _, r in replies if r.status in (MOVED, RETRY)]
            # Undo wherever it may have counted: granted, or no answer at all.
            held_by = [i for idx, r in parts
                       if not isinstance(r, wire.CounterReply) or _granted(r) for i in idx]
            if not (failed or refused or unsettled):
                outcome = _merge(len(ops), replies)
                if outcome.ok:
                    expires = asyncio.get_running_loop().time() + RESERVATION_TTL
                    self._held[rid] = _Held(shard_rid, ops, outcome, expires, owners)
                else:
                    await self._undo(shard_rid, ops, held_by, call, rid_of)
                return outcome
            await self._undo(shard_rid, ops, held_by, None if failed or refused else call, rid_of)
            if failed:
                raise failed[0]
            if refused:
                raise CounterUnavailable(f"counter owner refused: {refused[0].detail}")
            delay = await self._settle_wait(max(r.epoch for r in unsettled), delay, call)

    async def _settle(self, kind: str, rid: str) -> bool:
        """Confirm or release on every current owner of the reservation's keys."""
        call = self._node._call()
        try:
            held = self._held.get(rid)
            if held is None or held.expires <= asyncio.get_running_loop().time():
                return False
            ops = held.ops
            try:
                parts = await self._route(kind, held.shard_rid, ops, range(len(ops)), call,
                                          held.rid_of)
            except CounterUnavailable:
                if kind == "confirm":
                    self._node._spawn(self._confirm_later(held))
                raise
            return all(reply.result for _, reply in parts)
        finally:
            self._observed(call)

    async def _confirm_later(self, held: _Held) -> None:
        # The message behind it is accepted: if the reservation expired
        # unconfirmed it would count nowhere, so keep trying while it lives
        # (after a failover the new owner holds the replicated reservation).
        node, loop = self._node, asyncio.get_running_loop()
        while loop.time() < held.expires:
            call = Call(min(loop.time() + node.request_timeout, held.expires))
            try:
                await self._route("confirm", held.shard_rid, held.ops, range(len(held.ops)), call,
                                  held.rid_of)
                return
            except CounterUnavailable:
                await asyncio.sleep(min(node.request_timeout, max(call.deadline - loop.time(), 0)))
        log.warning("reservation %s expired unconfirmed", held.shard_rid)

    async def _undo(self, shard_rid: str, ops: tuple[Op, ...], indices: list[int],
                    call: Call | None, rid_of: Callable[[int], str]) -> None:
        """Release the parts of a reservation that did not go through everywhere.
        Without a `call` it runs in the background: the caller is failing anyway."""
        if not indices:
            return
        own = call or self._node._call()
        job = self._route("release", shard_rid, ops, indices, own, rid_of)
        if call is None:
            self._node._spawn(_quietly(job, shard_rid))
        else:
            await _quietly(job, shard_rid)

    async def _route(self, kind: str, reservation: str, ops: tuple[Op, ...],
                     indices: Iterable[int], call: Call,
                     rid_of: Callable[[int], str] | None = None) -> list[_Part]:
        """Send each op to its owner until every owner answered "ok"."""
        todo, answered, delay = list(indices), [], _BACKOFF[0]
        while todo:
            ring, epoch = await self._node._ring_for(call)
            parts = await self._send_groups(kind, reservation, ops, todo, ring, epoch, call,
                                            rid_of)
            todo, newest = [], epoch
            for idx, reply in parts:
                if not isinstance(reply, wire.CounterReply):
                    raise reply
                if reply.status == OK:
                    answered.append((idx, reply))
                elif reply.status in (MOVED, RETRY):
                    todo.extend(idx)
                    newest = max(newest, reply.epoch)
                else:
                    raise CounterUnavailable(f"counter owner refused: {reply.detail}")
            if todo:
                delay = await self._settle_wait(newest, delay, call)
        return answered

    async def _send_groups(self, kind: str, reservation: str, ops: tuple[Op, ...],
                           indices: Iterable[int], ring: Ring, epoch: int, call: Call,
                           rid_of: Callable[[int], str] | None = None,
                           ) -> list[tuple[list[int], wire.CounterReply | Exception]]:
        node = self._node
        groups: dict[tuple[str, str], list[int]] = {}
        for i in indices:
            part = rid_of(i) if rid_of is not None else reservation
            owner, replica = ring.locate(ops[i].key)
            if kind == "check" and replica == node.name and ops[i].series in _READ_AT_REPLICA:
                owner = _LOCAL_REPLICA
            groups.setdefault((owner, part), []).append(i)

        async def ask(target: tuple[str, str], idx: list[int]) -> wire.CounterReply:
            owner, part = target
            group = tuple(ops[i] for i in idx)
            request = wire.CounterRequest(node._rid(), epoch, kind, part, group)
            if owner == _LOCAL_REPLICA:
                return wire.CounterReply(request.rid, OK, epoch, node.shard.check(group))
            if owner == node.name:
                reply, pushes = node._owned.decide(request)
                if pushes:
                    await node._owned.replicate(pushes)
                return reply
            call.remote = True
            peer = node._peers.get(owner)
            if peer is None:
                raise CounterUnavailable(f"no connection to counter owner {owner}")
            answer = await peer.ask(wire.encode(request), request.rid, call.deadline, True)
            if not isinstance(answer, wire.CounterReply) or not _complete(kind, answer, len(idx)):
                raise CounterUnavailable(f"counter owner {owner} sent a malformed answer")
            return answer

        if len(groups) == 1:
            (target, idx), = groups.items()
            try:
                return [(idx, await ask(target, idx))]
            except (CounterUnavailable, ValueError) as exc:
                return [(idx, exc)]
        replies = await asyncio.gather(*(ask(t, idx) for t, idx in groups.items()),
                                       return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply  # cancellation
        return list(zip(groups.values(), replies, strict=True))  # type: ignore[arg-type]

    async def _settle_wait(self, newest: int, delay: float, call: Call) -> float:
        """After "moved" or "retry": wait for this node's ring to reach the epoch
        an owner already has, or a short backoff while an owner takes hand-offs."""
        node = self._node
        loop = asyncio.get_running_loop()
        if newest > node._epoch:
            while node._epoch < newest:
                if not await node._wait_change(call.deadline - loop.time()):
                    break
        else:
            await node._wait_change(min(delay, call.deadline - loop.time()))
        if loop.time() >= call.deadline:
            raise CounterUnavailable("counter owners did not settle on a ring in time")
        return min(delay * 2, _BACKOFF[1])

    def _observed(self, call: Call) -> None:
        observe = self._node._observe
        if observe is not None:
            observe(time.perf_counter() - call.started, call.remote)


_Part = tuple[list[int], wire.CounterReply]


def _merge(size: int, parts: Iterable[_Part]) -> Outcome:
    """Owners' outcomes back in the decision's op order."""
    counts, denied = [0] * size, None
    for idx, reply in parts:
        outcome = reply.outcome
        if outcome is None:
            continue
        for j, i in enumerate(idx):
            counts[i] = outcome.counts[j]
        if outcome.denied is not None and (denied is None or idx[outcome.denied] < denied):
            denied = idx[outcome.denied]
    return Outcome(denied is None, tuple(counts), denied)


def _granted(reply: wire.CounterReply) -> bool:
    return reply.status == OK and reply.outcome is not None and reply.outcome.ok


def _complete(kind: str, reply: wire.CounterReply, size: int) -> bool:
    if reply.status != OK or kind not in ("check", "reserve", "add"):
        return True
    return reply.outcome is not None and len(reply.outcome.counts) == size


async def _quietly(job: Coroutine[object, object, list[_Part]], shard_rid: str) -> None:
    try:
        await job
    except (CounterUnavailable, ValueError) as exc:
        log.warning("reservation %s not released, it expires instead: %s", shard_rid, exc)
