"""``server.max_recipients``: a transaction takes at most so many recipients (452, SPEC §2)."""

from __future__ import annotations

from worker import replies
from worker.policies import CONTINUE, Verdict, tempfail
from worker.policies.base import Counts, Decision, Policy


class MaxRecipientsPolicy(Policy):
    name = "max_recipients"

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        limit = decision.snapshot.settings.server.max_recipients
        if decision.accepted >= limit:
            return tempfail(self.name, replies.TOO_MANY_RECIPIENTS,
                            f"{decision.accepted} accepted, max {limit}")
        return CONTINUE
