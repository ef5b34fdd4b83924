"""A worker's place in the counter ring: serve the keys it owns, ask owners for the rest.

One `CounterNode` per worker process, created inside its running event loop.
It binds a ROUTER that peers send `CounterRequest`, `Replicate`, `Handoff`,
`HandoffDone`, `InspectRequest` and `ResetRequest` to, and keeps one DEALER per peer for its
own requests, with replies matched by rid (frames: ``cluster.wire``).

Correctness rests on four rules (ARCHITECTURE, "Counters and the ring"):

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

This module keeps the node's lifecycle, its ROUTER, epochs and hand-offs;
answering as owner is `owner.py`, the engine's calls are `routing.py`,
the DEALER links to members are `peer.py`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from itertools import count

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from cluster import wire
from cluster.ring import Ring
from worker.counters.client import CounterClient, CounterUnavailable
from worker.counters.owner import ERROR, MOVED, OK, RETRY, OwnedKeys
from worker.counters.peer import CurveKeys, MemberKeys, Peer, check_endpoint, dealer
from worker.counters.reset import KeyResets
from worker.counters.routing import Call, RoutedCounters
from worker.counters.shard import CounterShard

# Callers import these from here, wherever they are defined.
__all__ = ["ERROR", "MOVED", "OK", "RETRY", "CounterNode", "CurveKeys", "RoutedCounters"]

log = logging.getLogger(__name__)

_HANDOFF_CHUNK = 1000


class CounterNode:
    """`start()` binds; `apply_ring()` for every epoch the coordinator publishes;
    the engine uses `client`; `close()` last.

    `observe(seconds, remote)` is called once per client call. `curve` is
    for tcp:// between hosts. `handoff_timeout` bounds how long a new epoch
    waits for members' hand-offs before serving anyway (and logging it)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        shard: CounterShard,
        request_timeout: float,
        observe: Callable[[float, bool], None] | None = None,
        curve: CurveKeys | None = None,
        *,
        handoff_timeout: float = 5.0,
    ) -> None:
        if request_timeout <= 0 or handoff_timeout <= 0:
            raise ValueError("request_timeout and handoff_timeout must be positive")
        self.name = name
        self.endpoint = endpoint  # the bound address once started (a tcp port may be chosen)
        self.shard = shard
        self.request_timeout = request_timeout
        self.handoff_timeout = handoff_timeout
        self._observe = observe
        self._curve = curve
        self._ctx: zmq.asyncio.Context | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[str, Peer] = {}
        self._retired: list[Peer] = []
        self._ring: Ring | None = None
        self._prev: Ring | None = None
        self._epoch = 0
        self._active = False
        self._needed: set[str] = set()
        self._leaving: dict[str, Peer] = {}
        self._done: dict[int, set[str]] = {}
        self._changed = asyncio.Event()
        self._ring_lock = asyncio.Lock()
        # Unique across restarts: an owner's reply cache must never mistake a
        # new request for an old one from this worker's previous life.
        self._rid_prefix = f"{name}.{secrets.token_hex(4)}."
        self._seq = count()
        self._owned = OwnedKeys(self)
        self._client = RoutedCounters(self)
        self._resets = KeyResets(self)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._ctx is not None:
            raise RuntimeError(f"counter node {self.name} already started")
        check_endpoint(self.endpoint, self._curve)
        self._ctx = zmq.asyncio.Context()
        # Kept before binding, so that close() releases it if the bind fails.
        router = self._router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", MemberKeys(self._curve))
            router.curve_secretkey = self._curve.secret_key
            router.curve_publickey = self._curve.public_key
            router.curve_server = True
        router.bind(self.endpoint)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._spawn(self._serve_forever())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        peers = [*self._retired, *self._peers.values()]
        for peer in self._retired:
            peer.close(0)
        for peer in self._peers.values():
            # Lingering lets hand-offs queued by a leaving node reach their owners.
            peer.close(self._linger_ms())
        await asyncio.gather(*(t for peer in peers for t in (peer.reader, peer.watcher)),
                             return_exceptions=True)
        self._retired, self._peers = [], {}
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await asyncio.to_thread(ctx.term)

    @property
    def client(self) -> CounterClient:
        return self._client

    @property
    def epoch(self) -> int:
        return self._epoch

    def active(self) -> bool:
        return self._active

    async def wait_active(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._active:
            if not await self._wait_change(deadline - asyncio.get_running_loop().time()):
                return self._active
        return True

    # -- membership --------------------------------------------------------------

    async def apply_ring(self, epoch: int, members: Sequence[tuple[str, str]]) -> None:
        """Switch to `epoch`, hand off what moved, tell every member it is done.

        Returns once the hand-offs are queued on their sockets: a member
        leaving the ring may be stopped after that (`close` lingers to
        deliver them)."""
        if self._ctx is None:
            raise RuntimeError(f"counter node {self.name} not started")
        endpoints = {name: endpoint for name, endpoint in members}
        if self._curve is not None:
            unknown = [n for n in endpoints if n not in self._curve.server_public_keys]
            if unknown:
                raise ValueError(f"no CURVE public key for ring members {unknown}")
        async with self._ring_lock:
            if epoch <= self._epoch:
                log.info("counter node %s: epoch %d ignored, at %d", self.name, epoch, self._epoch)
                return
            if self._ring is not None and self.name in self._ring and not self._active:
                # What this node hands off next is what it holds now, so it
                # first takes in the previous epoch's hand-offs.
                await self.wait_active(self.handoff_timeout)
            new, old = Ring(list(endpoints)), self._ring
            self._needed, self._leaving = set(), {}
            if self.name in new:
                # A fresh node does not know who held its keys: it waits for everyone.
                before = set(new.members if old is None else old.members)
                self._needed = (before & set(new.members)) - {self.name}
                self._leaving = {n: p for n, p in self._peers.items()
                                 if n in before and n not in new}
            restarted = {n for n, p in self._peers.items() if p.dropped and n in new}
            for peer in self._peers.values():
                peer.dropped = False
            self._connect(endpoints)
            self._prev, self._ring, self._epoch = old, new, epoch
            self._active = False
            self._done = {e: names for e, names in self._done.items() if e >= epoch}
            self._check_active()
            if not self._active:
                self._spawn(self._activate_later(epoch))
            self._notify()
            log.info("counter node %s: epoch %d, members %s", self.name, epoch, list(new.members))
            if old is not None:
                await self._hand_off(old, new, epoch, restarted)
            done = wire.encode(wire.HandoffDone(epoch, self.name))
            for name in new.members:
                if name != self.name:
                    await self._send_to(name, done)

    def _connect(self, endpoints: dict[str, str]) -> None:
        assert self._ctx is not None
        for name, endpoint in endpoints.items():
            peer = self._peers.get(name)
            if name == self.name or (peer is not None and peer.endpoint == endpoint):
                continue
            if peer is not None:
                self._retire(peer)
            sock = dealer(self._ctx, name, self._linger_ms(), self._curve)
            self._peers[name] = Peer(name, endpoint, sock, self._check_active)
        for name in [n for n in self._peers if n not in endpoints]:
            self._retire(self._peers.pop(name))

    def _retire(self, peer: Peer) -> None:
        # Kept a while: requests already sent to it have their own deadline,
        # and its liveness tells whether to wait for its hand-off.
        self._retired.append(peer)

        def close() -> None:
            if peer in self._retired:
                self._retired.remove(peer)
                peer.close(0)
                self._check_active()

        delay = max(self.request_timeout, self.handoff_timeout)
        asyncio.get_running_loop().call_later(delay, close)

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
        await self._send_to(target, wire.encode(wire.Handoff(epoch, self.name, data)))

    async def _send_to(self, name: str, frame: bytes) -> None:
        peer = self._peers.get(name)
        if peer is None:
            return
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        try:
            await peer.send(frame, deadline)
        except CounterUnavailable as exc:
            log.warning("counter node %s: %s", self.name, exc)

    def _on_done(self, message: wire.HandoffDone) -> None:
        if message.epoch < self._epoch:
            return
        self._done.setdefault(message.epoch, set()).add(message.sender)
        if message.epoch == self._epoch:
            self._check_active()

    def _check_active(self) -> None:
        if self._active:
            return
        done = self._done.get(self._epoch, set())
        # A member that left is waited for while it is still connected: it
        # may still count in the old epoch. Once dead it counts nothing, and
        # the replica that inherits its keys already holds their counts.
        leaving = {name for name, peer in self._leaving.items() if peer.alive}
        if (self._needed | leaving) <= done:
            self._active = True
            self._notify()

    async def _activate_later(self, epoch: int) -> None:
        await asyncio.sleep(self.handoff_timeout)
        if self._epoch == epoch and not self._active:
            missing = sorted(self._needed - self._done.get(epoch, set()))
            log.warning("counter node %s: epoch %d, no hand-off from %s after %.1fs; serving",
                        self.name, epoch, missing, self.handoff_timeout)
            self._active = True
            self._notify()

    # -- serving peers -------------------------------------------------------------

    async def _serve_forever(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                log.warning("counter node %s: %d-frame message dropped", self.name, len(frames))
                continue
            ident, frame = frames
            try:
                self._dispatch(ident, wire.decode(frame))
            except wire.WireError as exc:
                log.warning("counter node %s: bad frame dropped: %s", self.name, exc)
            except Exception:
                # One peer's odd message must not stop this node serving the others.
                log.exception("counter node %s: message not handled", self.name)

    def _dispatch(self, ident: bytes, message: wire.Message) -> None:
        if isinstance(message, wire.CounterRequest):
            self._owned.on_request(ident, message)
        elif isinstance(message, wire.Replicate):
            if self._absorb(message.data, "replicate"):
                self._reply(ident, wire.ReplicateAck(message.rid))
        elif isinstance(message, wire.Handoff):
            self._absorb(message.data, f"hand-off from {message.sender}")
        elif isinstance(message, wire.HandoffDone):
            self._on_done(message)
        elif isinstance(message, wire.InspectRequest):
            self._reply(ident, wire.InspectReply(message.rid, self.shard.snapshot(message.key)))
        elif isinstance(message, wire.ResetRequest):
            self._resets.on_request(ident, message)
        else:
            log.warning("counter node %s: unexpected %s dropped", self.name, message.TYPE)

    def _reply(self, ident: bytes, message: wire.Message) -> None:
        if self._router is not None:
            # A ROUTER never blocks on send: nothing to await.
            self._router.send_multipart([ident, wire.encode(message)])

    def _absorb(self, data: object, what: str) -> bool:
        try:
            self.shard.import_(data)
        except (ValueError, TypeError) as exc:
            log.warning("counter node %s: %s not applied: %s", self.name, what, exc)
            return False
        return True

    # -- asking owners -------------------------------------------------------------

    async def inspect(self, key: str) -> list[dict]:
        """The key's rows as its owner sees them (`CounterShard.snapshot`)."""
        call = self._call()
        ring, _ = await self._ring_for(call)
        owner = ring.owner(key)
        if owner == self.name:
            return self.shard.snapshot(key)
        peer = self._peers.get(owner)
        if peer is None:
            raise CounterUnavailable(f"no connection to counter owner {owner}")
        rid = self._rid()
        reply = await peer.ask(wire.encode(wire.InspectRequest(rid, key)), rid, call.deadline, True)
        if not isinstance(reply, wire.InspectReply):
            raise CounterUnavailable(f"{owner} answered an inspect with {reply.TYPE}")
        return list(reply.rows)

    async def reset(self, keys: Sequence[str], rid: str,
                    timeout: float = 5.0) -> tuple[int, list[str]]:
        """Forget every count of ``keys`` on their owners and replicas, once per ``rid``
        (:mod:`worker.counters.reset`); returns (counters cleared, owners)."""
        return await self._resets.reset(keys, rid, timeout)

    async def _ring_for(self, call: Call) -> tuple[Ring, int]:
        while self._ring is None:
            remaining = call.deadline - asyncio.get_running_loop().time()
            if not await self._wait_change(remaining):
                raise CounterUnavailable("no counter ring yet")
        return self._ring, self._epoch

    # -- plumbing ------------------------------------------------------------------

    async def _wait_change(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, job: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rid(self) -> str:
        return f"{self._rid_prefix}{next(self._seq)}"

    def _call(self) -> Call:
        return Call(asyncio.get_running_loop().time() + self.request_timeout)

    def _linger_ms(self) -> int:
        return max(500, int(self.request_timeout * 1000))
