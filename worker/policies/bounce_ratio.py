"""SPEC §3.6: refuse a client address whose recent mail mostly did not deliver."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.counting import Op
from cluster.keys import ACCEPTED, UNDELIVERABLE, bounce_key
from worker import replies
from worker.policies import CONTINUE, Client, Verdict, reject
from worker.snapshot import Snapshot


class BounceRatioPolicy:
    name = "bounce_ratio"

    def ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        """Reads only: the accepted and the undeliverable count of the window."""
        if client.trusted:
            return []
        window = snapshot.settings.bounce.window
        key = bounce_key(client.key)
        return [Op(key, ACCEPTED, window, None, 0), Op(key, UNDELIVERABLE, window, None, 0)]

    def accept_ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        """Counts the message as accepted; part of the end-of-DATA reservation."""
        if client.trusted:
            return []
        return [Op(bounce_key(client.key), ACCEPTED, snapshot.settings.bounce.window, None, 1)]

    def judge(self, snapshot: Snapshot, client: Client, ops: Sequence[Op],
              counts: Sequence[int]) -> Verdict:
        if not ops:
            return CONTINUE
        accepted, undeliverable = counts
        settings = snapshot.settings.bounce
        if accepted >= settings.min_messages and undeliverable > settings.max_ratio * accepted:
            return reject(self.name, replies.POLICY_VIOLATION.format(sid=client.sid),
                          f"{undeliverable}/{accepted} undeliverable")
        return CONTINUE
