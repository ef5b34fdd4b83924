"""SPEC §3.4, §3.11, §3.12: rate limits per client address and per account.

Each limit counts messages (1 per accepted message) or recipients (the
message's accepted recipients), in a series of its own: a recipient window
never shares a counter with a message window of the same length.

One op per counter (key, series, window). An enforced limit gives the op its
``max``; a shadow limit on the same counter reads that op's count, and a
shadow limit alone gets an op with ``max=None``: it counts with the
message's reservation (so its counts are what an enforced limit would
see) but can never make that reservation fail, because the owner only
denies ops that carry a max. Whether a shadow limit would have refused is
judged here, from the counts the owner answered with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.counting import Op
from cluster.keys import MESSAGES, RECIPIENTS, account_key, ip_key
from cluster.settings import COUNT_RECIPIENTS, Limit
from cluster.support_state import iso_utc
from worker import replies
from worker.client import Client
from worker.policies import CONTINUE, Action, Verdict, reject
from worker.policies.base import Counts, Decision, Policy
from worker.policies.limit_clears import LimitClears
from worker.snapshot import Snapshot

# Which transaction a MAIL-stage shadow verdict belongs to (Client.extra):
# the same limit is not logged again at that transaction's end of DATA.
_SHADOWED_AT_MAIL = "rate_limit.shadowed"


@dataclass(frozen=True, slots=True)
class ShadowHit:
    """A shadow limit that would have refused this decision."""

    op: Op
    limit: Limit
    count: int

    @property
    def detail(self) -> str:
        return f"{self.op.key} {window_text(self.limit.window)} {self.count}/{self.limit.max}"


class RateLimitPolicy(Policy):
    name = "rate_limit"

    def __init__(self, clears: LimitClears | None = None) -> None:
        # Looks up when a full window clears, for the refusal's line (None: not said).
        self.clears = clears

    def ops(self, decision: Decision) -> Sequence[Op]:
        """One op per counter of the client's address and account.

        A message limit adds 1, a recipient limit the message's accepted
        recipients at the end of DATA, 1 at MAIL (where "the window is
        already full" is all that can be known).
        """
        recipients = len(decision.rcpt_tos) if decision.stage == "DATA" else 1
        ops: list[Op] = []
        for key, limits in self._subjects(decision.snapshot, decision.client):
            merged: dict[tuple[str, float], int | None] = {}
            for limit in limits:
                ident = (series_of(limit), limit.window)
                merged.setdefault(ident, None)
                if not limit.shadow:  # at most one per counter (cluster.settings)
                    merged[ident] = limit.max
            for (series, window), maximum in merged.items():
                amount = recipients if series == RECIPIENTS else 1
                ops.append(Op(key, series, window, maximum, amount))
        return ops

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        """The first full window refuses; otherwise the shadow limits that would have."""
        client = decision.client
        full = counts.full()
        if full is None:
            hits = self.shadow_hits(decision.snapshot, client, counts.ops, counts.values)
            for hit, verdict in self.shadow_verdicts(client, hits, decision.stage):
                decision.shadows.append((verdict, shadow_fields(hit)))
            return CONTINUE
        op, count = full
        window = window_text(op.window) if decision.stage == "MAIL" else f"{op.window:g}s"
        clears = await self.clears.clears_at(op) if self.clears is not None else None
        decision.found.update(key=op.key, window=window_text(op.window), count=count,
                              max=op.max, clears_at=iso_utc(clears))
        return reject(self.name, replies.POLICY_VIOLATION.format(sid=client.sid),
                      f"{op.key} {window} {count}/{op.max}")

    def shadow_hits(self, snapshot: Snapshot, client: Client, ops: Sequence[Op],
                    counts: Sequence[int]) -> list[ShadowHit]:
        """The shadow limits that would have refused, given the counts of ``ops``."""
        by_counter = {(op.key, op.series, op.window): (op, count)
                      for op, count in zip(ops, counts, strict=True)}
        hits = []
        for key, limits in self._subjects(snapshot, client):
            for limit in limits:
                if not limit.shadow:
                    continue
                found = by_counter.get((key, series_of(limit), limit.window))
                if found is not None and found[1] + found[0].amount > limit.max:
                    hits.append(ShadowHit(found[0], limit, found[1]))
        return hits

    def shadow_verdicts(self, client: Client, hits: Sequence[ShadowHit],
                        stage: str) -> list[tuple[ShadowHit, Verdict]]:
        """One ``shadow`` verdict per limit that would have refused this message:
        a limit already shadowed at this transaction's MAIL is not repeated at DATA."""
        before = client.extra.pop(_SHADOWED_AT_MAIL, None)
        assert before is None or isinstance(before, set)
        if stage == "MAIL" and hits:
            client.extra[_SHADOWED_AT_MAIL] = {_ident(hit) for hit in hits}
        return [(hit, Verdict(Action.SHADOW, replies.POLICY_VIOLATION.format(sid=client.sid),
                              self.name, hit.detail))
                for hit in hits if stage == "MAIL" or before is None or _ident(hit) not in before]

    @staticmethod
    def _subjects(snapshot: Snapshot, client: Client) -> list[tuple[str, tuple[Limit, ...]]]:
        account = client.account
        assert account is not None, "runs after AUTH"
        settings = snapshot.settings
        subjects = []
        if not client.trusted:
            subjects.append((ip_key(client.key), settings.limits))
        subjects.append((account_key(account.user),
                         snapshot.tenants.limits(account, settings.limits)))
        return subjects


def series_of(limit: Limit) -> str:
    return RECIPIENTS if limit.count == COUNT_RECIPIENTS else MESSAGES


def shadow_fields(hit: ShadowHit) -> dict[str, object]:
    """The decision line's structured detail of a shadow verdict."""
    return {"key": hit.op.key, "window": window_text(hit.limit.window),
            "count": hit.count, "max": hit.limit.max, "amount": hit.op.amount,
            "limit_count": hit.limit.count}


def _ident(hit: ShadowHit) -> tuple[str, str, float, int]:
    return hit.op.key, hit.op.series, hit.limit.window, hit.limit.max


def window_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"
