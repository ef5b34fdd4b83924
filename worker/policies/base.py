"""What every policy is: the counter ops it needs, and a judgement of their counts.

A policy states the counter operations it needs for a decision (``ops``;
none for a policy that needs no counter) and judges the decision, with the
counts those ops were answered with, into a :class:`~worker.policies.Verdict`
(``judge``). The engine (worker/engine.py) runs a stage's policies in
their order: each policy that needs no counter is judged as it comes; at
the first that does, the ops of that policy and of every policy after it
go to the counters in one request (a ``check`` at MAIL, the message's
reservation at the end of DATA), and each is judged on its share of the
answer. The first verdict that is not CONTINUE is the decision's.

A policy reads the :class:`Decision` and may leave in it what the decision
line should say (``found``), what only the line of an accepted message
should say (``noted``), and the ``shadow`` verdicts of what it would have
refused (logged when the decision goes through). ``judge`` is a coroutine
so that a policy may look something up (DNS, a scanner, a counter's rows);
most return at once.

Adding a policy: a module here with a class that has a ``name`` (the
``policy`` of its decision lines and of the refusals metric), ``ops`` and
``judge``, listed in its stage in worker/stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol

from cluster.counting import Op
from worker.client import Client
from worker.policies import Verdict
from worker.snapshot import Snapshot
from worker.spam import ScanResult


class Counts(NamedTuple):
    """A policy's share of the counters' answer."""

    ops: Sequence[Op]
    # Each op's count before this decision.
    values: Sequence[int]
    # The index in ``ops`` of the first op that did not fit (the owner's refusal
    # of a reservation, or the check's), if any.
    denied: int | None = None

    def full(self) -> tuple[Op, int] | None:
        """The op that did not fit and its count."""
        if self.denied is None:
            return None
        return self.ops[self.denied], self.values[self.denied]


NO_COUNTS = Counts((), (), None)


@dataclass(slots=True)
class Decision:
    """One decision as the policies see it: which session, at which stage, about what."""

    snapshot: Snapshot
    client: Client
    stage: str  # MAIL, RCPT or DATA (AUTH for the throttle)
    sender: str = ""  # the envelope sender ("" for <>), at MAIL and DATA
    recipient: str = ""  # RCPT
    accepted: int = 0  # RCPT: recipients the transaction already has
    rcpt_tos: tuple[str, ...] = ()  # DATA: the accepted recipients
    content: bytes = b""  # DATA: the message, with the headers the gateway adds
    scan: ScanResult | None = None  # DATA: the content scan's result, once scanned
    skipped: str = ""  # DATA: why there was no scan
    found: dict[str, object] = field(default_factory=dict)
    noted: dict[str, object] = field(default_factory=dict)
    shadows: list[tuple[Verdict, dict[str, object]]] = field(default_factory=list)


class Policy(Protocol):
    name: ClassVar[str]

    def ops(self, decision: Decision) -> Sequence[Op]:
        """The counter ops this decision needs from this policy; none by default."""
        return ()

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        """CONTINUE, or the refusal; ``counts`` answers :meth:`ops` (:data:`NO_COUNTS`)."""
        ...
