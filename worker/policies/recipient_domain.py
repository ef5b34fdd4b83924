"""SPEC §3.5: a recipient domain must be able to receive mail (MX, else A/AAAA)."""

from __future__ import annotations

from cluster.names import BadDomain, split_address
from worker import replies
from worker.dns import DestinationStatus, DomainResolver
from worker.policies import CONTINUE, Verdict, reject, tempfail
from worker.policies.base import Counts, Decision, Policy


class RecipientDomainPolicy(Policy):
    name = "recipient_domain"

    def __init__(self, resolver: DomainResolver) -> None:
        self.resolver = resolver

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        sid = decision.client.sid
        invalid = reject(self.name, replies.INVALID_DESTINATION.format(sid=sid))
        try:
            _, domain = split_address(decision.recipient)
        except BadDomain:
            return invalid
        status = await self.resolver.destination_status(domain)
        if status is DestinationStatus.OK:
            return CONTINUE
        if status is DestinationStatus.INVALID:
            return reject(self.name, invalid.reply, domain)
        return tempfail(self.name, replies.DESTINATION_TEMPFAIL.format(sid=sid), domain)
