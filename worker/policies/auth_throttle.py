"""SPEC §3.1: too many failed AUTHs from one client address lock it out for a while.

Each AUTH reserves one failure on the address's ``auth-fail:`` key before
its password is checked (worker/authentication.py); a reservation the
owner refuses means the address already has ``max_failures`` in the window.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import FAILURES, auth_failure_key
from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


class AuthThrottlePolicy(Policy):
    name = "auth_throttle"

    def ops(self, decision: Decision) -> Sequence[Op]:
        """One failure, counted against ``auth.max_failures``; none for trusted networks."""
        if decision.client.trusted:
            return ()
        settings = decision.snapshot.settings.auth
        return (Op(auth_failure_key(decision.client.key), FAILURES, settings.failure_window,
                   settings.max_failures),)

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        if counts.denied is None:
            return CONTINUE
        return reject(self.name, replies.AUTH_THROTTLED.format(sid=decision.client.sid),
                      f"{counts.values[0] if counts.values else '?'} failures")
