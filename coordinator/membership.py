"""Who is in the ring, and the epoch that names each version of it.

A worker becomes a member when it says ``Ready`` after ``Hello``. It stops
being one when the supervisor reports it ``exited`` or ``leaving``, when a
new process says ``Hello`` under its name, or when it has been silent (no
``MetricsReport``, sent every second) for longer than ``silence``. Every
change of the member list bumps the epoch; the list is sorted by name so
every process derives the same ring from it.

After a restart of the coordinator the table is empty while the workers are
not: for ``recovery`` seconds the members are rebuilt from the workers'
reports (each says whether it is a member) and no ring is published, so a
worker that has not reported yet is not dropped and made to leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STARTED = "started"    # the supervisor started the process
JOINING = "joining"    # it said Hello
MEMBER = "member"      # it said Ready and is in the ring
LEAVING = "leaving"    # the supervisor is retiring it


@dataclass
class Worker:
    name: str
    pid: int = 0
    endpoint: str = ""
    identity: bytes = b""
    state: str = STARTED
    last_seen: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)


class Membership:
    def __init__(self, now: float, first_epoch: int = 0, silence: float = 5.0,
                 recovery: float = 0.0) -> None:
        self.workers: dict[str, Worker] = {}
        self.epoch = first_epoch
        self.silence = silence
        self.recovering_until = now + recovery
        self._published: list[list[str]] = []

    # -- events ------------------------------------------------------------

    def started(self, name: str, pid: int, now: float) -> None:
        worker = self.workers.get(name)
        if worker is not None and worker.pid == pid:
            return
        self._forget(name)
        self.workers[name] = Worker(name, pid, last_seen=now)

    def hello(self, name: str, pid: int, endpoint: str, identity: bytes, now: float) -> None:
        worker = self.workers.get(name)
        if worker is None or worker.pid != pid:
            # A new process under a known name: the old one is gone.
            self._forget(name)
            worker = self.workers[name] = Worker(name, pid)
        worker.endpoint, worker.identity, worker.last_seen = endpoint, identity, now
        if worker.state == STARTED:
            worker.state = JOINING

    def ready(self, name: str, identity: bytes, now: float) -> bool:
        worker = self.workers.get(name)
        if worker is None or worker.state not in (JOINING, MEMBER):
            return False  # no Hello from this process yet
        worker.identity, worker.last_seen = identity, now
        worker.state = MEMBER
        return True

    def exited(self, name: str, pid: int) -> None:
        worker = self.workers.get(name)
        if worker is not None and (pid == 0 or worker.pid == pid):
            self._forget(name)

    def leaving(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is not None:
            worker.state = LEAVING

    def report(self, name: str, pid: int, values: dict[str, Any], identity: bytes,
               now: float) -> Worker | None:
        """A heartbeat; the worker it came from, or None when it is not (or no longer) known."""
        worker = self.workers.get(name)
        recovering = self.recovering(now)
        if worker is None or worker.pid != pid:
            if not recovering:
                return None
            worker = self.workers[name] = Worker(name, pid)
        if recovering and worker.state == STARTED:
            worker.endpoint = str(values.get("endpoint", ""))
            # A worker reports only after its Ready: one still starting is joining the ring.
            joined = values.get("member") or values.get("phase") == "starting"
            worker.state = MEMBER if joined else JOINING
            # The next epoch must be newer than any a worker has applied.
            epoch = values.get("ring_epoch")
            if isinstance(epoch, int):
                self.epoch = max(self.epoch, epoch)
        worker.identity, worker.last_seen, worker.report = identity, now, values
        return worker

    def expire(self, now: float) -> list[Worker]:
        """Drop members silent for too long; the workers dropped."""
        if self.recovering(now):
            return []
        gone = [w for w in self.workers.values()
                if w.state in (MEMBER, JOINING) and now - w.last_seen > self.silence]
        for worker in gone:
            self._forget(worker.name)
        return gone

    def _forget(self, name: str) -> None:
        self.workers.pop(name, None)

    # -- the ring ------------------------------------------------------------

    def recovering(self, now: float) -> bool:
        return now < self.recovering_until

    def members(self) -> list[list[str]]:
        return [[w.name, w.endpoint] for w in sorted(self.workers.values(), key=_order)
                if w.state == MEMBER]

    def next_ring(self, now: float) -> tuple[int, list[list[str]]] | None:
        """A new (epoch, members) when the member list changed since the last one published."""
        if self.recovering(now):
            return None
        members = self.members()
        if members == self._published:
            return None
        self.epoch += 1
        self._published = members
        return self.epoch, members

    def published(self) -> tuple[int, list[list[str]]]:
        return self.epoch, self._published


def _order(worker: Worker) -> tuple[int, str]:
    # w2 before w10: names are w<number> from the supervisor, anything else after.
    digits = worker.name[1:]
    return (int(digits), worker.name) if digits.isdigit() else (1 << 30, worker.name)
