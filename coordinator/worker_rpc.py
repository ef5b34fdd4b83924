"""Requests from the coordinator to workers, matched to their replies by ``rid``.

The coordinator asks a worker for its part of ``inspect``, ``reset``,
``queue``, ``why`` and spool adoption with one of ``cluster.admin_wire``'s
``WorkerRequest``s; the reply comes back on the coordinator's ROUTER like
any other message and is handed to :meth:`WorkerRpc.reply`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from cluster.admin_wire import WorkerFailed, WorkerReply, WorkerRequest
from coordinator.membership import Worker
from coordinator.outbox import Outbox

Reply = TypeVar("Reply", bound=WorkerReply)
Ask = Callable[[Worker, WorkerRequest[Any], float], Awaitable[WorkerReply | None]]


class WorkerRpc:
    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._waiting: dict[str, asyncio.Future[WorkerReply]] = {}

    async def ask(self, worker: Worker, request: WorkerRequest[Any],
                  timeout: float) -> WorkerReply | None:
        """One request to a worker; its reply (:class:`WorkerFailed` when it could not
        do it), or None when none came within ``timeout``."""
        rid = uuid.uuid4().hex
        future: asyncio.Future[WorkerReply] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await self._outbox.send(worker.identity, dataclasses.replace(request, rid=rid))  # type: ignore[type-var]
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(rid, None)

    def reply(self, reply: WorkerReply) -> None:
        future = self._waiting.pop(reply.rid, None)
        if future is not None and not future.done():
            future.set_result(reply)


def answer_of(reply: WorkerReply | None, kind: type[Reply]) -> Reply | str | None:
    """The reply as the kind asked for; the worker's reason when it failed; None: no answer."""
    if reply is None:
        return None
    if isinstance(reply, kind):
        return reply
    if isinstance(reply, WorkerFailed):
        return reply.error
    return f"answered with {reply.TYPE}"


async def ask_all(ask: Ask, workers: Sequence[Worker], request: WorkerRequest[Reply],
                  kind: type[Reply], timeout: float) -> tuple[dict[str, Reply], dict[str, str]]:
    """Every worker at once: the replies of those that answered, and why each other did not."""
    replies = await asyncio.gather(*(ask(w, request, timeout) for w in workers))
    answers: dict[str, Reply] = {}
    unanswered: dict[str, str] = {}
    for worker, reply in zip(workers, replies, strict=True):
        answer = answer_of(reply, kind)
        if answer is None:
            unanswered[worker.name] = f"no answer within {timeout:g} s"
        elif isinstance(answer, str):
            unanswered[worker.name] = answer
        else:
            answers[worker.name] = answer
    return answers, unanswered
