"""SPEC §3.2: the envelope sender must belong to the authenticated account."""

from __future__ import annotations

from cluster.names import BadDomain, split_address
from cluster.tenants import Account, TenantDirectory
from worker import replies
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy


def may_send_as(tenants: TenantDirectory, account: Account, address: str) -> bool:
    """The account's domain or one of its aliases (any case), or its alternate sender."""
    try:
        local, domain = split_address(address)
    except BadDomain:
        return False
    if domain in tenants.sender_domains(account):
        return True
    alternate = account.alternate_sender
    if alternate is not None:
        # Mailbox names of the big providers are case-insensitive; a
        # client that capitalises the configured address is still it.
        alt_local, alt_domain = alternate.rsplit("@", 1)
        if domain == alt_domain and local.lower() == alt_local.lower():
            return True
    return False


class SenderDomainPolicy(Policy):
    name = "sender_domain"

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        account = decision.client.account
        assert account is not None, "runs after AUTH"
        sender = decision.sender
        if sender and may_send_as(decision.snapshot.tenants, account, sender):
            return CONTINUE
        return reject(self.name, replies.SENDER_REJECTED.format(sender=sender))
