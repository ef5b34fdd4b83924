"""SPEC §3.4: message rate limits per client address and per account."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import MESSAGES, account_key, ip_key
from worker import replies
from worker.policies import CONTINUE, Client, Verdict, reject
from worker.snapshot import Snapshot


class RateLimitPolicy:
    name = "rate_limit"

    def ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        """One op per window and key; each adds the one message being decided."""
        account = client.account
        assert account is not None, "runs after AUTH"
        settings = snapshot.settings
        ops: list[Op] = []
        if not client.trusted:
            key = ip_key(client.key)
            ops.extend(Op(key, MESSAGES, limit.window, limit.max) for limit in settings.limits)
        key = account_key(account.user)
        for limit in snapshot.tenants.limits(account, settings.limits):
            ops.append(Op(key, MESSAGES, limit.window, limit.max))
        return ops

    def judge(self, client: Client, ops: Sequence[Op], counts: Sequence[int]) -> Verdict:
        index = self.denied(ops, counts)
        if index is None:
            return CONTINUE
        op, count = ops[index], counts[index]
        return reject(self.name, replies.POLICY_VIOLATION.format(sid=client.sid),
                      f"{op.key} {window_text(op.window)} {count}/{op.max}")

    @staticmethod
    def denied(ops: Sequence[Op], counts: Sequence[int]) -> int | None:
        """The first op whose window is already full, if any."""
        for index, (op, count) in enumerate(zip(ops, counts, strict=True)):
            if op.max is not None and count + op.amount > op.max:
                return index
        return None


def window_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"
