"""Sending a call's ops to their owners on the ring, until every owner answered.

The routed counter client (``routing.py``) asks its questions through
:class:`OwnerRouter`: ops grouped by owner on the node's current ring, one
request per owner (a local owner is called directly, with no socket;
requests to one remote owner issued in one loop iteration share a frame,
see ``peer.py``), and after "moved" or "retry" a wait for the ring to
settle and another try, until the call's deadline. Reads of keys this node
owns or replicates are answered from its shard. Returns of leases and
tallies, which no engine call waits for, go out at once in order with
what the node sends next, and are tried again in the background when they
do not go through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from cluster import wire
from cluster.counting import Op, Outcome
from cluster.ring import Ring
from cluster.wire import Status
from worker.counters.client import RESERVATION_TTL, CounterUnavailable
from worker.counters.links import RingLinks
from worker.counters.owner import OwnedKeys
from worker.counters.shard import CounterShard

log = logging.getLogger(__name__)

BACKOFF = (0.002, 0.05)

Reply = list[Any]
Part = tuple[list[int], Reply]
Label = TypeVar("Label")
Item = TypeVar("Item")


class Call:
    """One engine call: its deadline, and whether it crossed a socket."""

    __slots__ = ("deadline", "remote", "started")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.remote = False
        self.started = time.perf_counter()


class OwnerRouter:
    def __init__(self, links: RingLinks, owned: OwnedKeys, shard: CounterShard) -> None:
        self._links = links
        self._owned = owned
        self._shard = shard
        # Set when the node closes: what is sent then goes with the link's linger.
        self.closing = False

    def call(self, timeout: float | None = None) -> Call:
        if timeout is None:
            return Call(self._links.deadline())
        return Call(asyncio.get_running_loop().time() + timeout)

    def observed(self, call: Call) -> None:
        observe = self._links.observe
        if observe is not None:
            observe(time.perf_counter() - call.started, call.remote)

    def locate(self, ring: Ring, key: str) -> tuple[str, str | None]:
        """`ring.locate(key)`; remembered by the links while `ring` is current."""
        return self._links.locate(key) if ring is self._links.ring else ring.locate(key)

    def now_or_later(self, kind: str, arg: str, ops: tuple[Op, ...], extra: Any,
                     ring: Ring) -> None:
        """A lease's return or a tally (``kind``), sent now, tried again in the background."""
        links = self._links
        owner = ring.owner(ops[0].key)
        item = [links.rid(), links.epoch, kind, arg, list(ops), extra]
        what = f"lease {arg}" if kind == "return" else f"tally of {ops[0].key}"
        if owner == links.name:
            # Decided now, in order with what this node asks next.
            reply, wait = self._owned.apply(item)
            if reply[wire.A_STATUS] != Status.OK:
                links.spawn(self._again(kind, arg, ops, extra, what))
            elif wait is not None:
                links.spawn(quietly(wait, what))
            return
        peer = links.peers.get(owner)
        if peer is None:
            links.spawn(self._again(kind, arg, ops, extra, what))
            return
        answer = peer.ask(item, links.deadline())

        def settled(future: asyncio.Future[Reply]) -> None:
            if future.cancelled():
                return
            failed = future.exception() is not None
            if self.closing or (not failed and future.result()[wire.A_STATUS] == Status.OK):
                return  # closing: the frame went out with the link's linger
            links.spawn(self._again(kind, arg, ops, extra, what))

        answer.add_done_callback(settled)

    async def _again(self, kind: str, arg: str, ops: tuple[Op, ...], extra: Any,
                     what: str) -> None:
        """A return or a tally that did not go through, through the ring's retries.
        A return is tried for as long as the owner keeps the lease (a lost one
        would hold room until the window passes; returning twice takes back
        nothing more); a tally once more (twice would count twice)."""
        loop = asyncio.get_running_loop()
        end, delay = loop.time() + RESERVATION_TTL, 0.05
        while True:
            try:
                await self.route(kind, arg, ops, range(len(ops)), self.call(), extra=extra)
                return
            except (CounterUnavailable, ValueError) as exc:
                if kind != "return" or self.closing or loop.time() + delay >= end:
                    log.warning("%s not settled, it stays counted: %s", what, exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def route(self, kind: str, arg: str, ops: tuple[Op, ...],
                    indices: Iterable[int], call: Call,
                    rid_of: Callable[[int], str] | None = None, extra: Any = None
                    ) -> list[Part]:
        """Send each op to its owner until every owner answered "ok"."""
        links = self._links
        todo, answered, delay = list(indices), [], BACKOFF[0]
        while todo:
            ring, epoch = await links.ring_for(call.deadline)
            groups: dict[tuple[str, str], list[int]] = {}
            local: list[int] = []
            name, active = links.name, links.active
            for i in todo:
                owner, replica = self.locate(ring, ops[i].key)
                if kind == "check" and active and (owner == name or replica == name):
                    local.append(i)
                    continue
                groups.setdefault((owner, rid_of(i) if rid_of is not None else arg), []).append(i)
            if local:
                outcome = self._shard.check([ops[i] for i in local])
                answered.append((local, [None, Status.OK, epoch, outcome, "", None]))
            if not groups:
                break
            jobs = []
            for (owner, part), idx in groups.items():
                item = [links.rid(), epoch, kind, part, [ops[i] for i in idx], extra]
                jobs.append(self.send(owner, item, call))
            done, todo, newest = _sorted([(idx, idx) for idx in groups.values()],
                                         await gather_replies(jobs), kind, epoch)
            answered += done
            if todo:
                delay = await self.settle_wait(newest, delay, call)
        return answered

    async def by_key(self, kind: str, keys: Sequence[str],
                     arg: Callable[[str], str] = lambda owner: "",
                     timeout: float | None = None) -> list[tuple[str, Reply]]:
        """`reset` or `inspect` of `keys` on their owners, one request each;
        (owner, answer) per owner. `arg(owner)` names each owner's part."""
        call = self.call(timeout)
        links = self._links
        todo, answered, delay = list(dict.fromkeys(keys)), [], BACKOFF[0]
        while todo:
            ring, epoch = await links.ring_for(call.deadline)
            groups: dict[str, list[str]] = {}
            for key in todo:
                groups.setdefault(ring.owner(key), []).append(key)
            replies = await gather_replies([
                self.send(owner, [f"{links.rid()}.{kind}", epoch, kind, arg(owner), [], part],
                          call) for owner, part in groups.items()])
            done, todo, newest = _sorted(list(groups.items()), replies, kind, epoch)
            answered += done
            if todo:
                delay = await self.settle_wait(newest, delay, call)
        return answered

    async def send(self, owner: str, item: list[Any], call: Call) -> Reply:
        if owner == self._links.name:
            return await self._owned.local(item)
        call.remote = True
        reply = await self._links.peer(owner).ask(item, call.deadline)
        if not isinstance(reply, list) or len(reply) != 6:
            raise CounterUnavailable(f"counter owner {owner} sent a malformed answer")
        return reply

    async def settle_wait(self, newest: int, delay: float, call: Call) -> float:
        """After "moved" or "retry": wait for this node's ring to reach the epoch
        an owner already has, or a short backoff while an owner takes hand-offs."""
        links = self._links
        loop = asyncio.get_running_loop()
        if newest > links.epoch:
            while links.epoch < newest:
                if not await links.wait_change(call.deadline - loop.time()):
                    break
        else:
            await links.wait_change(min(delay, call.deadline - loop.time()))
        if loop.time() >= call.deadline:
            raise CounterUnavailable("counter owners did not settle on a ring in time")
        return min(delay * 2, BACKOFF[1])


def merge(size: int, parts: Iterable[Part]) -> Outcome:
    """Owners' outcomes back in the decision's op order."""
    counts, denied = [0] * size, None
    for idx, reply in parts:
        outcome = reply[wire.A_VALUE]
        if outcome is None:
            continue
        for j, i in enumerate(idx):
            counts[i] = outcome[1][j]
        if outcome[2] is not None and (denied is None or idx[outcome[2]] < denied):
            denied = idx[outcome[2]]
    return Outcome(denied is None, tuple(counts), denied)


def granted(reply: Reply) -> bool:
    return reply[wire.A_STATUS] == Status.OK and bool(reply[wire.A_VALUE]) and \
        bool(reply[wire.A_VALUE][0])


def _sorted(asked: list[tuple[Label, list[Item]]], replies: list[Reply | Exception], kind: str,
            epoch: int) -> tuple[list[tuple[Label, Reply]], list[Item], int]:
    """Each owner's answer to what it was ``asked``: the labels of those that answered "ok"
    with their answers, the items to ask again ("moved", "retry"), and the newest epoch
    an owner named."""
    answered: list[tuple[Label, Reply]] = []
    again: list[Item] = []
    newest = epoch
    for (label, items), answer in zip(asked, replies, strict=True):
        reply = _usable(answer, kind, len(items))
        if reply[wire.A_STATUS] == Status.OK:
            answered.append((label, reply))
        else:
            again.extend(items)
            newest = max(newest, reply[wire.A_EPOCH])
    return answered, again, newest


def _usable(reply: Reply | Exception, kind: str, size: int) -> Reply:
    """An owner's "ok", or its "moved" or "retry" (ask again); raises what the owner's
    refusal, a malformed answer or no answer at all means."""
    if isinstance(reply, BaseException):
        raise reply
    status = reply[wire.A_STATUS]
    if status == Status.OK:
        if not _complete(kind, reply, size):
            raise CounterUnavailable("a counter owner sent a malformed answer")
        return reply
    if status in (Status.MOVED, Status.RETRY):
        return reply
    raise CounterUnavailable(f"counter owner refused: {reply[wire.A_DETAIL]}")


def _complete(kind: str, reply: Reply, size: int) -> bool:
    if kind not in ("check", "reserve", "add"):
        return True
    value = reply[wire.A_VALUE]
    return isinstance(value, (list, tuple)) and len(value) == 3 and \
        isinstance(value[1], (list, tuple)) and len(value[1]) == size


async def gather_replies(jobs: list[Coroutine[Any, Any, Reply]]) -> list[Reply | Exception]:
    """Every job's reply or exception; cancellation goes through. One job
    (the usual case) is awaited as it is: no task, no gathering future."""
    if len(jobs) == 1:
        try:
            return [await jobs[0]]
        except Exception as exc:
            return [exc]
    replies = await asyncio.gather(*jobs, return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException) and not isinstance(reply, Exception):
            raise reply
    return replies  # type: ignore[return-value]


async def quietly(job: Coroutine[Any, Any, Any] | asyncio.Future[Any], what: str) -> None:
    try:
        await job
    except (CounterUnavailable, ValueError) as exc:
        log.warning("%s not settled, it stays counted: %s", what, exc)


