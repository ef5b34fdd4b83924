"""``inspect ip|account`` and ``counters reset``: a subject's counters, read or cleared.

With the ring, a worker asks each key's owner for the coordinator (two
workers are tried, one after the other); with ``[counters] backend =
"redis"`` the coordinator reads and resets the counts in Redis itself, so
every host's coordinator sees the same ones. A reset is audited, and it
forgets an account's compromise evidence: support has dealt with it.
"""

from __future__ import annotations

import uuid
from typing import Any

from cluster.admin_wire import (
    InspectSubjectReply,
    InspectSubjectRequest,
    ResetCountersReply,
    ResetCountersRequest,
    WorkerInspectReply,
    WorkerInspectRequest,
    WorkerResetReply,
    WorkerResetRequest,
)
from cluster.logjson import log_event
from coordinator.compromise import CompromiseWatch
from coordinator.errors import AdminError, Unavailable
from coordinator.inspect import SubjectError, subject_keys, summary, with_limits
from coordinator.membership import MEMBER, Membership, Worker
from coordinator.shared_counters import SharedCounters
from coordinator.sources import SnapshotSources
from coordinator.support import SupportDesk, text
from coordinator.worker_rpc import Ask, answer_of
from worker.counters.client import CounterUnavailable

INSPECT_TIMEOUT = 3.0
RESET_TIMEOUT = 6.0      # the worker gives its owners 5 s
ASKED = 2                # workers tried, one after the other, before giving up


class CounterCommands:
    def __init__(self, sources: SnapshotSources, membership: Membership,
                 shared: SharedCounters, ask: Ask, desk: SupportDesk,
                 compromise: CompromiseWatch) -> None:
        self.sources = sources
        self.membership = membership
        self.shared = shared
        self._ask = ask
        self.desk = desk
        self.compromise = compromise

    async def inspect(self, request: InspectSubjectRequest) -> InspectSubjectReply:
        keys = _keys(request.kind, request.subject)
        if self.shared.enabled():
            # Redis holds every host's counts: read them there, no worker needed.
            try:
                found, worker = await self.shared.inspect(keys), "redis"
            except CounterUnavailable as exc:
                raise Unavailable(f"the state store cannot be reached: {exc}") from None
        else:
            found, worker = await self._inspect_on_workers(keys)
        settings = self.sources.settings
        rows = with_limits(found, settings, self.sources.tenants.directory)
        facts = summary(request.kind, rows, settings)
        suspension = compromise = None
        if request.kind == "account":
            account = keys[0].partition(":")[2]
            await self.desk.fresh()
            suspension = self.desk.suspension_of(account)
            compromise = await self.compromise.evidence_of(account)
        return InspectSubjectReply(request.kind, keys, worker, rows,
                                   auth_failures=facts.get("auth_failures"),
                                   bounce=facts.get("bounce"), suspension=suspension,
                                   compromise=compromise)

    async def reset(self, request: ResetCountersRequest) -> ResetCountersReply:
        """Every counter of an address or an account, on its owner and replica (or in
        Redis), and their part of open reservations, once."""
        by, reason = text(request.by, "by", required=True), text(request.reason, "reason")
        keys = _keys(request.kind, request.subject)
        if self.shared.enabled():
            try:
                cleared = await self.shared.reset(keys)
            except CounterUnavailable as exc:
                raise Unavailable(f"the state store cannot be reached: {exc}") from None
            result = ResetCountersReply(keys, cleared, ["redis"], "redis")
        else:
            result = await self._reset_on_workers(keys)
        log_event("counters_reset", keys=keys, cleared=result.cleared, by=by)
        subject = keys[0].partition(":")[2]
        domain = subject.rpartition("@")[2] if request.kind == "account" else ""
        if request.kind == "account":
            await self.compromise.forget_everywhere(subject)
        await self.desk.audit(by, "counters-reset", subject, domain, reason,
                              details={"keys": keys, "counters": result.cleared})
        return result

    def _members(self) -> list[Worker]:
        members = [w for w in self.membership.workers.values()
                   if w.state == MEMBER and w.identity]
        if not members:
            raise Unavailable("no worker is in the ring to ask")
        return members[:ASKED]

    async def _inspect_on_workers(self, keys: list[str]) -> tuple[dict[str, Any], str]:
        # A worker asks each key's owner through its counter node; try another if one is slow.
        for worker in self._members():
            answer = answer_of(await self._ask(worker, WorkerInspectRequest(keys),
                                               INSPECT_TIMEOUT), WorkerInspectReply)
            if answer is None:
                continue
            if isinstance(answer, str):
                raise AdminError(f"{worker.name}: {answer}")
            return dict(answer.rows), worker.name
        raise Unavailable("no worker answered in time")

    async def _reset_on_workers(self, keys: list[str]) -> ResetCountersReply:
        # One id for the whole reset: a second worker asked after a silent first one
        # reaches owners that answer it again without resetting twice.
        request = WorkerResetRequest(keys, uuid.uuid4().hex)
        for worker in self._members():
            answer = answer_of(await self._ask(worker, request, RESET_TIMEOUT),
                               WorkerResetReply)
            if answer is None:
                continue
            if isinstance(answer, str):
                raise AdminError(f"{worker.name}: {answer}")
            return ResetCountersReply(keys, answer.cleared, list(answer.owners), worker.name)
        raise Unavailable("no worker answered in time")


def _keys(kind: str, subject: str) -> list[str]:
    try:
        return subject_keys(str(kind), str(subject))
    except SubjectError as exc:
        raise AdminError(str(exc)) from None
