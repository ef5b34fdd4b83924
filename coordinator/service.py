"""The coordinator process: snapshots, ring membership, admin socket, metrics, spools.

Sockets (layout in :mod:`cluster.wire`): a ROUTER at ``coord.sock`` for
workers, the supervisor and the admin CLI, and a PUB at ``events.sock`` for
snapshots and rings (:class:`~coordinator.outbox.Outbox`). Everything runs
on one event loop; only the Prometheus endpoint has a thread of its own,
reading an immutable aggregate.

:class:`Coordinator` is a composition of one part per job, each made with
the parts it uses: snapshots (:mod:`coordinator.snapshots`), membership and
the ring (:mod:`coordinator.ring_keeper`), the supervisor
(:mod:`coordinator.supervisor_link`), the connection tables for the cap
per client address (:mod:`coordinator.connections`), support state and compromise
detection (:mod:`coordinator.support`, :mod:`coordinator.compromise`), the
admin commands (:mod:`coordinator.admin_router`), requests to workers
(:mod:`coordinator.worker_rpc`) and spool adoption
(:mod:`coordinator.spools`). It routes each message to its part and runs
the tick. With ``[counters] backend = "redis"`` the coordinator reads and
resets counters in Redis itself (:mod:`coordinator.shared_counters`), and
keeps suspensions, country exceptions and the audit log there too
(:mod:`coordinator.redis_state`): every tick it puts in force what another
host changed.

Signals: HUP rereads the configuration (a bad file is refused, the old one
stays); TERM and INT stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import zmq.asyncio

from cluster import wire
from cluster.admin_wire import AdminRequestMessage, WorkerReply
from cluster.logjson import log_event
from coordinator.admin_router import AdminRouter
from coordinator.compromise import CompromiseWatch
from coordinator.connections import ConnectionPublisher
from coordinator.counter_commands import CounterCommands
from coordinator.errors import AdminError
from coordinator.http_users import AdminUsers
from coordinator.membership import Membership
from coordinator.metrics import MetricsBook, serve_metrics
from coordinator.outbox import Outbox
from coordinator.redis_evidence import SharedEvidence
from coordinator.ring_keeper import RingKeeper
from coordinator.shared_counters import SharedCounters
from coordinator.snapshots import SnapshotPublisher, StateFile, read_state
from coordinator.sources import SnapshotSources
from coordinator.spools import AdoptionSweep
from coordinator.state_store import SupportStore
from coordinator.supervisor_link import SupervisorLink
from coordinator.support import SupportDesk
from coordinator.worker_rpc import WorkerRpc

__all__ = ["RECOVERY", "SILENCE", "Coordinator", "read_state", "serve_coordinator"]

TICK = 0.5               # file watch and heartbeat check
SILENCE = 5.0            # a member that has not reported for this long leaves
RECOVERY = 2.5           # after a restart: rebuild membership from reports first


class Coordinator:
    def __init__(self, outbox: Outbox, sources: SnapshotSources, runtime_dir: Path,
                 membership: Membership, store: SupportStore,
                 users: AdminUsers | None = None) -> None:
        self.outbox = outbox
        self.sources = sources
        self.membership = membership
        self.users = users  # the HTTP admin API's, when [admin] listen is set
        self.metrics = MetricsBook()
        self.snapshots = SnapshotPublisher(sources, outbox, StateFile(runtime_dir),
                                           lambda: membership.epoch)
        self.ring = RingKeeper(membership, outbox, self.snapshots.persist, SILENCE)
        self.supervisor = SupervisorLink(outbox)
        self.connections = ConnectionPublisher(membership, outbox)
        self.desk = SupportDesk(store, sources, self.snapshots.publish)
        # Workers' evidence of stolen passwords, and the suspensions it makes (SPEC §3.10).
        shared_evidence = (SharedEvidence(sources.settings)
                           if sources.settings.counters.backend == "redis" else None)
        self.compromise = CompromiseWatch(self.desk, sources, self.metrics,
                                          shared=shared_evidence)
        self.desk.on_lifted = self.compromise.forget
        self.workers = WorkerRpc(outbox)
        self.shared = SharedCounters(sources.settings)
        self.adoption = AdoptionSweep(self.workers.ask)
        counters = CounterCommands(sources, membership, self.shared, self.workers.ask,
                                   self.desk, self.compromise)
        self.admin = AdminRouter(sources, membership, self.supervisor, self.desk,
                                 self.compromise, counters, self.workers.ask, outbox)
        self._support_task: asyncio.Task[None] | None = None
        self._store_failing = False
        self._stop = asyncio.Event()
        self._hup = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        metrics_server = None
        listen = self.sources.settings.metrics_listen
        if listen is not None:
            metrics_server = serve_metrics(self.metrics, *listen)
        http = None
        admin_listen = self.sources.settings.admin.listen
        if admin_listen is not None and self.users is not None:
            from coordinator.http_api import serve

            try:
                http = await serve(self.admin.call, self.users, *admin_listen)
            except OSError:
                if metrics_server is not None:
                    metrics_server.shutdown()
                raise
        self.snapshots.persist()
        log_event("coordinator_ready", pid=os.getpid(), version=self.sources.version,
                  epoch=self.membership.epoch)
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._tick())]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.connections.close()
            await self.adoption.close()
            await self.compromise.close()
            if http is not None:
                await http.cleanup()
            if self.users is not None:
                self.users.close()
            if metrics_server is not None:
                metrics_server.shutdown()
            await self.shared.close()
            await self.desk.store.close()
        log_event("coordinator_stopped")
        return 0

    def _on_hup(self) -> None:
        self._hup = True

    # -- the loops ---------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            identity, payload = await self.outbox.receive()
            try:
                message = wire.decode(payload)
            except wire.WireError as exc:
                log_event("bad_frame", logging.WARNING, error=str(exc))
                continue
            try:
                await self._handle(identity, message)
            except Exception:
                logging.getLogger(__name__).exception("handling %s", message.TYPE)

    async def _handle(self, identity: bytes, message: wire.Message) -> None:
        now = time.monotonic()
        if isinstance(message, wire.MetricsReport):
            worker = await self.ring.report(identity, message, now)
            self.metrics.report(message.name, message.pid, message.values)
            if worker is not None:
                await self.snapshots.catch_up(worker.name, identity,
                                              message.values.get("snapshot_version"), now)
                self.connections.reported()
        elif isinstance(message, wire.Evidence):
            self.compromise.receive(message.name, message.notes)
        elif isinstance(message, wire.SnapshotRequest):
            await self.snapshots.send_to(identity)
        elif isinstance(message, wire.Hello):
            await self.ring.hello(identity, message, now)
        elif isinstance(message, wire.Ready):
            await self.ring.ready(identity, message, now)
        elif isinstance(message, AdminRequestMessage):
            self.admin.receive(identity, message)
        elif isinstance(message, WorkerReply):
            self.workers.reply(message)
        elif isinstance(message, wire.SupervisorHello):
            self.supervisor.hello(identity, message)
        elif isinstance(message, wire.ProcessEvent):
            self.supervisor.event(identity, message)
            self.adoption.event(message.name, message.event, now)
            if message.event == "exited":
                self.metrics.retire(message.name)
            await self.ring.process_event(identity, message, now)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            hup, self._hup = self._hup, False
            await self.snapshots.tick(hup)
            for worker in self.ring.expire(now):
                self.metrics.retire(worker.name)
                await self.supervisor.silent(worker.name, worker.pid)
            await self.ring.update()
            await self.connections.publish()
            self.compromise.tick()
            if self._support_task is None or self._support_task.done():
                self._support_task = asyncio.create_task(self._support_tick())
            if self.supervisor.connected:
                self.adoption.tick(now, self.membership, self.supervisor.target_workers)
            self.metrics.refresh(self.sources.version, self.membership.epoch,
                                 len(self.membership.members()))

    async def _support_tick(self) -> None:
        """What another host changed in a shared store, then what has run out.

        A store that fails is logged once, when it starts failing, and once
        when it is back; meanwhile the state in force stays as it was."""
        try:
            await self.desk.sync()
            await self.desk.lapse()
        except AdminError as exc:
            if not self._store_failing:
                log_event("state_store_failed", logging.ERROR, error=str(exc),
                          note="the state in force stays; trying again every tick")
            self._store_failing = True
            return
        if self._store_failing:
            log_event("state_store_back")
        self._store_failing = False


async def serve_coordinator(sources: SnapshotSources, runtime_dir: Path,
                            membership: Membership, store: SupportStore,
                            users: AdminUsers | None = None) -> int:
    """Bind the sockets, build the coordinator around them, run it until stopped."""
    context = zmq.asyncio.Context()
    try:
        outbox = Outbox(context, runtime_dir)
        try:
            return await Coordinator(outbox, sources, runtime_dir, membership, store,
                                     users).run()
        finally:
            outbox.close()
    finally:
        with contextlib.suppress(Exception):
            context.term()
