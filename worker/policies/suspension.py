"""SPEC §3.9: MAIL of a suspended account is refused; the decision line carries the reason."""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.support_state import iso_utc
from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


class SuspensionPolicy(Policy):
    name = "suspension"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        client = decision.client
        assert client.account is not None, "runs after AUTH"
        found = decision.snapshot.support.suspension(client.account.user, self.clock())
        if found is None:
            return CONTINUE
        until = f" until {iso_utc(found.until)}" if found.until is not None else ""
        return reject(self.name, replies.POLICY_VIOLATION.format(sid=client.sid),
                      f"suspended by {found.by}{until}: {found.reason}")
