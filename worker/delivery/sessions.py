"""Per-destination queues and the SMTP sessions that drain them.

The queue manager hands in jobs (one message's recipients for one
destination); :class:`SessionPool` keeps a queue per destination and opens
sessions to it, at most ``per_destination`` at a time and ``max_connections``
in all, in the spirit of Postfix's qmgr. A session carries queued messages
for its destination one after another until it has sent
``messages_per_connection``, so a burst to one domain costs one handshake
per connection, not one per message. When the queue is empty the session
stays open for ``idle_timeout`` seconds (as Postfix's connection cache
does), and the next message for that destination takes it instead of a new
connection: when messages arrive about as fast as they are delivered, a
session that closed whenever its queue ran dry would reconnect for nearly
every message. An idle session gives its slot up at once when
``max_connections`` keeps another destination waiting. A message whose
reused connection turns out to be gone before the server answered its MAIL
FROM (the server timed the idle connection out) goes back to the head of
the queue instead of being deferred.

Destinations waiting for a free connection are served round robin, so one
domain with a deep queue cannot starve the others. A failed connection
while other sessions to the destination are alive lowers that
destination's concurrency instead of retrying at once (the server may be
limiting connections per client); when nothing gets through at all, every
message queued for the destination gets the same deferral.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.logjson import log_event
from cluster.settings import Settings
from worker.delivery.result import DEFERRED, Result, local
from worker.delivery.route import RouteError, Router
from worker.delivery.transport import ConnectError, Connection, tls_policy

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Job:
    """Recipients (indexes into ``record.recipients``) of one message for one destination."""

    owner: Any  # the queue manager's entry for the message
    sender: str
    recipients: list[str]
    indexes: list[int]
    message: bytes
    cancelled: Callable[[], bool]


@dataclass(eq=False, slots=True)
class Destination:
    key: str
    domain: str | None  # None: the smarthost
    limit: int
    jobs: deque[Job] = field(default_factory=deque)
    sessions: int = 0
    connecting: int = 0
    # Sessions with nothing to send, each waiting on its future for a job
    # (True: take one; False: stop), and those woken but not yet running.
    idle: deque[asyncio.Future[bool]] = field(default_factory=deque)
    waking: int = 0

    def wants_session(self) -> bool:
        # A connecting, idle or waking session will take one queued job
        # each; only jobs beyond those justify another connection.
        return (len(self.jobs) > self.connecting + len(self.idle) + self.waking
                and self.sessions < self.limit)

    def wake_idle(self) -> None:
        """Hand queued jobs to idle sessions, one each."""
        while self.idle and len(self.jobs) > self.waking:
            waiter = self.idle.popleft()
            if not waiter.done():
                waiter.set_result(True)
                self.waking += 1


class SessionPool:
    def __init__(
        self,
        settings: Callable[[], Settings],
        router: Router,
        complete: Callable[[Job, list[Result]], None],
        *,
        per_destination: int,
        max_connections: int,
        messages_per_connection: int,
        connect_timeout: float,
        command_timeout: float,
        idle_timeout: float = 2.0,
    ) -> None:
        self._settings = settings
        self._router = router
        self._complete = complete
        self.per_destination = per_destination
        self.max_connections = max_connections
        self.messages_per_connection = messages_per_connection
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self._destinations: dict[str, Destination] = {}
        self._waiting: OrderedDict[str, Destination] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.sessions_opened = 0
        self.stopping = False

    def submit(self, key: str, domain: str | None, job: Job) -> None:
        dest = self._destinations.get(key)
        if dest is None:
            dest = Destination(key, domain, self.per_destination)
            self._destinations[key] = dest
        dest.jobs.append(job)
        dest.wake_idle()
        self._want(dest)

    def pump(self) -> None:
        """Open sessions while connections are free, one destination at a time in turn."""
        while not self.stopping and self._waiting and self.connections < self.max_connections:
            key, dest = next(iter(self._waiting.items()))
            if not dest.wants_session():
                del self._waiting[key]
                continue
            self._waiting.move_to_end(key)
            dest.sessions += 1
            dest.connecting += 1
            self.connections += 1
            self.sessions_opened += 1
            task = asyncio.create_task(self._session(dest))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._waiting and self.connections >= self.max_connections:
            self._retire_idle()

    async def stop(self, timeout: float) -> None:
        """Let sessions finish their current message (within ``timeout``), then cut them."""
        self.stopping = True
        for dest in self._destinations.values():
            for waiter in dest.idle:
                if not waiter.done():
                    waiter.set_result(False)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _want(self, dest: Destination) -> None:
        if dest.wants_session():
            self._waiting[dest.key] = dest

    def _next_job(self, dest: Destination) -> Job | None:
        while dest.jobs:
            job = dest.jobs.popleft()
            if not job.cancelled():
                return job
        return None

    def _fail_queued(self, dest: Destination, result: Result) -> None:
        while (job := self._next_job(dest)) is not None:
            self._complete(job, [result] * len(job.indexes))

    async def _session(self, dest: Destination) -> None:
        conn: Connection | None = None
        try:
            try:
                settings = self._settings()
                hops = await self._router.hops(dest.domain, settings.delivery)
                tls = tls_policy(settings.delivery.tls, settings.delivery.tls_ca)
                conn = await Connection.open(hops, helo=settings.server.hostname, tls=tls,
                                             connect_timeout=self.connect_timeout,
                                             timeout=self.command_timeout)
            except RouteError as exc:
                self._fail_queued(dest, exc.result)
                return
            except ConnectError as exc:
                if dest.sessions > 1:
                    dest.limit = max(1, dest.sessions - 1)
                else:
                    self._fail_queued(dest, exc.result)
                return
            finally:
                dest.connecting -= 1
            sent = 0
            reused = False  # the connection sat idle before this message
            while conn.usable and sent < self.messages_per_connection and not self.stopping:
                job = self._next_job(dest)
                if job is None:
                    if not await self._idle(dest, conn):
                        break
                    reused = True
                    continue
                sent += 1
                try:
                    results = await conn.send(job.sender, job.recipients, job.message)
                except Exception as exc:  # a bug must not leave a message stuck in "active"
                    log.exception("delivery session to %s failed", conn.hop.label)
                    conn.usable = False
                    results = [local(DEFERRED, f"internal error: {exc!r}", "4.3.0")] * len(
                        job.indexes)
                if reused and conn.lost_before_mail:
                    dest.jobs.appendleft(job)  # nothing was sent: a new connection takes it
                    break
                reused = False
                self._complete(job, results)
        except Exception:
            log.exception("delivery session for %s failed", dest.key)
        finally:
            if conn is not None:
                await _close(conn)
            self._session_ended(dest)

    async def _idle(self, dest: Destination, conn: Connection) -> bool:
        """Keep the connection for the next job; False when none came in time."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        dest.idle.append(waiter)
        try:
            async with asyncio.timeout(self.idle_timeout):
                wanted = await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in dest.idle:
                dest.idle.remove(waiter)
            if waiter.done() and not waiter.cancelled() and waiter.result():
                dest.waking -= 1
        return wanted and not self.stopping and conn.usable and conn.connected

    def _retire_idle(self) -> None:
        """Close one idle session: a destination waits for its connection slot."""
        for dest in self._destinations.values():
            while dest.idle:
                waiter = dest.idle.popleft()
                if not waiter.done():
                    waiter.set_result(False)
                    return

    def _session_ended(self, dest: Destination) -> None:
        dest.sessions -= 1
        self.connections -= 1
        if dest.jobs:
            self._want(dest)
        elif dest.sessions == 0:
            self._destinations.pop(dest.key, None)
            self._waiting.pop(dest.key, None)
        self.pump()


async def _close(conn: Connection) -> None:
    try:
        await conn.close()
    except asyncio.CancelledError:
        conn.smtp.close()
        raise
    except Exception as exc:
        log_event("delivery_close_failed", logging.DEBUG, relay=conn.hop.label, error=str(exc))
        conn.smtp.close()
