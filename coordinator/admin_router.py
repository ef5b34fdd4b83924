"""One admin request in, its reply out: the table of commands and who carries each out.

Requests come from the admin socket (the CLI, the supervisor's first
``status``) and, in this process, from the HTTP API and the support
console; all of them reach :meth:`AdminRouter.call` with a request of
:mod:`cluster.admin_wire` and get its reply, or an :class:`AdminError`
whose sentence (and kind) goes back as ``AdminFailed``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cluster import admin_wire as aw
from coordinator.compromise import CompromiseWatch
from coordinator.counter_commands import CounterCommands
from coordinator.errors import AdminError
from coordinator.membership import MEMBER, Membership
from coordinator.outbox import Outbox
from coordinator.sources import SnapshotSources
from coordinator.spools import CHANGES, QueueError, queue_command
from coordinator.supervisor_link import SupervisorLink
from coordinator.support import SupportDesk, text
from coordinator.why import why
from coordinator.worker_rpc import Ask

Handler = Callable[[Any], Awaitable[aw.AdminReplyMessage]]


class AdminRouter:
    def __init__(self, sources: SnapshotSources, membership: Membership,
                 supervisor: SupervisorLink, desk: SupportDesk, compromise: CompromiseWatch,
                 counters: CounterCommands, ask: Ask, outbox: Outbox) -> None:
        self.sources = sources
        self.membership = membership
        self.supervisor = supervisor
        self.desk = desk
        self.compromise = compromise
        self._ask = ask
        self._outbox = outbox
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[type[aw.AdminRequestMessage], Handler] = {
            aw.StatusRequest: self.status,
            aw.ScaleRequest: supervisor.scale,
            aw.AllowCountryRequest: desk.allow_country,
            aw.DisallowCountryRequest: desk.disallow_country,
            aw.CountriesRequest: desk.countries,
            aw.HistoryRequest: desk.history,
            aw.SuspendRequest: desk.suspend,
            aw.UnsuspendRequest: self.unsuspend,
            aw.InspectSubjectRequest: counters.inspect,
            aw.ResetCountersRequest: counters.reset,
            aw.QueueRequest: self.queue,
            aw.WhyRequest: self.why,
        }

    async def call(self, request: aw.AdminRequestMessage) -> aw.AdminReplyMessage:
        """One admin command; raises AdminError."""
        handler = self._handlers.get(type(request))
        if handler is None:
            raise AdminError(f"unknown command {request.COMMAND or request.TYPE!r}")
        return await handler(request)

    def receive(self, identity: bytes, request: aw.AdminRequestMessage) -> None:
        """From the admin socket: answered when done, without holding up other messages."""
        task = asyncio.create_task(self._answer(identity, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, identity: bytes, request: aw.AdminRequestMessage) -> None:
        reply: aw.AdminReplyMessage | aw.AdminFailed
        try:
            reply = await self.call(request)
        except AdminError as exc:
            reply = aw.AdminFailed(str(exc), exc.status)
        except Exception as exc:
            logging.getLogger(__name__).exception("admin %s", request.COMMAND)
            reply = aw.AdminFailed(f"internal error: {exc}", 500)
        await self._outbox.send(identity, reply)

    # -- the commands that are nobody else's ------------------------------------------

    async def status(self, request: aw.StatusRequest) -> aw.StatusReply:
        now = time.monotonic()
        sources = self.sources
        epoch, ring = self.membership.published()
        workers = []
        for worker in sorted(self.membership.workers.values(), key=lambda w: w.name):
            report = worker.report
            workers.append({
                "name": worker.name,
                "pid": worker.pid,
                "state": worker.state,
                "phase": report.get("phase", "starting"),
                "member": worker.state == MEMBER,
                "snapshot_version": report.get("snapshot_version"),
                "ring_epoch": report.get("ring_epoch"),
                "sessions_open": report.get("sessions_open", 0),
                "accepted": report.get("accepted", 0),
                "last_report_s": round(now - worker.last_seen, 1) if worker.last_seen else None,
            })
        return aw.StatusReply(
            supervisor_pid=self.supervisor.pid,
            coordinator_pid=os.getpid(),
            workers_target=self.supervisor.target_workers,
            ring_epoch=epoch,
            ring=[name for name, _ in ring],
            config_version=sources.version,
            config_file=str(sources.settings.path),
            tenants_version=sources.tenants.directory.version,
            tenants=len(sources.tenants.directory.domains),
            accounts=len(sources.tenants.directory.accounts),
            geoip_version=sources.geoip.version if sources.geoip else "",
            workers=workers,
        )

    async def unsuspend(self, request: aw.UnsuspendRequest) -> aw.SuspensionReply:
        reply = await self.desk.unsuspend(request)
        # Support has dealt with it: the same evidence must not suspend the account again.
        await self.compromise.forget_everywhere(reply.account)
        return reply

    async def why(self, request: aw.WhyRequest) -> aw.WhyReply:
        return await why(list(self.membership.workers.values()), self._ask, request)

    async def queue(self, request: aw.QueueRequest) -> aw.QueueReply:
        change = request.action in CHANGES
        if change:
            by, reason = text(request.by, "by", required=True), text(request.reason, "reason")
        try:
            reply = await queue_command(list(self.membership.workers.values()), self._ask,
                                        request)
        except QueueError as exc:
            raise AdminError(str(exc)) from None
        if change:
            await self._audit_queue(reply, by, reason)
        return reply

    async def _audit_queue(self, reply: aw.QueueReply, by: str, reason: str) -> None:
        """One entry per tenant whose messages the purge, hold or release touched."""
        by_domain: dict[str, list[str]] = {}
        for message in reply.messages or []:
            domain = str(message.get("account", "")).rpartition("@")[2]
            by_domain.setdefault(domain, []).append(message["queue_id"])
        for domain, ids in sorted(by_domain.items()):
            subject = reply.account or reply.client or ", ".join(ids)
            details: dict[str, Any] = {"messages": len(ids), "queue_ids": ids}
            if reply.action == "purge":
                details["bounce"] = bool(reply.bounce)
            await self.desk.audit(by, f"queue-{reply.action}", subject, domain, reason,
                                  details=details)
