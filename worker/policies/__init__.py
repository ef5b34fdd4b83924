"""The policies' vocabulary: the :class:`Verdict` every decision comes to.

Each policy is a module of this package with one class (its interface is
in base.py); worker/stages.py lists them by stage, in SPEC order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
