"""The coordinator's two sockets: the ROUTER every process talks to, the PUB it publishes on.

Made before the parts that send on them (each part gets this object at
construction), closed last. Layout and frames: :mod:`cluster.wire`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.asyncio

from cluster import wire
from cluster.logjson import log_event


class Outbox:
    def __init__(self, context: zmq.asyncio.Context, runtime_dir: Path) -> None:
        self.router = context.socket(zmq.ROUTER)
        self.pub = context.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
        self.router.bind(wire.coordinator_endpoint(runtime_dir))
        self.pub.bind(wire.events_endpoint(runtime_dir))

    async def send(self, identity: bytes, message: wire.Message | bytes) -> None:
        """To one peer; dropped (and logged) rather than waited for when it does not read."""
        frame = message if isinstance(message, bytes) else wire.encode(message)
        try:
            await self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.Again:
            log_event("send_dropped", logging.WARNING, size=len(frame))

    async def publish(self, topic: bytes, frame: bytes) -> None:
        await self.pub.send_multipart([topic, frame])

    async def receive(self) -> tuple[bytes, bytes]:
        """The sender's identity and its frame."""
        frames = await self.router.recv_multipart()
        return frames[0], frames[-1]

    def close(self) -> None:
        self.router.close()
        self.pub.close()
