"""One DEALER from this node to another member's ROUTER, read without futures per message.

Requests are queued as plain items and go out together, one
``CounterRequest`` frame per loop iteration (`ask`); the answers come back
in ``CounterReply`` frames and resolve plain asyncio futures keyed by rid.
The socket is a plain non-blocking ZeroMQ socket: its FD is registered once
with the event loop (`loop.add_reader`) and drained with ``zmq.NOBLOCK``
while ``EVENTS`` says there is more. ZeroMQ's FD is edge-triggered and a
send may consume the edge, so ``EVENTS`` is checked again after every send.
(``zmq.asyncio`` would do the same with a future and two callbacks per
message, which cost more than the rest of the counter path together.)

The DEALER's routing id is this node's name: the member's ROUTER knows
who asks, and sends its `Replicate`s for keys this node replicates on the
same connection as its answers, so they arrive in the order it sent them.

A connection monitor tells whether the member is up, and whether it went
away (it may have been restarted under its name with an empty shard).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster import wire
from worker.counters.client import CounterUnavailable

log = logging.getLogger(__name__)

# Called for a frame that is not an answer (an owner's Replicate): (peer, data).
OnFrame = Callable[["Peer", list[Any]], None]
# Called with the replication an answer carries, before its futures resolve.
OnReplication = Callable[["Peer", Any], None]


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits (reading EVENTS also re-arms the edge-triggered FD)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)  # type: ignore[call-overload]


class Peer:
    """Any number of requests in flight to one member; answers matched by rid."""

    def __init__(self, name: str, endpoint: str, ctx: zmq.Context[Any], own_name: str,
                 linger_ms: int, on_liveness: Callable[[], None], on_frame: OnFrame,
                 on_replication: OnReplication) -> None:
        self.name = name
        self.endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        sock = self.sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.ROUTING_ID, own_name.encode())
        self._on_liveness = on_liveness
        self._on_frame = on_frame
        self._on_replication = on_replication
        # rid -> (future, item, deadline); the item is kept for one resend.
        self.pending: dict[str, tuple[asyncio.Future[list[Any]], list[Any], float]] = {}
        self._queue: list[list[Any]] = []
        self.frames = self.requests = 0  # sent, for benchmarks
        # Set when a replica missed an ack: later replications do not wait
        # for it until it is heard from again, or every decision would pay
        # the timeout until the coordinator removes a dead worker.
        self.suspect = False
        # Whether the connection is up: a killed process drops it at once.
        # `dropped` remembers a loss until the next epoch: the member may have
        # been restarted under its name, with nothing in its shard.
        self.alive = False
        self.dropped = False
        self.closed = False
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        sock.connect(endpoint)
        self._loop.add_reader(sock.FD, self._drain)
        self._loop.add_reader(self.monitor.FD, self._watch)
        # Edge-triggered: whatever arrived before the readers were added
        # raises no new edge.
        self._loop.call_soon(self._drain)
        self._loop.call_soon(self._watch)

    # -- sending ---------------------------------------------------------------

    def ask(self, item: list[Any], deadline: float) -> asyncio.Future[list[Any]]:
        """Queue a request item; the future gets its reply item, or CounterUnavailable."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        if self.closed:
            future.set_exception(CounterUnavailable(f"connection to {self.name} closed"))
            return future
        self.pending[item[wire.R_RID]] = (future, item, deadline)
        if not self._queue:
            self._loop.call_soon(self._flush)
        self._queue.append(item)
        return future

    def _flush(self) -> None:
        items, self._queue = self._queue, []
        if not items or self.closed:
            return
        frame = wire.encode_counter_request(items)
        self.requests += len(items)
        if not self.post(frame):
            self._fail([item[wire.R_RID] for item in items], "send queue full")
            return
        now = self._loop.time()
        rids = [item[wire.R_RID] for item in items]
        last = max(self.pending[r][2] for r in rids if r in self.pending) if rids else now
        # Once, half way: a frame queued to a member that restarted is lost.
        # The owner answers a repeated rid without counting again.
        self._loop.call_at(now + max(last - now, 0) / 2, self._resend, rids)
        self._loop.call_at(last, self._expire, rids)

    def _resend(self, rids: list[str]) -> None:
        items = [self.pending[r][1] for r in rids if r in self.pending]
        if items and not self.closed:
            self.post(wire.encode_counter_request(items))

    def _expire(self, rids: list[str]) -> None:
        self._fail([r for r in rids if r in self.pending], "did not answer in time")

    def _fail(self, rids: list[str], why: str) -> None:
        for rid in rids:
            future = self.pending.pop(rid)[0]
            if not future.done():
                future.set_exception(CounterUnavailable(f"counter peer {self.name} {why}"))

    def post(self, frame: bytes) -> bool:
        """Send if it can go at once; False if the queue to the member is full."""
        if self.closed:
            return False
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        finally:
            self._recheck()
        self.frames += 1
        return True

    async def send(self, frame: bytes, deadline: float) -> None:
        """Send, waiting while the queue to the member is full (until `deadline`)."""
        while not self.post(frame):
            if self.closed or self._loop.time() >= deadline:
                raise CounterUnavailable(f"counter peer {self.name}: send queue full")
            await asyncio.sleep(0.005)

    # -- receiving ---------------------------------------------------------------

    def _recheck(self) -> None:
        if not self.closed and readable(self.sock):
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        sock = self.sock
        while not self.closed and readable(sock):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                data = wire.unpack(frame)
                self.suspect = False
                if data[0] == wire.CounterReply.TYPE:
                    self._answered(data)
                else:
                    self._on_frame(self, data)
            except (wire.WireError, ValueError, TypeError, IndexError) as exc:
                log.warning("counter peer %s sent a bad frame: %s", self.name, exc)
            except Exception:
                # One odd frame must not stop this link from reading the next.
                log.exception("counter peer %s: frame not handled", self.name)

    def _answered(self, data: list[Any]) -> None:
        items = data[2]
        replication = data[3] if len(data) > 3 else None
        if replication is not None:
            # Ours to hold as the keys' replica before anyone uses the answers.
            self._on_replication(self, replication)
        pending = self.pending
        for item in items:
            entry = pending.pop(item[wire.A_RID], None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(item)

    def _watch(self) -> None:
        monitor = self.monitor
        while not self.closed and readable(monitor):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                break
            self.dropped = self.dropped or (self.alive and event != zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.alive = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self._on_liveness()

    def close(self, linger_ms: int) -> None:
        if self.closed:
            return
        self._flush()
        self.closed = True
        self.alive = False
        self._loop.remove_reader(self.sock.FD)
        self._loop.remove_reader(self.monitor.FD)
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        for future, _, _ in self.pending.values():
            if not future.done():
                future.set_exception(CounterUnavailable(f"connection to {self.name} closed"))
        self.pending.clear()
        self.sock.close(linger=linger_ms)
