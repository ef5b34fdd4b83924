"""A worker's line to the coordinator: snapshots in, ring epochs in, reports out.

The zguide "Clone" pattern: subscribe to ``events.sock`` first, then ask for
the snapshot on ``coord.sock``; later snapshots and rings arrive on the
subscription. Every snapshot is complete, so a newer one simply replaces
what is held (a skipped version needs nothing else), and the report sent
every second names the version and epoch held: the coordinator sends one
that was missed (a subscription not yet joined, a full queue) directly.

Rings are applied one at a time, in epoch order, skipping to the newest
when several arrive during a hand-off. A worker that was in the ring and is
left out of a later one has been retired: :attr:`removed` is set.

The coordinator also forwards admin work here as ``AdminRequest``s whose
``rid`` the ``AdminReply`` carries back: ``inspect`` (the counter node asks
each key's owner), ``queue`` (``sendguard queue list|flush|delete|purge|
hold|release`` on this worker's delivery agent), ``why`` (the session's
recent decisions, :mod:`worker.recent`) and ``adopt`` (claim orphaned spool folders, see
:mod:`worker.spool.adoption`). Queue work is answered only once the worker
is serving, i.e. its spool is loaded and :attr:`delivery` set.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio

from cluster import wire
from cluster.logjson import log_event
from cluster.settings import parse_settings
from cluster.support_state import SupportState
from cluster.tenants import parse_tenants
from cluster.validate import ConfigError
from worker.delivery import DeliveryAgent
from worker.dkim import DkimKeyring
from worker.geo import CountryDatabase, GeoDatabaseError
from worker.recent import RecentDecisions
from worker.snapshot import Snapshot
from worker.spool.adoption import adopt_orphans

REPORT_INTERVAL = 1.0


class RingNode(Protocol):
    async def apply_ring(self, epoch: int, members: Sequence[tuple[str, str]]) -> None: ...
    async def inspect(self, key: str) -> list[dict[str, Any]]: ...
    async def reset(self, keys: Sequence[str], rid: str) -> tuple[int, list[str]]: ...


def build_snapshot(message: wire.SnapshotMessage, previous: Snapshot | None) -> Snapshot:
    """Raises ConfigError when the snapshot cannot be used (it was validated upstream).

    What did not change is taken from ``previous`` as it is: a new version may
    only carry a suspension, and a large tenant directory costs a noticeable
    time to parse again."""
    if (previous is not None and str(previous.settings.path) == message.config_path
            and previous.settings.raw == message.config):
        settings = previous.settings
    else:
        settings = parse_settings(Path(message.config_path), message.config)
    if (previous is not None and message.tenants_version
            and previous.tenants.version == message.tenants_version
            and previous.settings.tenants_file == settings.tenants_file):
        tenants = previous.tenants
    else:
        tenants = parse_tenants(settings.tenants_file, message.tenants,
                                version=message.tenants_version)
    try:
        support = SupportState.from_wire(message.support or {})
    except ValueError as exc:
        raise ConfigError(settings.path, "cluster.state_dir", f"bad support state: {exc}",
                          show_value=False) from None
    geoip = None
    if message.geoip is not None:
        old = previous.geoip if previous is not None else None
        if old is not None and old.version == message.geoip_version:
            geoip = old  # a tenant change: no need to map the database again
        else:
            try:
                geoip = CountryDatabase.from_bytes(message.geoip, message.geoip_version)
            except GeoDatabaseError as exc:
                raise ConfigError(settings.path, "geoip.database", str(exc),
                                  show_value=False) from None
    dkim = DkimKeyring.load(settings.dkim.keys_dir, tenants,
                            previous.dkim if previous is not None else None)
    return Snapshot(settings, tenants, geoip, message.version, support, dkim=dkim)


class ClusterLink:
    def __init__(self, runtime_dir: Path, name: str) -> None:
        self.runtime_dir = runtime_dir
        self.name = name
        self.endpoint = ""
        self.phase = "starting"
        self.ring_epoch = 0
        self.member = False
        self.removed = asyncio.Event()
        self.report_values: Callable[[], dict[str, Any]] = dict
        # Told every ConnectionCounts publication (worker/connections.py).
        self.on_connections: Callable[[dict[str, dict[str, int]]], None] | None = None
        self._report_soon: asyncio.TimerHandle | None = None
        self.delivery: DeliveryAgent | None = None
        self.recent: RecentDecisions | None = None
        self._snapshot: Snapshot | None = None
        self._have_snapshot = asyncio.Event()
        self._snapshot_error: ConfigError | None = None
        self._node: RingNode | None = None
        self._ring_seen = 0
        self._ring_pending: wire.RingMessage | None = None
        self._ring_wakeup = asyncio.Event()
        self._was_member = False
        self._tasks: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()
        self._adopting = asyncio.Lock()

    # -- snapshots ---------------------------------------------------------------

    async def connect(self) -> None:
        self._context = zmq.asyncio.Context()
        self.sub = self._context.socket(zmq.SUB)
        self.dealer = self._context.socket(zmq.DEALER)
        for sock in (self.sub, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_SNAPSHOT)
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_RING)
        self.sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_CONNECTIONS)
        self.sub.connect(wire.events_endpoint(self.runtime_dir))
        self.dealer.connect(wire.coordinator_endpoint(self.runtime_dir))
        self._tasks += [asyncio.create_task(self._receive(self.sub)),
                        asyncio.create_task(self._receive(self.dealer))]

    async def first_snapshot(self) -> Snapshot:
        """Ask until the coordinator answers (it may still be starting)."""
        while not self._have_snapshot.is_set():
            await self._send(wire.SnapshotRequest(self.name))
            try:
                await asyncio.wait_for(self._have_snapshot.wait(), 5.0)
            except TimeoutError:
                log_event("waiting_for_coordinator", logging.WARNING, worker=self.name)
        if self._snapshot_error is not None:
            raise self._snapshot_error
        assert self._snapshot is not None
        return self._snapshot

    def current(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def _offer_snapshot(self, message: wire.SnapshotMessage) -> None:
        old = self._snapshot
        if old is not None and message.version <= old.version:
            return
        try:
            snapshot = build_snapshot(message, old)
        except ConfigError as exc:
            if old is None:
                # Nothing to fall back on: the worker cannot start.
                self._snapshot_error = exc
                self._have_snapshot.set()
                return
            log_event("snapshot_refused", logging.ERROR, version=message.version, error=str(exc))
            return
        self._snapshot = snapshot
        self._have_snapshot.set()
        if old is not None:
            log_event("snapshot", version=snapshot.version, tenants=snapshot.tenants.version,
                      geoip=snapshot.geoip.version if snapshot.geoip else None)

    # -- membership ----------------------------------------------------------------

    async def join(self, node: RingNode, endpoint: str) -> None:
        """Say Hello and Ready, start applying rings and reporting."""
        self._node = node
        self.endpoint = endpoint
        await self._send(wire.Hello(self.name, os.getpid(), endpoint))
        await self._send(wire.Ready(self.name))
        self._tasks += [asyncio.create_task(self._apply_rings()),
                        asyncio.create_task(self._report_loop())]

    def _offer_ring(self, message: wire.RingMessage) -> None:
        if message.epoch <= self._ring_seen:
            return
        self._ring_seen = message.epoch
        self._ring_pending = message
        self._ring_wakeup.set()

    async def _apply_rings(self) -> None:
        assert self._node is not None
        while True:
            await self._ring_wakeup.wait()
            self._ring_wakeup.clear()
            ring, self._ring_pending = self._ring_pending, None
            if ring is None:
                continue
            members = [(str(name), str(endpoint)) for name, endpoint in ring.members]
            try:
                await self._node.apply_ring(ring.epoch, members)
            except Exception:
                logging.getLogger(__name__).exception("ring epoch %d", ring.epoch)
                # Accept it again: the coordinator resends it when our report lags.
                self._ring_seen = min(self._ring_seen, self.ring_epoch)
                continue
            self.ring_epoch = ring.epoch
            self.member = any(name == self.name for name, _ in members)
            log_event("ring_applied", worker=self.name, epoch=ring.epoch, member=self.member)
            if self.member:
                self._was_member = True
            elif self._was_member:
                self.removed.set()

    # -- reports and requests --------------------------------------------------------

    async def report(self) -> None:
        values = self.report_values()
        values.update(phase=self.phase, member=self.member, endpoint=self.endpoint,
                      snapshot_version=self._snapshot.version if self._snapshot else 0,
                      ring_epoch=self.ring_epoch)
        await self._send(wire.MetricsReport(self.name, os.getpid(), values))

    def report_soon(self, delay: float) -> None:
        """An extra report within ``delay`` (at most one pending), between the regular ones."""
        if self._report_soon is not None or not self._tasks:
            return

        def send() -> None:
            self._report_soon = None
            task = asyncio.ensure_future(self.report())
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

        self._report_soon = asyncio.get_running_loop().call_later(delay, send)

    async def _report_loop(self) -> None:
        while True:
            await self.report()
            await asyncio.sleep(REPORT_INTERVAL)

    async def _answer(self, request: wire.AdminRequest,
                      work: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        rid = str(request.args.get("rid", ""))
        try:
            reply = wire.AdminReply(True, {**await work(request.args), "rid": rid,
                                           "worker": self.name})
        except _Refused as exc:
            reply = wire.AdminReply(False, {"rid": rid, "worker": self.name}, str(exc))
        except Exception as exc:
            logging.getLogger(__name__).exception("admin %s", request.command)
            reply = wire.AdminReply(False, {"rid": rid, "worker": self.name},
                                    f"{type(exc).__name__}: {exc}")
        await self._send(reply)

    async def _inspect(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._node is not None
        keys = args.get("keys", [])
        return {"rows": {str(key): await self._node.inspect(str(key)) for key in keys}}

    async def _why(self, args: dict[str, Any]) -> dict[str, Any]:
        recent = self.recent
        if recent is None:
            raise _Refused(f"{self.name} is not serving yet")
        return {"decisions": recent.session(str(args.get("sid", ""))),
                "kept": {"decisions": recent.max_decisions, "seconds": recent.max_age}}

    async def _reset(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._node is not None
        keys = [str(key) for key in args.get("keys", [])]
        cleared, owners = await self._node.reset(keys, str(args.get("reset_id", "")))
        return {"cleared": cleared, "owners": owners}

    def _serving(self) -> DeliveryAgent:
        if self.delivery is None:
            raise _Refused(f"{self.name} has not loaded its spool yet")
        return self.delivery

    async def _queue(self, args: dict[str, Any]) -> dict[str, Any]:
        delivery = self._serving()
        action = args.get("action")
        if action == "list":
            return {"messages": delivery.list_queue()}
        if action == "flush":
            return {"started": delivery.flush()}
        if action == "delete":
            return {"deleted": await delivery.delete(str(args.get("queue_id", "")))}
        if action in ("purge", "hold", "release"):
            records = delivery.matching(ids=frozenset(map(str, args.get("ids") or ())),
                                        account=str(args.get("account") or ""),
                                        client=str(args.get("client") or ""))
            if action == "purge":
                touched = await delivery.purge(records, bool(args.get("bounce")))
            else:
                touched = await delivery.hold(records, action == "hold")
            return {"touched": [{"queue_id": r.queue_id, "account": r.account}
                                for r in touched]}
        raise _Refused(f"unknown queue action {action!r}")

    async def _adopt(self, args: dict[str, Any]) -> dict[str, Any]:
        delivery = self._serving()
        if self.phase != "serving":
            # A draining agent would not deliver what it took.
            raise _Refused(f"{self.name} is {self.phase}")
        keep = [str(name) for name in args.get("keep", [])]
        async with self._adopting:
            return await adopt_orphans(delivery.spool, keep, delivery.enqueue)

    def send_evidence(self, notes: list[list[Any]]) -> None:
        """Compromise evidence (:mod:`worker.evidence`): sent in the background, never
        awaited by a session, never answered."""
        if self.dealer.closed:
            return  # a batch flushed while the worker stops
        task = asyncio.create_task(self._send(wire.Evidence(self.name, notes)))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _send(self, message: wire.Message) -> None:
        try:
            await self.dealer.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is away; the next report says it all again

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                message = wire.decode(frames[-1])
            except wire.WireError as exc:
                log_event("bad_frame", logging.WARNING, error=str(exc))
                continue
            if isinstance(message, wire.SnapshotMessage):
                self._offer_snapshot(message)
            elif isinstance(message, wire.RingMessage):
                self._offer_ring(message)
            elif isinstance(message, wire.ConnectionCounts):
                if self.on_connections is not None and isinstance(message.tables, dict):
                    self.on_connections(message.tables)
            elif isinstance(message, wire.AdminRequest):
                ring = self._node is not None
                work = {"inspect": self._inspect if ring else None,
                        "reset": self._reset if ring else None,
                        "queue": self._queue, "adopt": self._adopt,
                        "why": self._why}.get(message.command)
                if work is not None:
                    task = asyncio.create_task(self._answer(message, work))
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)

    async def close(self) -> None:
        if self._report_soon is not None:
            self._report_soon.cancel()
        tasks = [*self._tasks, *self._requests]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sub.close()
        self.dealer.close()
        self._context.term()


class _Refused(Exception):
    """A request this worker cannot serve (now); its text goes to the operator."""
