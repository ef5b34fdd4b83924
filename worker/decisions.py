"""Where every decision goes: one JSON line, the worker's memory of it, one metric.

The engine (worker/engine.py) hands every verdict it reaches, and every
refusal the protocol makes, to :class:`DecisionLog`, and to nothing else:
the ``decision`` line with the session id (``docs/OPERATIONS.md`` lists its
fields), the entry ``sendguard why`` reads (:mod:`worker.recent`) and the
worker's refusal and acceptance counts (:mod:`worker.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cluster.logjson import log_event
from worker import replies
from worker.client import Client
from worker.policies import Action, Verdict
from worker.policies.geoip import client_country
from worker.recent import RecentDecisions
from worker.snapshot import Snapshot


class DecisionLog:
    def __init__(self, snapshot: Callable[[], Snapshot], recent: RecentDecisions | None = None,
                 count: Callable[[str, Verdict], None] | None = None) -> None:
        self.snapshot = snapshot
        # Kept for ``sendguard why`` (None: not kept).
        self.recent = recent
        # Told every verdict (the worker's metrics).
        self.count = count

    def __call__(self, client: Client, stage: str, verdict: Verdict, **extra: object) -> Verdict:
        """Log ``verdict``; the same verdict with its reply marked as logged
        (:class:`~worker.replies.Decided`). ``account`` in ``extra`` names the
        account when the session no longer has one (a withdrawn login)."""
        return self.at(logging.INFO, client, stage, verdict, **extra)

    def at(self, level: int, client: Client, stage: str, verdict: Verdict,
           **extra: object) -> Verdict:
        named = extra.pop("account", None)
        account = str(named) if named else (client.account.user if client.account else None)
        country = client.country
        if country is None:
            country = client_country(self.snapshot(), client)
        outcome = verdict.action.value if verdict.action is not Action.CONTINUE else "accept"
        log_event(
            "decision",
            level,
            sid=client.sid,
            client_ip=client.ip,
            account=account,
            stage=stage,
            policy=verdict.policy or None,
            verdict=outcome,
            reply=verdict.reply or None,
            detail=verdict.detail or None,
            country=country or None,
            **extra,
        )
        if self.recent is not None:
            self.recent.add(client.sid, client.ip, country or None, account, stage,
                            verdict.policy or None, outcome, verdict.reply or None,
                            verdict.detail or None, extra)
        if self.count is not None:
            self.count(stage, verdict)
        return Verdict(verdict.action, replies.Decided(verdict.reply), verdict.policy,
                       verdict.detail)
