"""The owner's side of a counter request: decide, replicate, then answer.

`OwnedKeys.decide` checks ownership and calls the shard in one synchronous
step, so ownership cannot change between the check and the count. A
decision that changed something is exported in that same step and pushed
to each key's replica, and only then answered. Answers are remembered by
request rid, so a resent request is answered again without counting again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cluster import wire
from cluster.counting import Outcome
from cluster.ring import Ring
from worker.counters.client import RESERVATION_TTL, CounterUnavailable
from worker.counters.peer import Peer

if TYPE_CHECKING:
    from worker.counters.node import CounterNode

log = logging.getLogger(__name__)

OK, MOVED, RETRY, ERROR = "ok", "moved", "retry", "error"
# Owner-side memory of answered request rids: enough for every request that
# can still be resent within a request timeout at a few thousand per second.
_REPLY_CACHE = 16384

Push = tuple[Peer, str, bytes]  # replica, rid, encoded Replicate


class OwnedKeys:
    """Answers `CounterRequest`s for the keys its node owns in the node's epoch."""

    def __init__(self, node: CounterNode) -> None:
        self._node = node
        self._replies: OrderedDict[str, asyncio.Future[wire.CounterReply]] = OrderedDict()

    def on_request(self, ident: bytes, request: wire.CounterRequest) -> None:
        node = self._node
        known = self._replies.get(request.rid)
        if known is not None:
            if known.done():
                node._reply(ident, known.result())
            else:
                node._spawn(self._reply_when(ident, known))
            return
        try:
            reply, pushes = self.decide(request)
        except ValueError as exc:
            reply, pushes = wire.CounterReply(request.rid, ERROR, node._epoch, detail=str(exc)), []
        if reply.status != OK or request.kind == "check":
            node._reply(ident, reply)  # nothing counted: a repeat may be answered afresh
            return
        answered: asyncio.Future[wire.CounterReply] = asyncio.get_running_loop().create_future()
        self._replies[request.rid] = answered
        while len(self._replies) > _REPLY_CACHE:
            self._replies.popitem(last=False)
        if pushes:
            node._spawn(self._replicate_then_reply(ident, answered, reply, pushes))
        else:
            answered.set_result(reply)
            node._reply(ident, reply)

    async def _reply_when(self, ident: bytes, answered: asyncio.Future[wire.CounterReply]) -> None:
        self._node._reply(ident, await asyncio.shield(answered))

    async def _replicate_then_reply(
        self,
        ident: bytes,
        answered: asyncio.Future[wire.CounterReply],
        reply: wire.CounterReply,
        pushes: list[Push],
    ) -> None:
        await self.replicate(pushes)
        answered.set_result(reply)
        self._node._reply(ident, reply)

    def decide(self, request: wire.CounterRequest) -> tuple[wire.CounterReply, list[Push]]:
        """Answer from the shard if this node owns every key; no await in here,
        so ownership cannot change between the check and the count."""
        node = self._node
        ring, epoch, rid = node._ring, node._epoch, request.rid
        if ring is None:
            return wire.CounterReply(rid, RETRY, epoch, detail="no ring yet"), []
        keys = list(dict.fromkeys(op.key for op in request.ops))
        for key in keys:
            if ring.owner(key) != node.name:
                return wire.CounterReply(rid, MOVED, epoch, detail=key), []
        if not node._active:
            prev = node._prev
            if prev is None or any(prev.owner(key) != node.name for key in keys):
                return wire.CounterReply(rid, RETRY, epoch, detail="hand-off under way"), []
        shard, kind, ops = node.shard, request.kind, request.ops
        outcome: Outcome | None = None
        result = changed = True
        if kind == "check":
            outcome, changed = shard.check(ops), False
        elif kind == "reserve":
            outcome = shard.reserve(request.reservation, ops, RESERVATION_TTL)
            changed = outcome.ok
        elif kind == "confirm":
            result = changed = shard.confirm(request.reservation)
        elif kind == "release":
            result = changed = shard.release(request.reservation)
        elif kind == "add":
            outcome = shard.add(ops)
        else:
            shard.mark(ops)
        reply = wire.CounterReply(rid, OK, epoch, outcome, result)
        return reply, (self._replication(ring, keys, request.reservation) if changed else [])

    def _replication(self, ring: Ring, keys: Iterable[str], reservation: str) -> list[Push]:
        # Exported now, in the same step as the change, so every replica
        # gets a state at least as new as the answer it guards.
        node = self._node
        by_replica: dict[str, list[str]] = {}
        for key in keys:
            replica = ring.replica(key)
            if replica is not None and replica != node.name:
                by_replica.setdefault(replica, []).append(key)
        pushes = []
        for name, names in by_replica.items():
            peer = node._peers.get(name)
            if peer is not None:
                rid = node._rid()
                # Only the reservation this request changed: the others went
                # out with their own changes, and a hot key has thousands.
                data = node.shard.export(names, [reservation] if reservation else ())
                pushes.append((peer, rid, wire.encode(wire.Replicate(rid, node._epoch, data))))
        return pushes

    async def replicate(self, pushes: list[Push]) -> None:
        # Half the request timeout, so a remote caller still gets the answer
        # in time when a replica is gone.
        deadline = asyncio.get_running_loop().time() + self._node.request_timeout / 2
        await asyncio.gather(*(self._push(p, rid, frame, deadline) for p, rid, frame in pushes))

    async def _push(self, peer: Peer, rid: str, frame: bytes, deadline: float) -> None:
        if peer.suspect:
            peer.post(frame)
            return
        try:
            await peer.ask(frame, rid, deadline, resend=False)
        except CounterUnavailable:
            if not peer.suspect:
                log.warning("counter node %s: replica %s did not acknowledge; answering "
                            "without waiting for it until it is heard from",
                            self._node.name, peer.name)
            peer.suspect = True
