"""The policies' vocabulary: a :class:`Verdict` and what they know of a :class:`Client`.

Each policy is a module of this package with one class (its interface is
in base.py); worker/stages.py lists them by stage, in SPEC order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.tenants import Account


class Action(enum.Enum):
    CONTINUE = "continue"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    SHADOW = "shadow"  # logged only: what a shadow limit would have done (SPEC §3.12)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reply: str = ""
    policy: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.action is Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)


def reject(policy: str, reply: str, detail: str = "") -> Verdict:
    return Verdict(Action.REJECT, reply, policy, detail)


def tempfail(policy: str, reply: str, detail: str = "") -> Verdict:
    return Verdict(Action.TEMPFAIL, reply, policy, detail)


@dataclass(slots=True)
class Client:
    """What the policies know of one SMTP connection; lives as long as it."""

    sid: str
    ip: str
    key: str
    trusted: bool
    tls: bool = False
    helo: str = ""
    account: Account | None = None
    # Looked up once per session when first needed: None not yet, "" not in the database.
    country: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
