"""SPEC §3.8: the header ``From:`` and ``Sender:`` must name addresses the account may use.

Checked at the end of DATA like the envelope sender (the account's domain,
its aliases, its alternate sender); display names do not count, but every
address does: ``From: jan@kowalski.pl, boss@bank.example`` is refused for
the second one, and so is a field with no address at all. A message with
no ``From:`` gets one from the envelope sender (worker/submission.py), so
it passes. ``policy.from_alignment``: ``enforce`` refuses, ``log`` lets
the message through and says which address would have been refused,
``off`` does not look.
"""

from __future__ import annotations

import email.utils
import re

from worker import replies
from worker.client import Client
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy
from worker.policies.sender_domain import may_send_as
from worker.snapshot import Snapshot
from worker.submission import header_fields

_FIELDS = (b"from", b"sender")
# The forms nearly every message uses, with one address and nothing to interpret:
# ``addr``, ``<addr>``, ``Name <addr>``, ``"Name" <addr>``. Anything else (groups,
# comments, several addresses, quoted local parts) goes to the email package's parser.
_ATOMS = r'[^\s<>()\[\]:;@\\,."]+(?:\.[^\s<>()\[\]:;@\\,."]+)*'
_ADDRESS = rf"{_ATOMS}@{_ATOMS}"
_SIMPLE = re.compile(
    rf'\s*(?:({_ADDRESS})|(?:"[^"\\\r\n]*"\s*|[^"<>()\[\]:;@\\,]*)<({_ADDRESS})>)\s*')


def addresses_of(values: list[str]) -> list[str]:
    """Every address in header field values; display names ignored."""
    if len(values) == 1:
        simple = _SIMPLE.fullmatch(values[0])
        if simple is not None:
            return [simple.group(1) or simple.group(2)]
    return [address for _, address in email.utils.getaddresses(values)]


class HeaderSenderPolicy(Policy):
    name = "from_alignment"

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        alignment = decision.snapshot.settings.policy.from_alignment
        if alignment == "off":
            return CONTINUE
        verdict = self.check(decision.snapshot, decision.client, decision.content)
        if verdict.ok or alignment == "enforce":
            return verdict
        decision.noted["from_alignment"] = f"would refuse: {verdict.reply}"
        return CONTINUE

    def check(self, snapshot: Snapshot, client: Client, content: bytes) -> Verdict:
        """CONTINUE, or the refusal the first address not allowed gets."""
        account = client.account
        assert account is not None, "runs after AUTH"
        values = header_fields(content, _FIELDS)
        addresses = addresses_of(values)
        if values and not addresses:
            addresses = [""]  # a field with nothing in it that parses as an address
        for address in addresses:
            if not address or not may_send_as(snapshot.tenants, account, address):
                return reject(self.name, replies.SENDER_REJECTED.format(
                    sender=replies.printable(address)), f"header address <{address}>")
        return CONTINUE
