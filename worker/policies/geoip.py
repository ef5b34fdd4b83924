"""SPEC §3.3: the client's country must be one the account's domain allows.

Support may allow a country for a while (``tenant allow-country --for``):
those exceptions come with the snapshot and count until their end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker import replies
from worker.client import Client
from worker.policies import CONTINUE, Verdict, reject
from worker.policies.base import Counts, Decision, Policy
from worker.snapshot import Snapshot


def client_country(snapshot: Snapshot, client: Client) -> str:
    """The client's country code, "" when unknown; looked up once per session."""
    if client.country is None:
        database = snapshot.geoip
        if database is None:
            return ""  # not remembered: a database may come with a later snapshot
        client.country = database.country(client.ip) or ""
    return client.country


class GeoipPolicy(Policy):
    name = "geoip"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        snapshot, client = decision.snapshot, decision.client
        if snapshot.geoip is None or client.trusted:
            return CONTINUE
        account = client.account
        assert account is not None, "runs after AUTH"
        country = client_country(snapshot, client)
        refusal = replies.SENDER_REJECTED.format(sender=decision.sender)
        if not country:
            if snapshot.settings.geoip.unknown == "allow":
                return CONTINUE
            return reject(self.name, refusal, "country unknown")
        allowed = snapshot.tenants.countries(account, snapshot.settings.geoip.default_countries)
        if country in allowed:
            return CONTINUE
        granted = snapshot.support.extra_countries(account.domain, self.clock())
        if country in granted:
            return CONTINUE
        return reject(self.name, refusal,
                      f"country {country} not in {','.join(sorted(allowed | granted))}")
