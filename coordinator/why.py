"""``sendguard why SID``: a session's decisions, from the workers' memory of recent decisions.

A session ran on one worker, but the coordinator does not know which (and
a worker on another host may have had it), so every worker is asked and
the answers are merged in time order. Workers keep what
``admin.recent_decisions`` and ``admin.recent_decisions_for`` allow
(:mod:`worker.recent`); a worker that restarted has forgotten its sessions.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

from cluster.admin_wire import WhyReply, WhyRequest, WorkerWhyReply, WorkerWhyRequest
from coordinator.errors import AdminError, NotFound, Unavailable
from coordinator.membership import Worker
from coordinator.spools import order
from coordinator.worker_rpc import Ask, ask_all

WHY_TIMEOUT = 3.0
SESSION_ID_RE = re.compile(r"[A-Za-z0-9]{22}")  # SPEC §1


async def why(workers: Sequence[Worker], ask: Ask, request: WhyRequest) -> WhyReply:
    sid = request.sid
    if not isinstance(sid, str) or not SESSION_ID_RE.fullmatch(sid):
        raise AdminError(f"{sid!r} is not a session id (22 letters and digits)")
    targets = sorted((w for w in workers if w.identity), key=lambda w: order(w.name))
    if not targets:
        raise Unavailable("no worker is running to ask")
    answers, unanswered = await ask_all(ask, targets, WorkerWhyRequest(sid), WorkerWhyReply,
                                        WHY_TIMEOUT)
    decisions: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    for name, answer in answers.items():
        decisions += [{**d, "worker": name} for d in answer.decisions]
        kept = answer.kept or kept
    decisions.sort(key=_moment)
    if not decisions:
        message = (f"no decision of session {sid} is remembered by the workers"
                   + _kept(kept))
        if unanswered:
            message += "; not answering: " + "; ".join(
                f"{name}: {why}" for name, why in sorted(unanswered.items()))
        raise NotFound(message)
    return WhyReply(sid, decisions, unanswered)


def _moment(decision: dict[str, Any]) -> float:
    """When a decision was made. Its ``ts`` has no milliseconds on a whole second, so
    as text ``...:13Z`` would sort after ``...:13.004Z``."""
    try:
        return datetime.datetime.fromisoformat(decision.get("ts", "")).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _kept(kept: dict[str, Any]) -> str:
    if not kept:
        return ""
    hours = float(kept.get("seconds", 0)) / 3600
    return (f" (each keeps its last {kept.get('decisions')} decisions, for at most "
            f"{hours:g} h)")
