"""Links between counter nodes: one DEALER per ring member, and who may connect.

A node keeps one `Peer` per other member for its own requests (to owners,
replicas, hand-offs), with replies matched by rid, and watches the
connection so it knows whether the member is up or was restarted. With
`CurveKeys` only ring members get through the CURVE handshake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from cluster import wire
from worker.counters.client import CounterUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    """This node's CURVE key pair and every member's public key (z85 or raw).

    The same pair serves as server key on the ROUTER and client key on the
    DEALERs, so only ring members can connect."""

    secret_key: bytes
    public_key: bytes
    server_public_keys: Mapping[str, bytes] = field(default_factory=dict)


class Peer:
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


def dealer(ctx: zmq.asyncio.Context, name: str, linger_ms: int,
           curve: CurveKeys | None) -> zmq.asyncio.Socket:
    """A DEALER for member `name`, not yet connected."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if curve is not None:
        sock.curve_secretkey = curve.secret_key
        sock.curve_publickey = curve.public_key
        sock.curve_serverkey = curve.server_public_keys[name]
    return sock


class MemberKeys:
    """ZAP check for CURVE clients: only ring members' public keys."""

    def __init__(self, curve: CurveKeys) -> None:
        self.keys = curve.server_public_keys

    def callback(self, domain: str, key: bytes) -> bool:
        # Read at each handshake: between hosts the mapping follows a folder of key files.
        try:
            return key in {_z85(k) for k in self.keys.values()}
        except Exception:
            return False


def _z85(key: bytes) -> bytes:
    return z85.encode(key) if len(key) == 32 else key


def check_endpoint(endpoint: str, curve: CurveKeys | None) -> None:
    if endpoint.startswith("ipc://"):
        folder = os.path.dirname(endpoint[len("ipc://"):]) or "."
        mode = os.stat(folder).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise ValueError(f"counter socket folder {folder} must be private (0700), "
                             f"is {stat.S_IMODE(mode):o}")
    elif endpoint.startswith("tcp://") and curve is None:
        log.warning("counter endpoint %s is tcp:// without CURVE: anyone who can reach it "
                    "can change counters", endpoint)
