"""Which policies decide at each stage of a session, in the order they are judged.

MAIL follows SPEC §3's order (a declared ``SIZE=`` over the limit and a
MAIL before AUTH are refused by the protocol before these run, see
worker/smtp.py): the login's re-check, suspension, sender domain, GeoIP,
then the counter policies, bounce ratio and rate limits, which share one
counter request. The end of DATA: the header sender, the content scan,
then the message's reservation: spam grace, rate limits and the bounce
ratio's "accepted" count (SPEC §2). AUTH is worker/authentication.py, with
the throttle's policy.

Adding a policy: its module in worker/policies/ (see base.py), and its
place in a list below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.counters.client import CounterClient
from worker.dns import DomainResolver
from worker.policies.base import Policy
from worker.policies.bounce_ratio import BounceRatioPolicy
from worker.policies.geoip import GeoipPolicy
from worker.policies.header_sender import HeaderSenderPolicy
from worker.policies.limit_clears import LimitClears
from worker.policies.login_recheck import LoginRecheckPolicy
from worker.policies.max_recipients import MaxRecipientsPolicy
from worker.policies.rate_limit import RateLimitPolicy
from worker.policies.recipient_domain import RecipientDomainPolicy
from worker.policies.sender_domain import SenderDomainPolicy
from worker.policies.spam_grace import SpamGracePolicy
from worker.policies.spam_scan import SpamScanPolicy
from worker.policies.suspension import SuspensionPolicy
from worker.spam import SpamScanner


@dataclass(frozen=True, slots=True)
class Stages:
    mail: tuple[Policy, ...]
    rcpt: tuple[Policy, ...]
    data: tuple[Policy, ...]


def stages(counters: CounterClient, resolver: DomainResolver,
           scanner: Callable[[], SpamScanner], clock: Callable[[], float] = time.time) -> Stages:
    rate_limit = RateLimitPolicy(LimitClears(counters, clock))
    bounce_ratio = BounceRatioPolicy()
    return Stages(
        mail=(LoginRecheckPolicy(), SuspensionPolicy(clock), SenderDomainPolicy(),
              GeoipPolicy(clock), bounce_ratio, rate_limit),
        rcpt=(MaxRecipientsPolicy(), RecipientDomainPolicy(resolver)),
        data=(HeaderSenderPolicy(), SpamScanPolicy(scanner), SpamGracePolicy(), rate_limit,
              bounce_ratio),
    )
