"""A worker's place in the counter ring: serve the keys it owns, ask owners for the rest.

One `CounterNode` per worker process, created inside its running event loop.
It binds a ROUTER (ipc://, one host) that the other members' DEALERs send
`CounterRequest`, `Replicate`, `ReplicateAck`, `Handoff` and `HandoffDone`
to, and keeps one DEALER per member for its own requests (frames:
``cluster.wire``; the sockets and the ring live in `links.RingLinks`).

Correctness rests on four rules (docs/ARCHITECTURE.md, "Counters"):

- Only the owner of a key in the owner's current epoch counts it; anyone
  else answers "moved", and nothing is counted before the ownership check,
  which runs in the same synchronous step as the shard call.
- Before answering a state change the owner hands the changed keys to their
  replica and waits for the ack (bounded), so the replica, which the ring
  makes the next owner, already holds the counts when the owner dies.
- On a new epoch each node sends what it held to the keys' new owner and
  replica, then `HandoffDone`; a node answers "retry" for keys it newly
  owns until every surviving member said Done, and every member that left
  but is still connected (it may still count in the old epoch), or until
  `handoff_timeout` passed.
- Retries never count twice: the owner keeps recent replies by request rid,
  the shard's reserve is idempotent, and a client that must start a
  reservation again after "moved" releases the partial one and uses a new
  reservation id on the owners.

A reply that does not come within `request_timeout` raises
`CounterUnavailable`: the engine tempfails, which can only under-admit.

This module keeps the node's lifecycle, epochs and hand-offs; answering as
owner is `owner.py`, the engine's calls are `routing.py` (with `leases.py`),
the DEALER links to members are `peer.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from cluster import wire
from cluster.ring import Ring
from worker.counters.client import CounterClient
from worker.counters.links import RingLinks
from worker.counters.owner import OwnedKeys
from worker.counters.peer import Peer
from worker.counters.routing import RoutedCounters
from worker.counters.shard import CounterShard

__all__ = ["CounterNode", "RoutedCounters"]

log = logging.getLogger(__name__)

_HANDOFF_CHUNK = 1000


class CounterNode:
    """`start()` binds; `apply_ring()` for every epoch the coordinator publishes;
    the engine uses `client`; `close()` last.

    `observe(seconds, remote)` is called once per client call.
    `handoff_timeout` bounds how long a new epoch waits for members'
    hand-offs before serving anyway (and logging it)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        shard: CounterShard,
        request_timeout: float,
        observe: Callable[[float, bool], None] | None = None,
        *,
        handoff_timeout: float = 5.0,
    ) -> None:
        if request_timeout <= 0 or handoff_timeout <= 0:
            raise ValueError("request_timeout and handoff_timeout must be positive")
        self.name = name
        self.endpoint = endpoint  # the bound address once started
        self.shard = shard
        self.request_timeout = request_timeout
        self.handoff_timeout = handoff_timeout
        self.links = RingLinks(name, request_timeout, handoff_timeout, observe)
        self._started = False
        self._needed: set[str] = set()
        self._leaving: dict[str, Peer] = {}
        self._done: dict[int, set[str]] = {}
        self._ring_lock = asyncio.Lock()
        self._owned = OwnedKeys(self.links, shard)
        self._client = RoutedCounters(self.links, self._owned, shard)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError(f"counter node {self.name} already started")
        self._started = True
        self.endpoint = self.links.bind(self.endpoint, self._on_router)

    async def close(self) -> None:
        await self._client.close()
        await self.links.close()

    @property
    def client(self) -> RoutedCounters:
        return self._client

    @property
    def counters(self) -> CounterClient:
        return self._client

    @property
    def epoch(self) -> int:
        return self.links.epoch

    def active(self) -> bool:
        return self.links.active

    async def wait_active(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.links.active:
            if not await self.links.wait_change(deadline - loop.time()):
                return self.links.active
        return True

    async def inspect(self, key: str) -> list[dict[str, Any]]:
        """The key's rows as its owner sees them (`CounterShard.rows`)."""
        return (await self._client.inspect([key])).get(key, [])

    async def reset(self, keys: Sequence[str], rid: str,
                    timeout: float = 5.0) -> tuple[int, list[str]]:
        """`sendguard counters reset` of `keys` on their owners and replicas, once
        per `rid` whichever worker is asked; (counters cleared, owners)."""
        return await self._client.reset_once(keys, rid, timeout)

    # -- membership --------------------------------------------------------------

    async def apply_ring(self, epoch: int, members: Sequence[tuple[str, str]]) -> None:
        """Switch to `epoch`, hand off what moved, tell every member it is done.

        Returns once the hand-offs are queued on their sockets: a member
        leaving the ring may be stopped after that (`close` lingers to
        deliver them)."""
        links = self.links
        if links.ctx is None:
            raise RuntimeError(f"counter node {self.name} not started")
        endpoints = {name: endpoint for name, endpoint in members}
        async with self._ring_lock:
            if epoch <= links.epoch:
                log.info("counter node %s: epoch %d ignored, at %d", self.name, epoch, links.epoch)
                return
            if links.ring is not None and self.name in links.ring and not links.active:
                # What this node hands off next is what it holds now, so it
                # first takes in the previous epoch's hand-offs.
                await self.wait_active(self.handoff_timeout)
            new, old = Ring(list(endpoints)), links.ring
            self._needed, self._leaving = set(), {}
            if self.name in new:
                # A fresh node does not know who held its keys: it waits for everyone.
                before = set(new.members if old is None else old.members)
                self._needed = (before & set(new.members)) - {self.name}
                self._leaving = {n: p for n, p in links.peers.items()
                                 if n in before and n not in new}
            restarted = {n for n, p in links.peers.items() if p.dropped and n in new}
            for peer in links.peers.values():
                peer.dropped = False
            links.connect(endpoints, self._on_peer_frame, self._on_carried, self._check_active)
            links.prev, links.ring, links.epoch = old, new, epoch
            links.active = False
            self._done = {e: names for e, names in self._done.items() if e >= epoch}
            self._check_active()
            if not links.active:
                links.spawn(self._activate_later(epoch))
            links.notify()
            log.info("counter node %s: epoch %d, members %s", self.name, epoch, list(new.members))
            if old is not None:
                await self._hand_off(old, new, epoch, restarted)
            done = wire.encode(wire.HandoffDone(epoch, self.name))
            for name in new.members:
                if name != self.name:
                    await links.send_to(name, done)

    async def _hand_off(self, old: Ring, new: Ring, epoch: int, restarted: set[str]) -> None:
        """Send each key held here to its new owner and replica when they
        changed, or when one of them may have restarted empty (the ring
        alone cannot tell a restart under the same name)."""
        batches: dict[str, list[str]] = {}
        moved = 0
        for n, key in enumerate(self.shard.keys()):
            before = old.locate(key)
            if self.name not in before:
                continue  # a stale copy: whoever held it hands it off
            after = new.locate(key)
            if after == before and restarted.isdisjoint(after):
                continue
            moved += 1
            for target in after:
                if target is None or target == self.name:
                    continue
                batch = batches.setdefault(target, [])
                batch.append(key)
                if len(batch) >= _HANDOFF_CHUNK:
                    await self._send_handoff(target, epoch, batch)
                    batches[target] = []
            if n % _HANDOFF_CHUNK == _HANDOFF_CHUNK - 1:
                # Safe to serve meanwhile: keys that left this node are
                # answered "moved", and later exports include later changes.
                await asyncio.sleep(0)
        for target, batch in batches.items():
            if batch:
                await self._send_handoff(target, epoch, batch)
        log.info("counter node %s: epoch %d, handed off %d keys", self.name, epoch, moved)

    async def _send_handoff(self, target: str, epoch: int, keys: list[str]) -> None:
        data = self.shard.export(keys)
        await self.links.send_to(target, wire.encode(wire.Handoff(epoch, self.name, data)))

    def _on_done(self, message: wire.HandoffDone) -> None:
        if message.epoch < self.links.epoch:
            return
        self._done.setdefault(message.epoch, set()).add(message.sender)
        if message.epoch == self.links.epoch:
            self._check_active()

    def _check_active(self) -> None:
        links = self.links
        if links.active:
            return
        done = self._done.get(links.epoch, set())
        # A member that left is waited for while it is still connected: it
        # may still count in the old epoch. Once dead it counts nothing, and
        # the replica that inherits its keys already holds their counts.
        leaving = {name for name, peer in self._leaving.items() if peer.alive}
        if (self._needed | leaving) <= done:
            links.active = True
            links.notify()

    async def _activate_later(self, epoch: int) -> None:
        await asyncio.sleep(self.handoff_timeout)
        links = self.links
        if links.epoch == epoch and not links.active:
            missing = sorted(self._needed - self._done.get(epoch, set()))
            log.warning("counter node %s: epoch %d, no hand-off from %s after %.1fs; serving",
                        self.name, epoch, missing, self.handoff_timeout)
            links.active = True
            links.notify()

    # -- frames from members ---------------------------------------------------------

    def _on_router(self, ident: bytes, data: list[Any]) -> None:
        kind = data[0]
        if kind == wire.CounterRequest.TYPE:
            self._owned.on_request(ident, data[2])
        elif kind == wire.ReplicateAck.TYPE:
            self._owned.replicator.acked(wire.message(data).rid)  # type: ignore[attr-defined]
        else:
            message = wire.message(data)
            if isinstance(message, wire.Replicate):
                # An owner that could not use its ordered path to us: merged.
                if self._absorb(message.data, "replicate"):
                    self.links.send_router(ident, wire.encode(wire.ReplicateAck(message.rid)))
            elif isinstance(message, wire.Handoff):
                self._absorb(message.data, f"hand-off from {message.sender}")
            elif isinstance(message, wire.HandoffDone):
                self._on_done(message)
            else:
                log.warning("counter node %s: unexpected %s dropped", self.name, message.TYPE)

    def _on_peer_frame(self, peer: Peer, data: list[Any]) -> None:
        message = wire.message(data)
        if isinstance(message, wire.Replicate):
            # The owner's ordered path to its replica: exact when it owns the keys.
            owner = peer.name if message.exact else None
            if self._absorb(message.data, "replicate", owner):
                peer.post(wire.encode(wire.ReplicateAck(message.rid)))
        elif isinstance(message, wire.ReplicateAck):
            self._owned.replicator.acked(message.rid)
        else:
            log.warning("counter node %s: unexpected %s from %s dropped", self.name,
                        message.TYPE, peer.name)

    def _on_carried(self, peer: Peer, data: Any) -> None:
        self._absorb(data, "replication carried by an answer", peer.name)

    def _absorb(self, data: Any, what: str, owner: str | None = None) -> bool:
        """Import `data`; exactly (replacing the copy) when `owner` sent it and
        owns every key in it on this node's ring, merged otherwise."""
        try:
            ring = self.links.ring
            exact = owner is not None and ring is not None and \
                all(ring.owner(entry[0]) == owner for entry in data[1])
            self.shard.import_(data, exact=exact)
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("counter node %s: %s not applied: %s", self.name, what, exc)
            return False
        return True
