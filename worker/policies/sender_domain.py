"""SPEC §3.2: the envelope sender must belong to the authenticated account."""

from __future__ import annotations

from cluster.names import BadDomain, split_address
from worker import replies
from worker.policies import CONTINUE, Client, Verdict, reject
from worker.snapshot import Snapshot


class SenderDomainPolicy:
    name = "sender_domain"

    def check(self, snapshot: Snapshot, client: Client, sender: str) -> Verdict:
        account = client.account
        assert account is not None, "runs after AUTH"
        refusal = reject(self.name, replies.SENDER_REJECTED.format(sender=sender))
        if not sender:
            return refusal
        try:
            local, domain = split_address(sender)
        except BadDomain:
            return refusal
        if domain in snapshot.tenants.sender_domains(account):
            return CONTINUE
        alternate = account.alternate_sender
        if alternate is not None:
            # Mailbox names of the big providers are case-insensitive; a
            # client that capitalises the configured address is still it.
            alt_local, alt_domain = alternate.rsplit("@", 1)
            if domain == alt_domain and local.lower() == alt_local.lower():
                return CONTINUE
        return refusal
