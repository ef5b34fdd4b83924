"""SPEC §3.7: the first few spam-classified messages of a client are let through.

A false positive must not lose mail, so the first ``spam.grace`` messages a
client address sends in ``spam.window`` that the classifier
(worker/policies/spam_scan.py) calls spam are accepted; the grace is part
of the end-of-DATA reservation, so racing sessions cannot share one grace
slot.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import SPAM, spam_key
from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


class SpamGracePolicy(Policy):
    name = "spam"

    def ops(self, decision: Decision) -> Sequence[Op]:
        client, scan = decision.client, decision.scan
        if client.trusted or scan is None or not scan.spam:
            return ()
        settings = decision.snapshot.settings.spam
        return (Op(spam_key(client.key), SPAM, settings.window, settings.grace),)

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        full = counts.full()
        if full is None:
            return CONTINUE
        op, count = full
        assert decision.scan is not None
        return reject(self.name, replies.SPAM_DETECTED.format(sid=decision.client.sid),
                      f"score {decision.scan.score:g}; {op.key} {op.window:g}s {count}/{op.max}")
