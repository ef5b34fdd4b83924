"""The workers' queues as the coordinator sees them: queue commands and adoption.

``sendguard queue list|flush|delete|purge|hold|release`` goes to every
worker that has said Hello (a leaving worker still holds its queue until it
exits), and the answers are merged: one list sorted by arrival, the sum of
flushed messages, the one worker that deleted the id, or the messages a
purge, hold or release touched on each worker. A worker that does not
answer in time, or is still loading its spool, is named in
``unanswered``: the list is then incomplete, and a delete that found
nothing says so.

Spool adoption (the rule is in :mod:`worker.spool.adoption`): every
``ADOPT_EVERY`` seconds, and soon after a worker exits, the first serving
worker in ring order is asked to adopt every spool folder whose name the
cluster neither runs nor is about to run (:class:`AdoptionSweep`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Any

from cluster.admin_wire import (
    QUEUE_ACTIONS,
    QueueReply,
    QueueRequest,
    WorkerAdoptReply,
    WorkerAdoptRequest,
    WorkerQueueReply,
    WorkerQueueRequest,
)
from cluster.logjson import log_event
from cluster.names import BadDomain, client_key, normalise_address
from coordinator.membership import MEMBER, Membership, Worker
from coordinator.worker_rpc import Ask, answer_of, ask_all

QUEUE_TIMEOUT = 5.0
ADOPT_EVERY = 2.0
ADOPT_TIMEOUT = 60.0     # a large orphaned queue is read whole before the answer
RESTART_GRACE = 60.0     # twice the supervisor's longest restart backoff
CHANGES = ("purge", "hold", "release")  # audited by the caller
QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")  # SPEC §1
_NAME_RE = re.compile(r"(?:(.+)-)?w(\d+)")  # w3 on one host, HOST-w3 between hosts


class QueueError(Exception):
    pass


async def queue_command(workers: Sequence[Worker], ask: Ask,
                        request: QueueRequest) -> QueueReply:
    action = request.action
    if action not in QUEUE_ACTIONS:
        raise QueueError(f"queue: unknown action {action!r} (list, flush or delete)")
    payload: dict[str, Any] = {}
    if action == "delete":
        queue_id = request.queue_id
        if not isinstance(queue_id, str) or not QUEUE_ID_RE.fullmatch(queue_id):
            raise QueueError(f"queue delete: {queue_id!r} is not a queue id")
        payload["queue_id"] = queue_id
    elif action in CHANGES:
        payload.update(selection(request))
    targets = sorted((w for w in workers if w.identity), key=lambda w: order(w.name))
    if not targets:
        raise QueueError("no worker is running to ask")
    answers, unanswered = await ask_all(ask, targets, WorkerQueueRequest(action, **payload),
                                        WorkerQueueReply, QUEUE_TIMEOUT)
    answered = sorted(answers, key=order)
    if action != "delete" and not answers:
        raise QueueError("no worker answered: " + _reasons(unanswered))
    if action == "list":
        messages = [{**message, "worker": name} for name, answer in answers.items()
                    for message in answer.messages or ()]
        messages.sort(key=lambda m: (m.get("arrival", 0.0), m.get("queue_id", "")))
        return QueueReply(action, answered, unanswered, messages=messages)
    if action == "flush":
        per_worker = {name: answer.started or 0 for name, answer in answers.items()}
        return QueueReply(action, answered, unanswered, started=sum(per_worker.values()),
                          per_worker=per_worker)
    if action in CHANGES:
        touched = [{**item, "worker": name} for name, answer in answers.items()
                   for item in answer.touched or ()]
        return QueueReply(action, answered, unanswered, messages=touched, touched=len(touched),
                          per_worker={name: sum(1 for t in touched if t["worker"] == name)
                                      for name in answers},
                          ids=payload.get("ids"), account=payload.get("account"),
                          client=payload.get("client"), bounce=payload.get("bounce"))
    found = [name for name, answer in answers.items() if answer.deleted]
    if not found:
        message = f"no queued message has the id {payload['queue_id']}"
        if unanswered:
            message += f" on the workers that answered ({_reasons(unanswered)})"
        raise QueueError(message)
    return QueueReply(action, answered, unanswered, queue_id=payload["queue_id"], deleted=True,
                      worker=found[0])


def selection(request: QueueRequest) -> dict[str, Any]:
    """Which messages a purge, hold or release is about: ids, an account or an address."""
    action = request.action
    ids = request.ids or []
    account = request.account or ""
    address = request.ip or ""
    chosen = [name for name, value in (("ids", ids), ("account", account), ("ip", address))
              if value]
    allowed = ("account", "ip") if action == "purge" else ("ids", "account")
    if len(chosen) != 1 or chosen[0] not in allowed:
        raise QueueError(f"queue {action}: name exactly one of "
                         + " or ".join({"ids": "queue ids", "account": "--account USER",
                                        "ip": "--ip ADDR"}[a] for a in allowed))
    extra = {"bounce": bool(request.bounce)} if action == "purge" else {}
    if ids:
        if not isinstance(ids, list) or not all(isinstance(i, str) and QUEUE_ID_RE.fullmatch(i)
                                                for i in ids):
            raise QueueError(f"queue {action}: {ids!r} are not queue ids")
        return {"ids": ids, **extra}
    if account:
        try:
            return {"account": normalise_address(str(account)), **extra}
        except BadDomain:
            raise QueueError(f"queue {action}: {account!r} is not an account like "
                             "user@domain") from None
    try:
        ipaddress.ip_address(str(address))
    except ValueError:
        raise QueueError(f"queue {action}: {address!r} is not an IP address") from None
    return {"client": client_key(str(address)), **extra}


class AdoptionSweep:
    """Asks a serving worker of each host to adopt orphaned spool folders there.

    A name is kept while the coordinator knows a worker of that name, or
    for ``RESTART_GRACE`` after it was last started or exited (the
    supervisor restarts a dead worker within 30 s), unless it was retired.
    The names a supervisor is asked to run (``w0`` ... or ``HOST-w0`` ...)
    count as seen when this coordinator first learns of them, which covers
    a worker waiting for its restart while the coordinator itself restarted.
    A worker sees only its own host's spool, so each host has its own sweep.
    """

    def __init__(self, ask: Ask) -> None:
        self._ask = ask
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next = 0.0
        self._seen: dict[str, float] = {}
        self._retired: set[str] = set()

    def event(self, name: str, event: str, now: float) -> None:
        """A supervisor's ProcessEvent: started | exited | leaving."""
        if event == "leaving":
            self._retired.add(name)
            return
        if event == "started":
            self._retired.discard(name)
        self._seen[name] = now
        if event == "exited":
            self._next = 0.0  # a retired worker may have left a queue behind

    def keep(self, now: float, membership: Membership, target: int) -> list[str]:
        hosts = {""} | {_host(name) for name in (*membership.workers, *self._seen)}
        for host in hosts:
            for index in range(target):
                self._seen.setdefault(f"{host}-w{index}" if host else f"w{index}", now)
        waiting = {name for name, seen in self._seen.items()
                   if now - seen < RESTART_GRACE and name not in self._retired}
        return sorted(set(membership.workers) | waiting, key=order)

    def tick(self, now: float, membership: Membership, target: int) -> None:
        if target < 1 or membership.recovering(now) or now < self._next:
            return
        keep = self.keep(now, membership, target)
        adopters: dict[str, Worker] = {}
        for name, _ in membership.members():
            worker = membership.workers.get(name)
            if (worker is not None and worker.state == MEMBER and worker.identity
                    and worker.report.get("phase") == "serving"):
                adopters.setdefault(_host(name), worker)
        self._next = now + ADOPT_EVERY
        for host, worker in adopters.items():
            task = self._tasks.get(host)
            if task is None or task.done():
                self._tasks[host] = asyncio.create_task(self._sweep(worker, keep))

    async def _sweep(self, worker: Worker, keep: list[str]) -> None:
        answer = answer_of(await self._ask(worker, WorkerAdoptRequest(keep), ADOPT_TIMEOUT),
                           WorkerAdoptReply)
        if answer is None:
            log_event("adoption_unanswered", logging.WARNING, worker=worker.name)
        elif isinstance(answer, str):
            log_event("adoption_failed", logging.WARNING, worker=worker.name, error=answer)
        elif answer.adopted:
            log_event("spools_adopted", worker=worker.name, adopted=answer.adopted)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _reasons(unanswered: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in sorted(unanswered.items()))


def _host(name: str) -> str:
    """``mx1`` for ``mx1-w3``; "" for ``w3`` (one host)."""
    match = _NAME_RE.fullmatch(name)
    return match.group(1) or "" if match else ""


def order(name: str) -> tuple[str, int, str]:
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return ("", 1 << 30, name)
    return (match.group(1) or "", int(match.group(2)), name)
