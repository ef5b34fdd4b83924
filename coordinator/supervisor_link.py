"""The supervisor as the coordinator knows it: who it is, how many workers it runs.

It says ``SupervisorHello`` when it starts (and again when the coordinator
restarted) and sends a ``ProcessEvent`` for every process it starts, sees
exit or retires; it is told ``scale`` and ``silent`` (kill a hung worker).
"""

from __future__ import annotations

from cluster import wire
from cluster.admin_wire import ScaleReply, ScaleRequest
from cluster.logjson import log_event
from coordinator.errors import AdminError
from coordinator.outbox import Outbox

MAX_WORKERS = 256


class SupervisorLink:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self.identity = b""
        self.pid = 0
        self.target_workers = 0

    @property
    def connected(self) -> bool:
        return bool(self.identity)

    def hello(self, identity: bytes, hello: wire.SupervisorHello) -> None:
        self.identity, self.pid, self.target_workers = identity, hello.pid, hello.workers

    def event(self, identity: bytes, event: wire.ProcessEvent) -> None:
        self.identity = identity
        log_event("process_event", worker=event.name, process_event=event.event,
                  pid=event.pid, detail=event.detail or None)

    async def silent(self, name: str, pid: int) -> None:
        """A member stopped reporting: hung, not dead, it still holds its listening
        socket, so the supervisor replaces it."""
        if self.identity:
            await self._outbox.send(self.identity, wire.ProcessEvent(name, "silent", pid))

    async def scale(self, request: ScaleRequest) -> ScaleReply:
        count = request.workers
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_WORKERS:
            raise AdminError(f"workers must be a whole number from 1 to {MAX_WORKERS}")
        if not self.identity:
            raise AdminError("no supervisor is connected to this coordinator")
        previous = self.target_workers
        await self._outbox.send(self.identity, wire.ScaleCommand(count))
        self.target_workers = count
        return ScaleReply(workers=count, previous=previous)
