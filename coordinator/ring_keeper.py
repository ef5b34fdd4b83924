"""Ring membership as the workers and the supervisor report it, published with an epoch.

Who is a member is :class:`~coordinator.membership.Membership`'s rule; this
part turns the messages into its events and publishes a new ring when the
member list changed (a worker that just said Ready, or is leaving, gets it
directly as well: its SUB may not be subscribed yet, or it is about to go).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cluster import wire
from cluster.logjson import log_event
from coordinator.membership import Membership, Worker
from coordinator.outbox import Outbox


class RingKeeper:
    def __init__(self, membership: Membership, outbox: Outbox,
                 persist: Callable[[], None], silence: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.membership = membership
        self._clock = clock
        self._outbox = outbox
        self._persist = persist
        self._silence = silence

    def ring(self) -> wire.RingMessage:
        """The ring as last published (while recovering, the one the workers hold)."""
        return wire.RingMessage(*self.membership.published())

    async def update(self) -> bool:
        """Publish a new epoch if the member list changed; True when one went out."""
        change = self.membership.next_ring(self._clock())
        if change is None:
            return False
        ring = wire.RingMessage(*change)
        await self._outbox.publish(wire.TOPIC_RING, wire.encode(ring))
        log_event("ring", epoch=ring.epoch, members=[name for name, _ in ring.members])
        self._persist()
        return True

    async def hello(self, identity: bytes, hello: wire.Hello, now: float) -> None:
        self.membership.hello(hello.name, hello.pid, hello.endpoint, identity, now)
        log_event("worker_hello", worker=hello.name, pid=hello.pid, endpoint=hello.endpoint)
        await self.update()

    async def ready(self, identity: bytes, ready: wire.Ready, now: float) -> None:
        if self.membership.ready(ready.name, identity, now) and await self.update():
            # Straight to it as well: its SUB may not be subscribed yet.
            await self._outbox.send(identity, self.ring())

    async def report(self, identity: bytes, report: wire.MetricsReport,
                     now: float) -> Worker | None:
        """A heartbeat; the worker, when known. One that holds an older epoch gets the ring."""
        worker = self.membership.report(report.name, report.pid, report.values, identity, now)
        if worker is not None:
            epoch: Any = report.values.get("ring_epoch")
            if (isinstance(epoch, int) and epoch < self.membership.epoch
                    and not self.membership.recovering(now)):
                await self._outbox.send(identity, self.ring())
        return worker

    async def process_event(self, identity: bytes, event: wire.ProcessEvent,
                            now: float) -> None:
        """The supervisor's started | exited | leaving."""
        if event.event == "started":
            self.membership.started(event.name, event.pid, now)
        elif event.event == "exited":
            self.membership.exited(event.name, event.pid)
        elif event.event == "leaving":
            self.membership.leaving(event.name)
            if await self.update():
                # The supervisor stops the worker once the ring has let it go.
                await self._outbox.send(identity, self.ring())
            return
        await self.update()

    def expire(self, now: float) -> list[Worker]:
        """Members silent for too long, dropped (logged here; replaced by the supervisor)."""
        gone = self.membership.expire(now)
        for worker in gone:
            log_event("worker_silent", logging.WARNING, worker=worker.name, pid=worker.pid,
                      after=self._silence)
        return gone

