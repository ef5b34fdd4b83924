"""A worker of the cluster through its life: boot, join the ring, serve, drain, linger.

- **boot**: ask the coordinator for the first snapshot (the configuration,
  tenants and GeoIP database it validated), open the log it names, bind
  the counter node's socket, and build every part (worker/builder.py);
- **join the ring**: say Hello and Ready, apply the rings the coordinator
  publishes, report every second, answer its questions; wait until the
  counter node serves its epoch, so no connection is accepted before its
  counters can be reached;
- **serve**: load the spool, bind the SMTP listeners, until SIGTERM, SIGINT,
  or a ring that no longer lists this worker (scaled down: it retires);
- **drain**: stop accepting; sessions finish within ``server.drain_timeout``
  (SIGINT: at once);
- **linger**: a drained worker keeps its counter node up until SIGINT or
  ``drain_timeout`` more, because the other workers' last transactions may
  need the keys it owns (no peer's transaction outlives its own drain,
  which began with ours). A retired worker does not linger.

Each step reports the worker's phase (starting, serving, draining,
drained) to the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import zmq

from cluster import admin_wire as aw
from cluster import wire
from cluster.exits import EXIT_OK
from cluster.logjson import log_event, setup_logging
from worker.builder import WorkerParts, build_worker
from worker.counters.node import CounterNode
from worker.counters.redis_store import counters_for
from worker.counters.shard import CounterShard
from worker.evidence import EvidenceNotes
from worker.link.admin import AdminServer
from worker.link.heartbeat import Heartbeat
from worker.link.line import CoordinatorLine
from worker.link.rings import RingFollower
from worker.link.snapshots import SnapshotFeed
from worker.metrics import WorkerMetrics
from worker.server import BootError
from worker.signals import StopSignals, first

# How long a worker that never became active says so between waits.
WAITING_FOR_RING_EVERY = 5.0
# A drained worker lingers this much past its own drain.
LINGER_MARGIN = 1.0


class ClusterWorker:
    def __init__(self, name: str, stop: StopSignals, line: CoordinatorLine,
                 snapshots: SnapshotFeed, rings: RingFollower, node: CounterNode,
                 parts: WorkerParts, heartbeat: Heartbeat, admin: AdminServer,
                 held: list[wire.Message]) -> None:
        self.name = name
        self.stop = stop
        self.line = line
        self.snapshots = snapshots
        self.rings = rings
        self.node = node
        self.parts = parts
        self.heartbeat = heartbeat
        self.admin = admin
        self._held = held  # what arrived while the worker was being built
        self._tasks: list[asyncio.Task[None]] = []
        self._linger_until = 0.0

    @classmethod
    async def boot(cls, name: str, runtime_dir: Path, stop: StopSignals,
                   line: CoordinatorLine) -> ClusterWorker | None:
        """The worker built from its first snapshot; None when stopped before it came.
        Raises ConfigError (a snapshot this worker cannot use) or BootError."""
        snapshots = SnapshotFeed(line)
        first_snapshot = asyncio.ensure_future(snapshots.first())
        await first(first_snapshot, stop.any.wait())
        if not first_snapshot.done() or first_snapshot.cancelled():
            return None
        snapshot, held = first_snapshot.result()
        settings = snapshot.settings
        setup_logging(settings.log_file, process=name)
        metrics = WorkerMetrics()
        shard = CounterShard()
        endpoint = wire.worker_endpoint(runtime_dir, name)
        node = CounterNode(name, endpoint, shard, settings.cluster.request_timeout,
                           observe=metrics.observe_counter)
        try:
            await node.start()
        except (zmq.ZMQError, ValueError, OSError) as exc:
            raise BootError(f"cannot bind the counter endpoint {endpoint}: {exc}") from None
        try:
            parts = await build_worker(
                settings, name, source=snapshots, shard=shard, metrics=metrics,
                counters=counters_for(settings, node.client, metrics.observe_counter),
                evidence=EvidenceNotes(lambda notes: line.send_soon(wire.Evidence(name, notes))))
        except BaseException:
            await node.close()
            raise
        rings = RingFollower(name)
        sessions, connections = parts.server.sessions, parts.engine.connections
        heartbeat = Heartbeat(
            line, node.endpoint,
            lambda: {**metrics.values(len(sessions), sessions.total),
                     "connections": connections.report()},
            snapshots, rings, connections.near_cap)
        admin = AdminServer(line, node, parts.delivery, parts.engine.log.recent,
                            lambda: heartbeat.phase)
        return cls(name, stop, line, snapshots, rings, node, parts, heartbeat, admin, held)

    async def run(self) -> None:
        """The steps after boot, in order; returns when the worker may exit."""
        try:
            if not await self.join_ring():
                return
            retired = await self.serve()
            fast = self.stop.fast.is_set() and not retired
            await self.drain(fast, retired)
            if not fast and not retired:
                await self.linger()
        finally:
            await self.close()

    async def join_ring(self) -> bool:
        """Hello and Ready, then wait until the counter node serves; False when stopped."""
        self._tasks += [asyncio.create_task(self._dispatch()),
                        asyncio.create_task(self.rings.follow(self.node)),
                        asyncio.create_task(self.heartbeat.run())]
        await self.line.send(wire.Hello(self.name, os.getpid(), self.node.endpoint))
        await self.line.send(wire.Ready(self.name))
        while not self.stop.any.is_set() and not self.node.active():
            await first(self.node.wait_active(WAITING_FOR_RING_EVERY), self.stop.any.wait())
            if not self.node.active() and not self.stop.any.is_set():
                log_event("waiting_for_ring", logging.WARNING, worker=self.name)
        return not self.stop.any.is_set()

    async def serve(self) -> bool:
        """Accept mail until told to stop; True when the ring retired this worker."""
        await self.parts.start()
        await self.heartbeat.enter("serving")
        self._tasks.append(asyncio.create_task(self.parts.housekeeping()))
        log_event("worker_ready", worker=self.name, pid=os.getpid(), endpoint=self.node.endpoint)
        await first(self.stop.any.wait(), self.rings.removed.wait())
        return self.rings.removed.is_set()

    async def drain(self, fast: bool, retired: bool) -> None:
        drain_timeout = self.snapshots.current().settings.server.drain_timeout  # in force now
        self._linger_until = asyncio.get_running_loop().time() + drain_timeout + LINGER_MARGIN
        log_event("worker_stopping", worker=self.name, graceful=not fast, retired=retired)
        await self.heartbeat.enter("draining")
        await self.parts.server.drain(0.0 if fast else drain_timeout)

    async def linger(self) -> None:
        await self.heartbeat.enter("drained")
        await first(self.stop.fast.wait(), self.rings.removed.wait(),
                    timeout=max(0.0, self._linger_until - asyncio.get_running_loop().time()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.close()
        await self.parts.close(0.0 if self.stop.fast.is_set() else 5.0)
        await self.node.close()

    async def _dispatch(self) -> None:
        held, self._held = self._held, []
        for message in held:
            self._route(message)
        while True:
            self._route(await self.line.receive())

    def _route(self, message: wire.Message) -> None:
        if isinstance(message, (wire.SnapshotMessage, wire.SupportSnapshot)):
            self.snapshots.offer(message)
        elif isinstance(message, wire.RingMessage):
            self.rings.offer(message)
        elif isinstance(message, wire.ConnectionCounts):
            self.parts.engine.connections.update(message.tables, self.name)
        elif isinstance(message, aw.WorkerRequest):
            self.admin.receive(message)


async def serve_cluster(runtime_dir: Path, name: str) -> int:
    """What the supervisor's worker process runs; the exit status."""
    stop = StopSignals()
    line = CoordinatorLine(runtime_dir, name)
    try:
        worker = await ClusterWorker.boot(name, runtime_dir, stop, line)
        if worker is not None:
            await worker.run()
        return EXIT_OK
    finally:
        await line.close()
        stop.ignore_from_now()
