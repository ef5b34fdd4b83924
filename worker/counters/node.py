"""A worker's place in the counter ring: serve the keys it owns, ask owners for the rest.

One `CounterNode` per worker process, created inside its running event loop.
It binds a ROUTER that peers send `CounterRequest`, `Replicate`, `Handoff`,
`HandoffDone` and `InspectRequest` to, and keeps one DEALER per peer for its
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
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import count

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from cluster import wire
from cluster.counting import Op, Outcome
from cluster.ring import Ring
from worker.counters.client import RESERVATION_TTL, CounterClient, CounterUnavailable
from worker.counters.shard import CounterShard

log = logging.getLogger(__name__)

OK, MOVED, RETRY, ERROR = "ok", "moved", "retry", "error"
# Owner-side memory of answered request rids: enough for every request that
# can still be resent within a request timeout at a few thousand per second.
_REPLY_CACHE = 16384
_HANDOFF_CHUNK = 1000
_BACKOFF = (0.002, 0.05)

_Push = tuple["_Peer", str, bytes]  # replica, rid, encoded Replicate


@dataclass(frozen=True)
class CurveKeys:
    """This node's CURVE key pair and every member's public key (z85 or raw).

    The same pair serves as server key on the ROUTER and client key on the
    DEALERs, so only ring members can connect."""

    secret_key: bytes
    public_key: bytes
    server_public_keys: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Held:
    """A reservation this node made for its engine: what to confirm, where."""

    shard_rid: str
    ops: tuple[Op, ...]
    outcome: Outcome
    expires: float


class _Call:
    """One engine call: its deadline, and whether it crossed a socket."""

    __slots__ = ("deadline", "remote", "started")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.remote = False
        self.started = time.perf_counter()


class _Peer:
    """One DEALER to a member's ROUTER, any number of requests in flight."""

    def __init__(self, name: str, endpoint: str, sock: zmq.asyncio.Socket,
                 on_liveness: Callable[[], None]) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sock = sock
        self.pending: dict[str, asyncio.Future[wire.Message]] = {}
        # Set when a replica missed an ack: later replications do not wait
        # for it until it is heard from again, or every decision would pay
        # the timeout until the coordinator removes a dead worker.
        self.suspect = False
        # Whether the connection is up: a killed process drops it at once.
        # `dropped` remembers a loss until the next epoch: the member may have
        # been restarted under its name, with nothing in its shard.
        self.alive = False
        self.dropped = False
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        sock.connect(endpoint)
        self.reader = asyncio.create_task(self._read())
        self.watcher = asyncio.create_task(self._watch(on_liveness))

    async def _watch(self, on_liveness: Callable[[], None]) -> None:
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            self.dropped = self.dropped or (self.alive and event != zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.alive = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            on_liveness()

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                message = wire.decode(frame)
            except wire.WireError as exc:
                log.warning("counter peer %s sent a bad frame: %s", self.name, exc)
                continue
            self.suspect = False
            waiter = self.pending.get(getattr(message, "rid", ""))
            if waiter is not None and not waiter.done():
                waiter.set_result(message)

    async def send(self, frame: bytes, deadline: float) -> None:
        sending = self.sock.send(frame)
        if not sending.done():
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(sending, max(timeout, 0))
            except TimeoutError:
                raise CounterUnavailable(f"counter peer {self.name}: send queue full") from None

    def post(self, frame: bytes) -> None:
        """Send if it can go at once; drop it otherwise."""
        sending = self.sock.send(frame, flags=zmq.NOBLOCK)
        sending.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def ask(self, frame: bytes, rid: str, deadline: float, resend: bool) -> wire.Message:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[wire.Message] = loop.create_future()
        self.pending[rid] = waiter
        try:
            await self.send(frame, deadline)
            if resend:
                # Once, half way: a frame queued to a peer that restarted is
                # lost. The owner answers a repeated rid without counting again.
                await asyncio.wait({waiter}, timeout=max((deadline - loop.time()) / 2, 0))
                if not waiter.done():
                    await self.send(frame, deadline)
            return await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
        except TimeoutError:
            raise CounterUnavailable(f"counter peer {self.name} did not answer in time") from None
        finally:
            if self.pending.get(rid) is waiter:
                del self.pending[rid]

    def close(self, linger_ms: int) -> None:
        self.reader.cancel()
        self.watcher.cancel()
        self.alive = False
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(CounterUnavailable(f"connection to {self.name} closed"))
        self.sock.close(linger=linger_ms)


class _MemberKeys:
    """ZAP check for CURVE clients: only ring members' public keys."""

    def __init__(self, curve: CurveKeys) -> None:
        self.allowed = {_z85(key) for key in curve.server_public_keys.values()}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed


def _z85(key: bytes) -> bytes:
    return zmq.utils.z85.encode(key) if len(key) == 32 else key


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
        self._peers: dict[str, _Peer] = {}
        self._retired: list[_Peer] = []
        self._ring: Ring | None = None
        self._prev: Ring | None = None
        self._epoch = 0
        self._active = False
        self._needed: set[str] = set()
        self._leaving: dict[str, _Peer] = {}
        self._done: dict[int, set[str]] = {}
        self._changed = asyncio.Event()
        self._ring_lock = asyncio.Lock()
        self._replies: OrderedDict[str, asyncio.Future[wire.CounterReply]] = OrderedDict()
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._reserving: dict[str, asyncio.Future[Outcome]] = {}
        # Unique across restarts: an owner's reply cache must never mistake a
        # new request for an old one from this worker's previous life.
        self._rid_prefix = f"{name}.{secrets.token_hex(4)}."
        self._seq = count()
        self._client = RoutedCounters(self)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._ctx is not None:
            raise RuntimeError(f"counter node {self.name} already started")
        _check_endpoint(self.endpoint, self._curve)
        self._ctx = zmq.asyncio.Context()
        # Kept before binding, so that close() releases it if the bind fails.
        router = self._router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", _MemberKeys(self._curve))
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
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, self._linger_ms())
            if self._curve is not None:
                sock.curve_secretkey = self._curve.secret_key
                sock.curve_publickey = self._curve.public_key
                sock.curve_serverkey = self._curve.server_public_keys[name]
            self._peers[name] = _Peer(name, endpoint, sock, self._check_active)
        for name in [n for n in self._peers if n not in endpoints]:
            self._retire(self._peers.pop(name))

    def _retire(self, peer: _Peer) -> None:
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
            self._on_request(ident, message)
        elif isinstance(message, wire.Replicate):
            if self._absorb(message.data, "replicate"):
                self._reply(ident, wire.ReplicateAck(message.rid))
        elif isinstance(message, wire.Handoff):
            self._absorb(message.data, f"hand-off from {message.sender}")
        elif isinstance(message, wire.HandoffDone):
            self._on_done(message)
        elif isinstance(message, wire.InspectRequest):
            self._reply(ident, wire.InspectReply(message.rid, self.shard.snapshot(message.key)))
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

    def _on_request(self, ident: bytes, request: wire.CounterRequest) -> None:
        known = self._replies.get(request.rid)
        if known is not None:
            if known.done():
                self._reply(ident, known.result())
            else:
                self._spawn(self._reply_when(ident, known))
            return
        try:
            reply, pushes = self._decide(request)
        except ValueError as exc:
            reply, pushes = wire.CounterReply(request.rid, ERROR, self._epoch, detail=str(exc)), []
        if reply.status != OK or request.kind == "check":
            self._reply(ident, reply)  # nothing counted: a repeat may be answered afresh
            return
        answered: asyncio.Future[wire.CounterReply] = asyncio.get_running_loop().create_future()
        self._replies[request.rid] = answered
        while len(self._replies) > _REPLY_CACHE:
            self._replies.popitem(last=False)
        if pushes:
            self._spawn(self._replicate_then_reply(ident, answered, reply, pushes))
        else:
            answered.set_result(reply)
            self._reply(ident, reply)

    async def _reply_when(self, ident: bytes, answered: asyncio.Future[wire.CounterReply]) -> None:
        self._reply(ident, await asyncio.shield(answered))

    async def _replicate_then_reply(
        self,
        ident: bytes,
        answered: asyncio.Future[wire.CounterReply],
        reply: wire.CounterReply,
        pushes: list[_Push],
    ) -> None:
        await self._replicate(pushes)
        answered.set_result(reply)
        self._reply(ident, reply)

    def _decide(self, request: wire.CounterRequest) -> tuple[wire.CounterReply, list[_Push]]:
        """Answer from the shard if this node owns every key; no await in here,
        so ownership cannot change between the check and the count."""
        ring, epoch, rid = self._ring, self._epoch, request.rid
        if ring is None:
            return wire.CounterReply(rid, RETRY, epoch, detail="no ring yet"), []
        keys = list(dict.fromkeys(op.key for op in request.ops))
        for key in keys:
            if ring.owner(key) != self.name:
                return wire.CounterReply(rid, MOVED, epoch, detail=key), []
        if not self._active:
            prev = self._prev
            if prev is None or any(prev.owner(key) != self.name for key in keys):
                return wire.CounterReply(rid, RETRY, epoch, detail="hand-off under way"), []
        shard, kind, ops = self.shard, request.kind, request.ops
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

    def _replication(self, ring: Ring, keys: Iterable[str], reservation: str) -> list[_Push]:
        # Exported now, in the same step as the change, so every replica
        # gets a state at least as new as the answer it guards.
        by_replica: dict[str, list[str]] = {}
        for key in keys:
            replica = ring.replica(key)
            if replica is not None and replica != self.name:
                by_replica.setdefault(replica, []).append(key)
        pushes = []
        for name, names in by_replica.items():
            peer = self._peers.get(name)
            if peer is not None:
                rid = self._rid()
                version, counts, reservations = self.shard.export(names)
                # Only the reservation this request changed: the others went
                # out with their own changes, and a hot key has thousands.
                mine = [r for r in reservations if r[0] == reservation] if reservation else []
                data = [version, counts, mine]
                pushes.append((peer, rid, wire.encode(wire.Replicate(rid, self._epoch, data))))
        return pushes

    async def _replicate(self, pushes: list[_Push]) -> None:
        # Half the request timeout, so a remote caller still gets the answer
        # in time when a replica is gone.
        deadline = asyncio.get_running_loop().time() + self.request_timeout / 2
        await asyncio.gather(*(self._push(p, rid, frame, deadline) for p, rid, frame in pushes))

    async def _push(self, peer: _Peer, rid: str, frame: bytes, deadline: float) -> None:
        if peer.suspect:
            peer.post(frame)
            return
        try:
            await peer.ask(frame, rid, deadline, resend=False)
        except CounterUnavailable:
            if not peer.suspect:
                log.warning("counter node %s: replica %s did not acknowledge; answering "
                            "without waiting for it until it is heard from", self.name, peer.name)
            peer.suspect = True

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

    async def _decision(self, kind: str, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._call()
        try:
            return _merge(len(ops), await self._route(kind, "", ops, range(len(ops)), call))
        finally:
            self._observed(call)

    async def _reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        ops, call = tuple(ops), self._call()
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

    async def _reserve_once(self, rid: str, ops: tuple[Op, ...], call: _Call) -> Outcome:
        delay = _BACKOFF[0]
        while True:
            ring, epoch = await self._ring_for(call)
            # Fresh on every attempt: an owner that saw an earlier,
            # released attempt must count this one, not replay that one.
            shard_rid = f"{rid}/{self._rid()}"
            parts = await self._send_groups("reserve", shard_rid, ops, range(len(ops)), ring,
                                            epoch, call)
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
                    self._held[rid] = _Held(shard_rid, ops, outcome, expires)
                else:
                    await self._undo(shard_rid, ops, held_by, call)
                return outcome
            await self._undo(shard_rid, ops, held_by, None if failed or refused else call)
            if failed:
                raise failed[0]
            if refused:
                raise CounterUnavailable(f"counter owner refused: {refused[0].detail}")
            delay = await self._settle_wait(max(r.epoch for r in unsettled), delay, call)

    async def _settle(self, kind: str, rid: str) -> bool:
        """Confirm or release on every current owner of the reservation's keys."""
        call = self._call()
        try:
            held = self._held.get(rid)
            if held is None or held.expires <= asyncio.get_running_loop().time():
                return False
            ops = held.ops
            try:
                parts = await self._route(kind, held.shard_rid, ops, range(len(ops)), call)
            except CounterUnavailable:
                if kind == "confirm":
                    self._spawn(self._confirm_later(held))
                raise
            return all(reply.result for _, reply in parts)
        finally:
            self._observed(call)

    async def _confirm_later(self, held: _Held) -> None:
        # The message behind it is accepted: if the reservation expired
        # unconfirmed it would count nowhere, so keep trying while it lives
        # (after a failover the new owner holds the replicated reservation).
        loop = asyncio.get_running_loop()
        while loop.time() < held.expires:
            call = _Call(min(loop.time() + self.request_timeout, held.expires))
            try:
                await self._route("confirm", held.shard_rid, held.ops, range(len(held.ops)), call)
                return
            except CounterUnavailable:
                await asyncio.sleep(min(self.request_timeout, max(call.deadline - loop.time(), 0)))
        log.warning("reservation %s expired unconfirmed", held.shard_rid)

    async def _undo(self, shard_rid: str, ops: tuple[Op, ...], indices: list[int],
                    call: _Call | None) -> None:
        """Release the parts of a reservation that did not go through everywhere.
        Without a `call` it runs in the background: the caller is failing anyway."""
        if not indices:
            return
        own = call or self._call()
        job = self._route("release", shard_rid, ops, indices, own)
        if call is None:
            self._spawn(_quietly(job, shard_rid))
        else:
            await _quietly(job, shard_rid)

    async def _route(self, kind: str, reservation: str, ops: tuple[Op, ...],
                     indices: Iterable[int], call: _Call) -> list[_Part]:
        """Send each op to its owner until every owner answered "ok"."""
        todo, answered, delay = list(indices), [], _BACKOFF[0]
        while todo:
            ring, epoch = await self._ring_for(call)
            parts = await self._send_groups(kind, reservation, ops, todo, ring, epoch, call)
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
                           indices: Iterable[int], ring: Ring, epoch: int,
                           call: _Call) -> list[tuple[list[int], wire.CounterReply | Exception]]:
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(ring.owner(ops[i].key), []).append(i)

        async def ask(owner: str, idx: list[int]) -> wire.CounterReply:
            group = tuple(ops[i] for i in idx)
            request = wire.CounterRequest(self._rid(), epoch, kind, reservation, group)
            if owner == self.name:
                reply, pushes = self._decide(request)
                if pushes:
                    await self._replicate(pushes)
                return reply
            call.remote = True
            peer = self._peers.get(owner)
            if peer is None:
                raise CounterUnavailable(f"no connection to counter owner {owner}")
            reply = await peer.ask(wire.encode(request), request.rid, call.deadline, True)
            if not isinstance(reply, wire.CounterReply) or not _complete(kind, reply, len(idx)):
                raise CounterUnavailable(f"counter owner {owner} sent a malformed answer")
            return reply

        if len(groups) == 1:
            (owner, idx), = groups.items()
            try:
                return [(idx, await ask(owner, idx))]
            except (CounterUnavailable, ValueError) as exc:
                return [(idx, exc)]
        replies = await asyncio.gather(*(ask(o, idx) for o, idx in groups.items()),
                                       return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply  # cancellation
        return list(zip(groups.values(), replies))  # type: ignore[arg-type]

    async def _ring_for(self, call: _Call) -> tuple[Ring, int]:
        while self._ring is None:
            remaining = call.deadline - asyncio.get_running_loop().time()
            if not await self._wait_change(remaining):
                raise CounterUnavailable("no counter ring yet")
        return self._ring, self._epoch

    async def _settle_wait(self, newest: int, delay: float, call: _Call) -> float:
        """After "moved" or "retry": wait for this node's ring to reach the epoch
        an owner already has, or a short backoff while an owner takes hand-offs."""
        loop = asyncio.get_running_loop()
        if newest > self._epoch:
            while self._epoch < newest:
                if not await self._wait_change(call.deadline - loop.time()):
                    break
        else:
            await self._wait_change(min(delay, call.deadline - loop.time()))
        if loop.time() >= call.deadline:
            raise CounterUnavailable("counter owners did not settle on a ring in time")
        return min(delay * 2, _BACKOFF[1])

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

    def _call(self) -> _Call:
        return _Call(asyncio.get_running_loop().time() + self.request_timeout)

    def _observed(self, call: _Call) -> None:
        if self._observe is not None:
            self._observe(time.perf_counter() - call.started, call.remote)

    def _linger_ms(self) -> int:
        return max(500, int(self.request_timeout * 1000))


class RoutedCounters:
    """The `CounterClient` a worker's engine uses: every call goes to the keys'
    owners on the node's current ring."""

    def __init__(self, node: CounterNode) -> None:
        self._node = node

    async def check(self, ops: Sequence[Op]) -> Outcome:
        return await self._node._decision("check", ops)

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        return await self._node._reserve(rid, ops)

    async def confirm(self, rid: str) -> bool:
        return await self._node._settle("confirm", rid)

    async def release(self, rid: str) -> bool:
        return await self._node._settle("release", rid)

    async def add(self, ops: Sequence[Op]) -> Outcome:
        return await self._node._decision("add", ops)

    async def mark(self, ops: Sequence[Op]) -> None:
        await self._node._decision("mark", ops)


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


def _check_endpoint(endpoint: str, curve: CurveKeys | None) -> None:
    if endpoint.startswith("ipc://"):
        folder = os.path.dirname(endpoint[len("ipc://"):]) or "."
        mode = os.stat(folder).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise ValueError(f"counter socket folder {folder} must be private (0700), "
                             f"is {stat.S_IMODE(mode):o}")
    elif endpoint.startswith("tcp://") and curve is None:
        log.warning("counter endpoint %s is tcp:// without CURVE: anyone who can reach it "
                    "can change counters", endpoint)
