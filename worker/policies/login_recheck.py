"""SPEC §3.1, last rule: a session's login is checked again at each MAIL.

An account removed from the tenant directory, or whose password changed,
since this session's AUTH may no longer send, and the session is no longer
authenticated. Otherwise the session takes the account's current entry
(its limits and aliases may have changed).
"""

from __future__ import annotations

from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


class LoginRecheckPolicy(Policy):
    name = "auth"

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        client = decision.client
        account = client.account
        if account is None:
            return CONTINUE
        current = decision.snapshot.tenants.account(account.user)
        if current is not None and current.password == account.password:
            client.account = current
            return CONTINUE
        client.account = None
        return reject(self.name, replies.AUTH_REQUIRED.format(sid=client.sid),
                      "account removed" if current is None else "password changed")
