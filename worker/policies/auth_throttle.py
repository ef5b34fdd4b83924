"""SPEC §3.1: too many failed AUTHs from one client address lock it out for a while."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import FAILURES, auth_failure_key
from worker import replies
from worker.policies import CONTINUE, Client, Verdict, reject
from worker.snapshot import Snapshot


class AuthThrottlePolicy:
    name = "auth_throttle"

    def ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        if client.trusted:
            return []
        settings = snapshot.settings.auth
        return [Op(auth_failure_key(client.key), FAILURES, settings.failure_window,
                   settings.max_failures)]

    def failure_ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        return [Op(op.key, op.series, op.window, None) for op in self.ops(snapshot, client)]

    def judge(self, client: Client, ops: Sequence[Op], counts: Sequence[int]) -> Verdict:
        for op, count in zip(ops, counts, strict=True):
            if op.max is not None and count >= op.max:
                return reject(self.name, replies.AUTH_THROTTLED.format(sid=client.sid),
                              f"{count} failures")
        return CONTINUE
