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
from worker.policies import Client, Verdict, reject
from worker.snapshot import Snapshot


class AuthThrottlePolicy:
    name = "auth_throttle"

    def ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        """One failure, counted against ``auth.max_failures``; none for trusted networks."""
        if client.trusted:
            return []
        settings = snapshot.settings.auth
        return [Op(auth_failure_key(client.key), FAILURES, settings.failure_window,
                   settings.max_failures)]

    def refusal(self, client: Client, counts: Sequence[int]) -> Verdict:
        return reject(self.name, replies.AUTH_THROTTLED.format(sid=client.sid),
                      f"{counts[0] if counts else '?'} failures")
