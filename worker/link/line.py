"""The worker's two sockets to the coordinator, and the messages that cross them.

The zguide "Clone" pattern: the SUB on ``events.sock`` receives every
published snapshot, ring and connection table; the DEALER on ``coord.sock``
asks for the snapshot, says Hello and Ready, sends reports, evidence and
answers, and receives what the coordinator sends this worker alone (a
snapshot or ring it missed, a question). :meth:`CoordinatorLine.receive`
hands over what arrived on either, decoded, in arrival order per socket.

Sending never waits for the coordinator: a message that cannot be queued
at once is dropped (the next report says it all again).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import zmq
import zmq.asyncio

from cluster import wire
from cluster.logjson import log_event


class CoordinatorLine:
    def __init__(self, runtime_dir: Path, name: str) -> None:
        self.name = name
        self._context = zmq.asyncio.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._dealer = self._context.socket(zmq.DEALER)
        for sock in (self._sub, self._dealer):
            sock.setsockopt(zmq.LINGER, 0)
        for topic in (wire.TOPIC_SNAPSHOT, wire.TOPIC_RING, wire.TOPIC_CONNECTIONS):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._sub.connect(wire.events_endpoint(runtime_dir))
        self._dealer.connect(wire.coordinator_endpoint(runtime_dir))
        self._arrived: asyncio.Queue[wire.Message] = asyncio.Queue()
        self._readers = [asyncio.create_task(self._read(sock))
                         for sock in (self._sub, self._dealer)]
        self._sending: set[asyncio.Task[None]] = set()

    async def receive(self) -> wire.Message:
        """The next message from the coordinator."""
        return await self._arrived.get()

    async def send(self, message: wire.Message) -> None:
        if self._dealer.closed:
            return
        try:
            await self._dealer.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is away; the next report says it all again

    def send_soon(self, message: wire.Message) -> None:
        """Send from code that does not wait (a timer, a callback)."""
        if self._dealer.closed:
            return  # sent while the worker stops
        task = asyncio.get_running_loop().create_task(self.send(message))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                message = wire.decode(frames[-1])
            except wire.WireError as exc:
                log_event("bad_frame", logging.WARNING, error=str(exc))
                continue
            self._arrived.put_nowait(message)

    async def close(self) -> None:
        tasks = [*self._readers, *self._sending]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sub.close()
        self._dealer.close()
        self._context.term()
