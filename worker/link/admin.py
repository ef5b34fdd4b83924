"""The coordinator's questions to this worker, answered (``cluster.admin_wire``'s worker part).

``inspect`` and ``reset`` go through the counter node to each key's owner;
``queue`` (``sendguard queue list|flush|delete|purge|hold|release``) and
``adopt`` (orphaned spool folders, :mod:`worker.spool.adoption`) are this
worker's delivery agent's; ``why`` reads its memory of recent decisions
(:mod:`worker.recent`). Queue work, adoption and ``why`` are answered
once the worker serves (its spool is loaded); before that, and for
anything that fails, the answer is a ``WorkerFailed`` with one sentence for
the operator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cluster import admin_wire as aw
from worker.delivery import DeliveryAgent
from worker.link.line import CoordinatorLine
from worker.recent import RecentDecisions
from worker.spool.adoption import adopt_orphans


class KeyOwners(Protocol):
    """The counter node, as far as these questions need it (worker/counters/node.py)."""

    async def inspect(self, key: str) -> list[dict[str, Any]]: ...
    async def reset(self, keys: Sequence[str], rid: str) -> tuple[int, list[str]]: ...


class _Refused(Exception):
    """A request this worker cannot serve (now); its text goes to the operator."""


class AdminServer:
    def __init__(self, line: CoordinatorLine, node: KeyOwners, delivery: DeliveryAgent,
                 recent: RecentDecisions | None, phase: Callable[[], str]) -> None:
        self._line = line
        self._node = node
        self._delivery = delivery
        self._recent = recent
        self._phase = phase  # the worker's, as its heartbeat reports it
        self._answering: set[asyncio.Task[None]] = set()
        self._adopting = asyncio.Lock()

    def receive(self, request: aw.WorkerRequest[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(request))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def close(self) -> None:
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)

    async def _answer(self, request: aw.WorkerRequest[Any]) -> None:
        name = self._line.name
        reply: aw.WorkerReply
        try:
            reply = await self._work(request)
        except _Refused as exc:
            reply = aw.WorkerFailed(request.rid, name, str(exc))
        except Exception as exc:
            logging.getLogger(__name__).exception("admin %s", request.TYPE)
            reply = aw.WorkerFailed(request.rid, name, f"{type(exc).__name__}: {exc}")
        await self._line.send(reply)

    async def _work(self, request: aw.WorkerRequest[Any]) -> aw.WorkerReply:
        rid, name = request.rid, self._line.name
        if isinstance(request, aw.WorkerInspectRequest):
            rows = {key: await self._node.inspect(key) for key in request.keys}
            return aw.WorkerInspectReply(rid, name, rows)
        if isinstance(request, aw.WorkerResetRequest):
            cleared, owners = await self._node.reset(request.keys, request.reset_id)
            return aw.WorkerResetReply(rid, name, cleared, owners)
        if isinstance(request, aw.WorkerWhyRequest):
            recent = self._recent
            if recent is None or self._phase() == "starting":
                raise _Refused(f"{name} is not serving yet")
            return aw.WorkerWhyReply(rid, name, recent.session(request.sid),
                                     {"decisions": recent.max_decisions,
                                      "seconds": recent.max_age})
        if self._phase() == "starting":
            raise _Refused(f"{name} has not loaded its spool yet")
        if isinstance(request, aw.WorkerQueueRequest):
            return await self._queue(request)
        if isinstance(request, aw.WorkerAdoptRequest):
            if self._phase() != "serving":
                # A draining agent would not deliver what it took.
                raise _Refused(f"{name} is {self._phase()}")
            async with self._adopting:
                found = await adopt_orphans(self._delivery.spool, request.keep,
                                            self._delivery.enqueue)
            return aw.WorkerAdoptReply(rid, name, found["adopted"], found["busy"])
        raise _Refused(f"{name} does not answer {request.TYPE}")

    async def _queue(self, request: aw.WorkerQueueRequest) -> aw.WorkerQueueReply:
        rid, name, delivery, action = request.rid, self._line.name, self._delivery, request.action
        if action == "list":
            return aw.WorkerQueueReply(rid, name, messages=delivery.list_queue())
        if action == "flush":
            return aw.WorkerQueueReply(rid, name, started=delivery.flush())
        if action == "delete":
            return aw.WorkerQueueReply(rid, name, deleted=await delivery.delete(request.queue_id))
        if action in ("purge", "hold", "release"):
            records = delivery.matching(ids=frozenset(request.ids), account=request.account,
                                        client=request.client)
            if action == "purge":
                touched = await delivery.purge(records, request.bounce)
            else:
                touched = await delivery.hold(records, action == "hold")
            return aw.WorkerQueueReply(rid, name, touched=[
                {"queue_id": r.queue_id, "account": r.account} for r in touched])
        raise _Refused(f"unknown queue action {action!r}")
