"""SPEC §3.6: refuse a client address whose recent mail mostly did not deliver.

At MAIL it reads the window's accepted and undeliverable counts; at the end
of DATA it counts the message as accepted, as part of the message's
reservation (it never refuses there: its op has no limit).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import ACCEPTED, UNDELIVERABLE, bounce_key
from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


class BounceRatioPolicy(Policy):
    name = "bounce_ratio"

    def ops(self, decision: Decision) -> Sequence[Op]:
        client = decision.client
        if client.trusted:
            return ()
        window = decision.snapshot.settings.bounce.window
        key = bounce_key(client.key)
        if decision.stage == "DATA":
            return (Op(key, ACCEPTED, window, None, 1),)
        return (Op(key, ACCEPTED, window, None, 0), Op(key, UNDELIVERABLE, window, None, 0))

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        if decision.stage != "MAIL" or not counts.ops:
            return CONTINUE
        accepted, undeliverable = counts.values
        settings = decision.snapshot.settings.bounce
        if accepted >= settings.min_messages and undeliverable > settings.max_ratio * accepted:
            return reject(self.name, replies.POLICY_VIOLATION.format(sid=decision.client.sid),
                          f"{undeliverable}/{accepted} undeliverable")
        return CONTINUE
