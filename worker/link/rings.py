"""Ring epochs from the coordinator, applied to this worker's counter node in order.

Rings are applied one at a time, in epoch order, skipping to the newest
when several arrive during a hand-off. A worker that was in the ring and is
left out of a later one has been retired: :attr:`RingFollower.removed` is
set. A ring that fails to apply is accepted again later: the coordinator
sends it once more when the worker's report shows it behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from cluster import wire
from cluster.logjson import log_event


class RingNode(Protocol):
    async def apply_ring(self, epoch: int, members: Sequence[tuple[str, str]]) -> None: ...


class RingFollower:
    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = 0  # the last epoch applied
        self.member = False
        self.removed = asyncio.Event()
        self._seen = 0
        self._pending: wire.RingMessage | None = None
        self._wakeup = asyncio.Event()
        self._was_member = False

    def offer(self, message: wire.RingMessage) -> None:
        if message.epoch <= self._seen:
            return
        self._seen = message.epoch
        self._pending = message
        self._wakeup.set()

    async def follow(self, node: RingNode) -> None:
        """Apply every newer ring to ``node``, for as long as the worker runs."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            ring, self._pending = self._pending, None
            if ring is None:
                continue
            members = [(str(name), str(endpoint)) for name, endpoint in ring.members]
            try:
                await node.apply_ring(ring.epoch, members)
            except Exception:
                logging.getLogger(__name__).exception("ring epoch %d", ring.epoch)
                self._seen = min(self._seen, self.epoch)
                continue
            self.epoch = ring.epoch
            self.member = any(name == self.name for name, _ in members)
            log_event("ring_applied", worker=self.name, epoch=ring.epoch, member=self.member)
            if self.member:
                self._was_member = True
            elif self._was_member:
                self.removed.set()
