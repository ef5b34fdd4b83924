"""Requests from the coordinator to workers, matched to their replies by ``rid``.

The coordinator asks a worker for its part of ``inspect``, ``reset``,
``queue``, ``why`` and spool adoption with a ``wire.AdminRequest``; the
reply comes back on the coordinator's ROUTER like any other message and is
handed to :meth:`WorkerRpc.reply`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cluster import wire
from coordinator.membership import Worker
from coordinator.outbox import Outbox

Ask = Callable[[Worker, str, dict[str, Any], float], Awaitable[wire.AdminReply | None]]


class WorkerRpc:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._waiting: dict[str, asyncio.Future[wire.AdminReply]] = {}

    async def ask(self, worker: Worker, command: str, args: dict[str, Any],
                  timeout: float) -> wire.AdminReply | None:
        """One request to a worker; its reply, or None when none came within ``timeout``."""
        rid = uuid.uuid4().hex
        future: asyncio.Future[wire.AdminReply] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await self._outbox.send(worker.identity,
                                    wire.AdminRequest(command, {**args, "rid": rid}))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(rid, None)

    def reply(self, reply: wire.AdminReply) -> None:
        future = self._waiting.pop(str(reply.data.get("rid", "")), None)
        if future is not None and not future.done():
            future.set_result(reply)


async def ask_all(ask: Ask, workers: Sequence[Worker], command: str, args: dict[str, Any],
                  timeout: float) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every worker at once: the data of those that answered, and why each other did not."""
    replies = await asyncio.gather(*(ask(w, command, args, timeout) for w in workers))
    answers: dict[str, dict[str, Any]] = {}
    unanswered: dict[str, str] = {}
    for worker, reply in zip(workers, replies, strict=True):
        if reply is None:
            unanswered[worker.name] = f"no answer within {timeout:g} s"
        elif not reply.ok:
            unanswered[worker.name] = reply.error
        else:
            answers[worker.name] = reply.data
    return answers, unanswered
