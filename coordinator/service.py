"""The coordinator process: snapshots, ring membership, admin socket, metrics, spools.

Sockets (layout in :mod:`cluster.wire`): a ROUTER at ``coord.sock`` for
workers, the supervisor and the admin CLI, and a PUB at ``events.sock`` for
snapshots and rings. Everything runs on one event loop; only the Prometheus
endpoint has a thread of its own, reading an immutable aggregate. Admin
work that needs the workers (``inspect``, ``queue``, spool adoption) is
sent to them as ``AdminRequest``s and matched to their replies by ``rid``;
with ``[counters] backend = "redis"`` the coordinator reads and resets
counters in Redis itself (:mod:`coordinator.shared_counters`), so every
host's coordinator sees and changes the same counts, and keeps suspensions,
country exceptions and the audit log there too (:mod:`coordinator.redis_state`):
every tick it puts in force what another host changed.

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
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from cluster import wire
from cluster.logjson import log_event
from coordinator.compromise import CompromiseWatch
from coordinator.connections import SOON, ConnectionBoard
from coordinator.errors import AdminError, Unavailable
from coordinator.http_users import AdminUsers
from coordinator.inspect import SubjectError, subject_keys, summary, with_limits
from coordinator.membership import MEMBER, Membership, Worker
from coordinator.metrics import MetricsBook, serve_metrics
from coordinator.shared_counters import SharedCounters
from coordinator.sources import SnapshotSources
from coordinator.spools import CHANGES, AdoptionSweep, QueueError, queue_command
from coordinator.state_store import FileStore, SupportStore
from coordinator.support import SupportDesk, text
from coordinator.why import why
from worker.counters.client import CounterUnavailable

TICK = 0.5               # file watch and heartbeat check
SILENCE = 5.0            # a member that has not reported for this long leaves
RECOVERY = 2.5           # after a restart: rebuild membership from reports first
INSPECT_TIMEOUT = 3.0
RESET_TIMEOUT = 6.0      # the worker gives its owners 5 s
RESEND_AFTER = 3.0       # a lagging worker gets the snapshot again at most this often
MAX_WORKERS = 256
STATE_FILE = "coordinator.state"


def read_state(runtime_dir: Path) -> dict[str, int] | None:
    """What an earlier coordinator of this cluster published last, if one ran."""
    try:
        data = msgpack.unpackb((runtime_dir / STATE_FILE).read_bytes())
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if k in ("version", "epoch") and isinstance(v, int)}


def write_state(runtime_dir: Path, version: int, epoch: int) -> None:
    temp = runtime_dir / f".{STATE_FILE}.tmp"
    temp.write_bytes(msgpack.packb({"version": version, "epoch": epoch}))
    os.replace(temp, runtime_dir / STATE_FILE)


class Coordinator:
    def __init__(self, sources: SnapshotSources, runtime_dir: Path,
                 membership: Membership, store: SupportStore | None = None,
                 users: AdminUsers | None = None) -> None:
        self.sources = sources
        self.runtime_dir = runtime_dir
        self.membership = membership
        self.desk = SupportDesk(store or FileStore(sources.settings.cluster.state_dir),
                                sources, self._publish_snapshot)
        self._support_task: asyncio.Task[None] | None = None
        self._store_failing = False
        self.users = users  # the HTTP admin API's, when [admin] listen is set
        self.metrics = MetricsBook()
        # Workers' evidence of stolen passwords, and the suspensions it makes (SPEC §3.10).
        self.compromise = CompromiseWatch(self.desk, sources, self.metrics)
        self.supervisor: bytes = b""
        self.supervisor_pid = 0
        self.target_workers = 0
        self.shared = SharedCounters(sources.settings)
        self._asks: dict[str, asyncio.Future[wire.AdminReply]] = {}
        self.adoption = AdoptionSweep(self._ask)
        self._resent: dict[str, float] = {}
        self._snapshot_frame = (0, b"")
        self._state = (0, 0)
        self._stop = asyncio.Event()
        self._hup = False
        self._admin_tasks: set[asyncio.Task[None]] = set()
        self.connections = ConnectionBoard()
        self._connections_soon: asyncio.Task[None] | None = None

    # -- sockets ---------------------------------------------------------------

    async def run(self) -> int:
        context = zmq.asyncio.Context()
        self.router = context.socket(zmq.ROUTER)
        self.pub = context.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
        self.router.bind(wire.coordinator_endpoint(self.runtime_dir))
        self.pub.bind(wire.events_endpoint(self.runtime_dir))
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
                http = await serve(self.call, self.users, *admin_listen)
            except OSError:
                if metrics_server is not None:
                    metrics_server.shutdown()
                raise
        self._persist()
        log_event("coordinator_ready", pid=os.getpid(), version=self.sources.version,
                  epoch=self.membership.epoch)
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._tick())]
        try:
            await self._stop.wait()
        finally:
            if self._connections_soon is not None:
                tasks.append(self._connections_soon)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.adoption.close()
            await self.compromise.close()
            if http is not None:
                await http.cleanup()
            if self.users is not None:
                self.users.close()
            if metrics_server is not None:
                metrics_server.shutdown()
            self.router.close()
            self.pub.close()
            await self.shared.close()
            await self.desk.store.close()
            context.term()
        log_event("coordinator_stopped")
        return 0

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

    def _on_hup(self) -> None:
        self._hup = True

    async def _send(self, identity: bytes, message: wire.Message | bytes) -> None:
        frame = message if isinstance(message, bytes) else wire.encode(message)
        try:
            await self.router.send_multipart([identity, frame], zmq.NOBLOCK)
        except zmq.Again:
            log_event("send_dropped", logging.WARNING, size=len(frame))

    def _snapshot_bytes(self) -> bytes:
        # One encoding per version: the GeoIP database may be megabytes.
        if self._snapshot_frame[0] != self.sources.version:
            self._snapshot_frame = (self.sources.version, wire.encode(self.sources.message))
        return self._snapshot_frame[1]

    async def _publish_snapshot(self) -> None:
        await self.pub.send_multipart([wire.TOPIC_SNAPSHOT, self._snapshot_bytes()])
        self._persist()

    def _ring(self) -> wire.RingMessage:
        """The ring as last published (while recovering, the one the workers hold)."""
        return wire.RingMessage(*self.membership.published())

    async def _update_ring(self) -> bool:
        change = self.membership.next_ring(time.monotonic())
        if change is None:
            return False
        ring = wire.RingMessage(*change)
        await self.pub.send_multipart([wire.TOPIC_RING, wire.encode(ring)])
        log_event("ring", epoch=ring.epoch, members=[name for name, _ in ring.members])
        self._persist()
        return True

    def _persist(self) -> None:
        state = (self.sources.version, self.membership.epoch)
        if state != self._state:
            write_state(self.runtime_dir, *state)
            self._state = state

    # -- the loops ---------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            identity, payload = frames[0], frames[-1]
            try:
                message = wire.decode(payload)
            except wire.WireError as exc:
                log_event("bad_frame", logging.WARNING, error=str(exc))
                continue
            try:
                await self._handle(identity, message)
            except Exception:
                logging.getLogger(__name__).exception("handling %s", message.TYPE)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            if self._hup:
                self._hup = False
                if self.sources.reload_config():
                    await self._publish_snapshot()
            if self.sources.poll():
                await self._publish_snapshot()
            for worker in self.membership.expire(now):
                log_event("worker_silent", logging.WARNING, worker=worker.name, pid=worker.pid,
                          after=SILENCE)
                self.metrics.retire(worker.name)
                if self.supervisor:
                    # Hung, not dead: it still holds its listening socket, so it is replaced.
                    await self._send(self.supervisor,
                                     wire.ProcessEvent(worker.name, "silent", worker.pid))
            await self._update_ring()
            await self._publish_connections()
            self.compromise.tick()
            if self._support_task is None or self._support_task.done():
                self._support_task = asyncio.create_task(self._support_tick())
            if self.supervisor:
                self.adoption.tick(now, self.membership, self.target_workers)
            self.metrics.refresh(self.sources.version, self.membership.epoch,
                                 len(self.membership.members()))

    async def _handle(self, identity: bytes, message: wire.Message) -> None:
        now = time.monotonic()
        members = self.membership
        if isinstance(message, wire.MetricsReport):
            worker = members.report(message.name, message.pid, message.values, identity, now)
            self.metrics.report(message.name, message.pid, message.values)
            if worker is not None:
                await self._catch_up(worker.name, identity, message.values, now)
                self._connections_changed()
        elif isinstance(message, wire.Evidence):
            self.compromise.receive(message.name, message.notes)
        elif isinstance(message, wire.SnapshotRequest):
            await self._send(identity, self._snapshot_bytes())
        elif isinstance(message, wire.Hello):
            members.hello(message.name, message.pid, message.endpoint, identity, now)
            log_event("worker_hello", worker=message.name, pid=message.pid,
                      endpoint=message.endpoint)
            await self._update_ring()
        elif isinstance(message, wire.Ready):
            if members.ready(message.name, identity, now) and await self._update_ring():
                # Straight to it as well: its SUB may not be subscribed yet.
                await self._send(identity, self._ring())
        elif isinstance(message, wire.AdminRequest):
            task = asyncio.create_task(self._admin(identity, message))
            self._admin_tasks.add(task)
            task.add_done_callback(self._admin_tasks.discard)
        elif isinstance(message, wire.AdminReply):
            future = self._asks.pop(str(message.data.get("rid", "")), None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, wire.SupervisorHello):
            self.supervisor, self.supervisor_pid = identity, message.pid
            self.target_workers = message.workers
        elif isinstance(message, wire.ProcessEvent):
            await self._process_event(identity, message, now)

    async def _process_event(self, identity: bytes, event: wire.ProcessEvent,
                             now: float) -> None:
        self.supervisor = identity
        log_event("process_event", worker=event.name, process_event=event.event,
                  pid=event.pid, detail=event.detail or None)
        self.adoption.event(event.name, event.event, now)
        if event.event == "started":
            self.membership.started(event.name, event.pid, now)
        elif event.event == "exited":
            self.membership.exited(event.name, event.pid)
            self.metrics.retire(event.name)
        elif event.event == "leaving":
            self.membership.leaving(event.name)
            if await self._update_ring():
                # The supervisor stops the worker once the ring has let it go.
                await self._send(identity, self._ring())
            return
        await self._update_ring()

    async def _publish_connections(self, force: bool = False) -> None:
        """The live workers' connection tables (worker/connections.py), when there is news."""
        tables = self.connections.collect(self.membership.workers.values())
        if not (force and self.connections.changed(tables)) and not self.connections.due(tables):
            return
        await self.pub.send_multipart([wire.TOPIC_CONNECTIONS,
                                       wire.encode(wire.ConnectionCounts(tables))])
        self.connections.published(tables)

    def _connections_changed(self) -> None:
        """A report came in: if it changed a table, publish soon rather than on the tick."""
        if self._connections_soon is not None and not self._connections_soon.done():
            return
        if not self.connections.changed(self.connections.collect(
                self.membership.workers.values())):
            return

        async def soon() -> None:
            await asyncio.sleep(SOON)
            await self._publish_connections(force=True)

        self._connections_soon = asyncio.create_task(soon())

    async def _catch_up(self, name: str, identity: bytes, values: dict[str, Any],
                        now: float) -> None:
        """A worker that missed a publication gets it directly."""
        version = values.get("snapshot_version")
        if isinstance(version, int) and version < self.sources.version:
            if now - self._resent.get(name, -RESEND_AFTER) >= RESEND_AFTER:
                self._resent[name] = now
                await self._send(identity, self._snapshot_bytes())
        epoch = values.get("ring_epoch")
        if (isinstance(epoch, int) and epoch < self.membership.epoch
                and not self.membership.recovering(now)):
            await self._send(identity, self._ring())

    # -- admin ---------------------------------------------------------------

    async def _admin(self, identity: bytes, request: wire.AdminRequest) -> None:
        try:
            reply = wire.AdminReply(True, await self.call(request.command, request.args))
        except AdminError as exc:
            reply = wire.AdminReply(False, {}, str(exc))
        except Exception as exc:
            logging.getLogger(__name__).exception("admin %s", request.command)
            reply = wire.AdminReply(False, {}, f"internal error: {exc}")
        await self._send(identity, reply)

    async def call(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """One admin command, from the admin socket or the HTTP API; raises AdminError."""
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self._status,
            "scale": self._scale,
            "allow-country": self.desk.allow_country,
            "disallow-country": self.desk.disallow_country,
            "countries": self._countries,
            "history": self.desk.history,
            "suspend": self.desk.suspend,
            "unsuspend": self._unsuspend,
            "inspect": self._inspect,
            "reset": self._reset,
            "queue": self._queue,
            "why": self._why,
        }
        handler = handlers.get(command)
        if handler is None:
            raise AdminError(f"unknown command {command!r}")
        return await handler(args)

    async def _unsuspend(self, args: dict[str, Any]) -> dict[str, Any]:
        result = await self.desk.unsuspend(args)
        # Support has dealt with it: the same evidence must not suspend the account again.
        self.compromise.forget(result["account"])
        return result

    async def _countries(self, args: dict[str, Any]) -> dict[str, Any]:
        domain = self.desk.hosted_domain(args)
        await self._fresh_support()
        return self.desk.countries_of(domain)

    async def _fresh_support(self) -> None:
        """Before showing suspensions or exceptions: another host's latest change (a
        shared store), when the store answers; else what is in force, at most a tick old."""
        with contextlib.suppress(AdminError):
            await self.desk.sync()

    async def _status(self, args: dict[str, Any]) -> dict[str, Any]:
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
        return {
            "supervisor_pid": self.supervisor_pid,
            "coordinator_pid": os.getpid(),
            "workers_target": self.target_workers,
            "ring_epoch": epoch,
            "ring": [name for name, _ in ring],
            "config_version": sources.version,
            "config_file": str(sources.settings.path),
            "tenants_version": sources.tenants.directory.version,
            "tenants": len(sources.tenants.directory.domains),
            "accounts": len(sources.tenants.directory.accounts),
            "geoip_version": sources.geoip.version if sources.geoip else "",
            "workers": workers,
        }

    async def _scale(self, args: dict[str, Any]) -> dict[str, Any]:
        count = args.get("workers")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_WORKERS:
            raise AdminError(f"workers must be a whole number from 1 to {MAX_WORKERS}")
        if not self.supervisor:
            raise AdminError("no supervisor is connected to this coordinator")
        previous = self.target_workers
        await self._send(self.supervisor, wire.ScaleCommand(count))
        self.target_workers = count
        return {"workers": count, "previous": previous}

    async def _inspect(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            keys = subject_keys(str(args.get("kind", "")), str(args.get("subject", "")))
        except SubjectError as exc:
            raise AdminError(str(exc)) from None
        if self.shared.enabled():
            # Redis holds every host's counts: read them there, no worker needed.
            try:
                found, worker = await self.shared.inspect(keys), "redis"
            except CounterUnavailable as exc:
                raise Unavailable(str(exc)) from None
        else:
            found, worker = await self._inspect_on_workers(keys)
        rows = with_limits(found, self.sources.settings, self.sources.tenants.directory)
        result = {"keys": keys, "worker": worker, "rows": rows,
                  **summary(str(args.get("kind")), rows, self.sources.settings)}
        if args.get("kind") == "account":
            account = keys[0].partition(":")[2]
            await self._fresh_support()
            result["suspension"] = self.desk.suspension_of(account)
            evidence = self.compromise.evidence_of(account)
            if evidence is not None:
                result["compromise"] = evidence
        return result

    async def _inspect_on_workers(self, keys: list[str]) -> tuple[dict[str, Any], str]:
        candidates = [w for w in self.membership.workers.values()
                      if w.state == MEMBER and w.identity]
        if not candidates:
            raise Unavailable("no worker is in the ring to ask")
        # A worker asks each key's owner through its counter node; try another if one is slow.
        for worker in candidates[:2]:
            reply = await self._ask(worker, "inspect", {"keys": keys}, INSPECT_TIMEOUT)
            if reply is None:
                continue
            if not reply.ok:
                raise AdminError(f"{worker.name}: {reply.error}")
            return dict(reply.data.get("rows", {})), worker.name
        raise Unavailable("no worker answered in time")

    async def _reset(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every counter of an address or an account, on its owner and replica (or in
        Redis), and their part of open reservations, once."""
        by, reason = text(args, "by", required=True), text(args, "reason")
        kind, subject = str(args.get("kind", "")), str(args.get("subject", ""))
        try:
            keys = subject_keys(kind, subject)
        except SubjectError as exc:
            raise AdminError(str(exc)) from None
        if self.shared.enabled():
            try:
                cleared = await self.shared.reset(keys)
            except CounterUnavailable as exc:
                raise Unavailable(str(exc)) from None
            result: dict[str, Any] = {"keys": keys, "cleared": cleared, "owners": ["redis"],
                                      "worker": "redis"}
        else:
            result = await self._reset_on_workers(keys)
        log_event("counters_reset", keys=keys, cleared=result["cleared"], by=by)
        domain = keys[0].partition(":")[2].rpartition("@")[2] if kind == "account" else ""
        if kind == "account":
            self.compromise.forget(keys[0].partition(":")[2])
        await self.desk.audit(by, "counters-reset", keys[0].partition(":")[2], domain,
                              reason, details={"keys": keys, "counters": result["cleared"]})
        return result

    async def _reset_on_workers(self, keys: list[str]) -> dict[str, Any]:
        candidates = [w for w in self.membership.workers.values()
                      if w.state == MEMBER and w.identity]
        if not candidates:
            raise Unavailable("no worker is in the ring to ask")
        # One id for the whole reset: a second worker asked after a silent first one
        # reaches owners that answer it again without resetting twice.
        payload = {"keys": keys, "reset_id": uuid.uuid4().hex}
        for worker in candidates[:2]:
            reply = await self._ask(worker, "reset", payload, RESET_TIMEOUT)
            if reply is None:
                continue
            if not reply.ok:
                raise AdminError(f"{worker.name}: {reply.error}")
            return {"keys": keys, "cleared": int(reply.data.get("cleared", 0)),
                    "owners": list(reply.data.get("owners", [])), "worker": worker.name}
        raise Unavailable("no worker answered in time")

    async def _why(self, args: dict[str, Any]) -> dict[str, Any]:
        return await why(list(self.membership.workers.values()), self._ask, args)

    async def _queue(self, args: dict[str, Any]) -> dict[str, Any]:
        change = args.get("action") in CHANGES
        if change:
            by, reason = text(args, "by", required=True), text(args, "reason")
        try:
            result = await queue_command(list(self.membership.workers.values()), self._ask, args)
        except QueueError as exc:
            raise AdminError(str(exc)) from None
        if change:
            await self._audit_queue(result, by, reason)
        return result

    async def _audit_queue(self, result: dict[str, Any], by: str, reason: str) -> None:
        """One entry per tenant whose messages the purge, hold or release touched."""
        by_domain: dict[str, list[str]] = {}
        for message in result["messages"]:
            domain = str(message.get("account", "")).rpartition("@")[2]
            by_domain.setdefault(domain, []).append(message["queue_id"])
        for domain, ids in sorted(by_domain.items()):
            subject = result.get("account") or result.get("client") or ", ".join(ids)
            details: dict[str, Any] = {"messages": len(ids), "queue_ids": ids}
            if result["action"] == "purge":
                details["bounce"] = bool(result.get("bounce"))
            await self.desk.audit(by, f"queue-{result['action']}", subject, domain, reason,
                                  details=details)

    async def _ask(self, worker: Worker, command: str, args: dict[str, Any],
                   timeout: float) -> wire.AdminReply | None:
        """One request to a worker; its reply, or None when none came within ``timeout``."""
        rid = uuid.uuid4().hex
        future: asyncio.Future[wire.AdminReply] = asyncio.get_running_loop().create_future()
        self._asks[rid] = future
        try:
            await self._send(worker.identity, wire.AdminRequest(command, {**args, "rid": rid}))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._asks.pop(rid, None)

