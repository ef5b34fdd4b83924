"""SPEC §3.7: the first few spam-classified messages of a client are let through.

A false positive must not lose mail, so the first ``spam.grace`` messages a
client address sends in ``spam.window`` that the classifier calls spam are
accepted; the grace is part of the end-of-DATA reservation, so racing
sessions cannot share one grace slot.
"""

from __future__ import annotations

from cluster.counting import Op
from cluster.keys import SPAM, spam_key
from worker import replies
from worker.policies import Client, Verdict, reject
from worker.snapshot import Snapshot


class SpamGracePolicy:
    name = "spam"

    def ops(self, snapshot: Snapshot, client: Client) -> list[Op]:
        if client.trusted:
            return []
        settings = snapshot.settings.spam
        return [Op(spam_key(client.key), SPAM, settings.window, settings.grace)]

    def refusal(self, client: Client, detail: str) -> Verdict:
        return reject(self.name, replies.SPAM_DETECTED.format(sid=client.sid), detail)
