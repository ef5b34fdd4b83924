"""``sendguard counters reset``: every counter of some keys, on owner and replica, once.

The coordinator names the reset with an id and asks one worker, whose node
sends each owner its keys under ``{id}@{owner}``. The owner forgets the
keys' counts, sends the same request on to each key's replica (``replica``
set) and waits for its answer before it answers. Owner and replica both
remember the part ids they applied, so a request repeated (a resend, the
coordinator asking a second worker) is answered again without resetting
again, which would wipe counts that arrived since.

Replication merges by maximum, so an ordinary replication could never
lower the replica's counts: this is the one change sent as an instruction.
A replica that does not answer in time keeps its old counts; if it then
became the owner, the key would count high, which only under-admits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster import wire
from worker.counters.client import CounterUnavailable
from worker.counters.owner import MOVED, OK, RETRY

if TYPE_CHECKING:
    from worker.counters.node import CounterNode

log = logging.getLogger(__name__)

_REMEMBERED = 4096  # reset parts applied here; resets are rare, by hand


class KeyResets:
    def __init__(self, node: CounterNode) -> None:
        self._node = node
        self._applied: OrderedDict[str, int] = OrderedDict()

    # -- asking the owners (the worker the coordinator asked) ----------------------

    async def reset(self, keys: Sequence[str], rid: str,
                    timeout: float) -> tuple[int, list[str]]:
        """Reset ``keys`` on their owners; returns (counters cleared, owners asked)."""
        node, loop = self._node, asyncio.get_running_loop()
        deadline = loop.time() + timeout
        todo, cleared, owners = list(dict.fromkeys(keys)), 0, set()
        while todo:
            call = node._call()
            call.deadline = deadline
            ring, epoch = await node._ring_for(call)
            groups: dict[str, list[str]] = {}
            for key in todo:
                groups.setdefault(ring.owner(key), []).append(key)
            todo, newest = [], epoch
            for owner, part in groups.items():
                request = wire.ResetRequest(f"{rid}@{owner}", epoch, part)
                reply = await self._ask(owner, request, deadline)
                if reply.status == OK:
                    cleared += reply.cleared
                    owners.add(owner)
                else:
                    todo += part
                    newest = max(newest, reply.epoch)
            if todo:
                if loop.time() >= deadline:
                    raise CounterUnavailable("the keys' owners did not settle on a ring in time")
                if newest > node.epoch:
                    await node._wait_change(deadline - loop.time())
                else:
                    await asyncio.sleep(0.05)
        return cleared, sorted(owners)

    async def _ask(self, owner: str, request: wire.ResetRequest,
                   deadline: float) -> wire.ResetReply:
        node = self._node
        if owner == node.name:
            return await self.as_owner(request, deadline)
        peer = node._peers.get(owner)
        if peer is None:
            raise CounterUnavailable(f"no connection to counter owner {owner}")
        reply = await peer.ask(wire.encode(request), request.rid, deadline, True)
        if not isinstance(reply, wire.ResetReply):
            raise CounterUnavailable(f"{owner} answered a reset with {reply.TYPE}")
        return reply

    # -- answering (owner and replica) ---------------------------------------------

    def on_request(self, ident: bytes, request: wire.ResetRequest) -> None:
        node = self._node
        if request.replica:
            cleared = self._apply(request.rid, request.keys)
            node._reply(ident, wire.ResetReply(request.rid, OK, node.epoch, cleared))
            return
        deadline = asyncio.get_running_loop().time() + node.request_timeout

        async def answer() -> None:
            node._reply(ident, await self.as_owner(request, deadline))

        node._spawn(answer())

    async def as_owner(self, request: wire.ResetRequest, deadline: float) -> wire.ResetReply:
        node = self._node
        ring, epoch = node._ring, node.epoch
        if ring is None:
            return wire.ResetReply(request.rid, RETRY, epoch)
        if any(ring.owner(key) != node.name for key in request.keys):
            return wire.ResetReply(request.rid, MOVED, epoch)
        if not node.active():
            return wire.ResetReply(request.rid, RETRY, epoch)  # hand-offs still arriving
        cleared = self._apply(request.rid, request.keys)
        by_replica: dict[str, list[str]] = {}
        for key in request.keys:
            replica = ring.replica(key)
            if replica is not None and replica != node.name:
                by_replica.setdefault(replica, []).append(key)
        for replica, keys in by_replica.items():
            await self._tell_replica(replica, wire.ResetRequest(request.rid, epoch, keys, True),
                                     deadline)
        return wire.ResetReply(request.rid, OK, epoch, cleared)

    async def _tell_replica(self, name: str, request: wire.ResetRequest,
                            deadline: float) -> None:
        peer = self._node._peers.get(name)
        try:
            if peer is None:
                raise CounterUnavailable(f"no connection to {name}")
            await peer.ask(wire.encode(request), request.rid, deadline, True)
        except CounterUnavailable as exc:
            log.warning("counter node %s: replica %s did not confirm reset %s: %s",
                        self._node.name, name, request.rid, exc)

    def _apply(self, rid: str, keys: Sequence[str]) -> int:
        known = self._applied.get(rid)
        if known is not None:
            return known
        cleared = self._node.shard.reset(keys)
        self._applied[rid] = cleared
        while len(self._applied) > _REMEMBERED:
            self._applied.popitem(last=False)
        return cleared
