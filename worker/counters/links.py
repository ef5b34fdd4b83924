"""What every part of a counter node shares: the ring it is in and its sockets.

`RingLinks` holds the node's ROUTER (read by one `loop.add_reader`
callback, like the DEALERs in ``peer.py``), one `Peer` per other member,
the current and previous ring with the epoch, whether this node serves the
epoch yet, and the request ids it makes. The node (`node.py`) changes the
ring and hand-offs; the owner side (`owner.py`) and the client side
(`routing.py`, `leases.py`) only read it and send through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
from collections.abc import Callable, Coroutine
from itertools import count
from typing import Any

import zmq

from cluster import wire
from cluster.ring import Ring
from worker.counters.client import CounterUnavailable
from worker.counters.peer import OnFrame, OnReplication, Peer, readable

log = logging.getLogger(__name__)

_LOCATED = 65536  # keys whose place on the ring is remembered

# Called for every frame the ROUTER receives: (routing id, plain data).
OnRouterFrame = Callable[[bytes, list[Any]], None]


class RingLinks:
    def __init__(self, name: str, request_timeout: float, handoff_timeout: float,
                 observe: Callable[[float, bool], None] | None = None) -> None:
        self.name = name
        self.request_timeout = request_timeout
        self.handoff_timeout = handoff_timeout
        self.observe = observe
        self.endpoint = ""
        self.ring: Ring | None = None
        self.prev: Ring | None = None
        self.epoch = 0
        self.active = False
        self.frames = 0  # sent on the ROUTER, for benchmarks
        self.peers: dict[str, Peer] = {}
        self.retired: list[Peer] = []
        self.ctx: zmq.Context[Any] | None = None
        self.router: zmq.Socket[Any] | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._on_router: OnRouterFrame | None = None
        # Unique across restarts: an owner's reply cache must never mistake a
        # new request for an old one from this worker's previous life.
        self._located: dict[str, tuple[str, str | None]] = {}
        self._located_on: Ring | None = None
        self._rid_prefix = f"{name}.{secrets.token_hex(4)}."
        self._seq = count()

    # -- the ROUTER ------------------------------------------------------------

    def bind(self, endpoint: str, on_frame: OnRouterFrame) -> str:
        """Bind the ROUTER; returns the bound address."""
        check_endpoint(endpoint)
        self.ctx = zmq.Context()
        # Kept before binding, so that close() releases it if the bind fails.
        router = self.router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # A member restarted under its name takes its routing id over at once;
        # a send to a member not connected fails instead of vanishing.
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind(endpoint)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._on_router = on_frame
        self._loop.add_reader(router.FD, self._drain)
        return self.endpoint

    def send_router(self, ident: bytes, frame: bytes) -> bool:
        """Send on the ROUTER to `ident`; False if it is not connected or its queue is full."""
        router = self.router
        if router is None:
            return False
        try:
            router.send_multipart([ident, frame], zmq.NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH (not connected) or EAGAIN (queue full)
            return False
        finally:
            if readable(router):
                self._loop.call_soon(self._drain)
        self.frames += 1
        return True

    def _drain(self) -> None:
        router = self.router
        while router is not None and readable(router):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                log.warning("counter node %s: %d-frame message dropped", self.name, len(frames))
                continue
            try:
                data = wire.unpack(frames[1])
                assert self._on_router is not None
                self._on_router(frames[0], data)
            except (wire.WireError, ValueError, TypeError, IndexError) as exc:
                log.warning("counter node %s: bad frame dropped: %s", self.name, exc)
            except Exception:
                # One peer's odd message must not stop this node serving the others.
                log.exception("counter node %s: message not handled", self.name)
            router = self.router

    # -- members -----------------------------------------------------------------

    def connect(self, endpoints: dict[str, str], on_frame: OnFrame,
                on_replication: OnReplication, on_liveness: Callable[[], None]) -> None:
        """A Peer for every member in `endpoints` but this node; retire the others."""
        assert self.ctx is not None
        for name, endpoint in endpoints.items():
            peer = self.peers.get(name)
            if name == self.name or (peer is not None and peer.endpoint == endpoint):
                continue
            if peer is not None:
                self.retire(peer, on_liveness)
            # A member back in the ring gets its retired link again: a second
            # DEALER with this node's routing id would take the id over at the
            # member's ROUTER, and answers would go to the one nobody reads.
            again = next((p for p in self.retired if p.name == name and p.endpoint == endpoint
                          and not p.closed), None)
            if again is not None:
                self.retired.remove(again)
                self.peers[name] = again
                continue
            self.peers[name] = Peer(name, endpoint, self.ctx, self.name, self.linger_ms(),
                                    on_liveness, on_frame, on_replication)
        for name in [n for n in self.peers if n not in endpoints]:
            self.retire(self.peers.pop(name), on_liveness)

    def retire(self, peer: Peer, on_liveness: Callable[[], None]) -> None:
        # Kept a while: requests already sent to it have their own deadline,
        # and its liveness tells whether to wait for its hand-off.
        self.retired.append(peer)

        def close() -> None:
            if peer in self.retired:
                self.retired.remove(peer)
                peer.close(0)
                on_liveness()

        self._loop.call_later(max(self.request_timeout, self.handoff_timeout), close)

    def peer(self, name: str) -> Peer:
        peer = self.peers.get(name)
        if peer is None:
            raise CounterUnavailable(f"no connection to counter owner {name}")
        return peer

    async def send_to(self, name: str, frame: bytes) -> None:
        """Send to a member, waiting while its queue is full; log if it cannot go."""
        peer = self.peers.get(name)
        if peer is None:
            return
        try:
            await peer.send(frame, self._loop.time() + self.request_timeout)
        except CounterUnavailable as exc:
            log.warning("counter node %s: %s", self.name, exc)

    # -- the ring ------------------------------------------------------------------

    def locate(self, key: str) -> tuple[str, str | None]:
        """(owner, replica) of `key` on the current ring, remembered per ring:
        a hash per key of every request adds up."""
        ring = self.ring
        if ring is None:
            raise LookupError("no counter ring yet")
        if ring is not self._located_on:
            self._located, self._located_on = {}, ring
        where = self._located.get(key)
        if where is None:
            if len(self._located) >= _LOCATED:
                self._located.clear()
            where = self._located[key] = ring.locate(key)
        return where

    async def ring_for(self, deadline: float) -> tuple[Ring, int]:
        while self.ring is None:
            if not await self.wait_change(deadline - self._loop.time()):
                raise CounterUnavailable("no counter ring yet")
        return self.ring, self.epoch

    async def wait_change(self, timeout: float) -> bool:
        """Wait until the ring or `active` changes; False after `timeout`."""
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- plumbing ------------------------------------------------------------------

    def frames_sent(self) -> tuple[int, int]:
        """(frames, requests) this node sent so far, on every socket."""
        peers = [*self.peers.values(), *self.retired]
        return self.frames + sum(p.frames for p in peers), sum(p.requests for p in peers)

    def rid(self) -> str:
        return f"{self._rid_prefix}{next(self._seq)}"

    def deadline(self) -> float:
        return self._loop.time() + self.request_timeout

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def linger_ms(self) -> int:
        return max(500, int(self.request_timeout * 1000))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for peer in self.retired:
            peer.close(0)
        for peer in self.peers.values():
            # Lingering lets hand-offs queued by a leaving node reach their owners.
            peer.close(self.linger_ms())
        self.retired, self.peers = [], {}
        if self.router is not None:
            self._loop.remove_reader(self.router.FD)
            self.router.close(linger=0)
            self.router = None
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            await asyncio.to_thread(ctx.term)


def check_endpoint(endpoint: str) -> None:
    """Counter nodes talk over ipc:// on one host, in a private folder."""
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"counter endpoint {endpoint} must be ipc:// (one host)")
    folder = os.path.dirname(endpoint[len("ipc://"):]) or "."
    mode = os.stat(folder).st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise ValueError(f"counter socket folder {folder} must be private (0700), "
                         f"is {stat.S_IMODE(mode):o}")
