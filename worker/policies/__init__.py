"""Policies: each a small object whose ``check`` returns a :class:`Verdict`.

Policies that need counters do not call them: they say which counter
operations they need (``ops``) and judge the counts the engine fetched for
them in one request per decision (``judge``), so the cluster can route that
one request to the counters' owners.
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
