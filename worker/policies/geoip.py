"""SPEC §3.3: the client's country must be one the account's domain allows."""

from __future__ import annotations

from worker import replies
from worker.policies import CONTINUE, Client, Verdict, reject
from worker.snapshot import Snapshot


class GeoipPolicy:
    name = "geoip"

    def check(self, snapshot: Snapshot, client: Client, sender: str) -> Verdict:
        database = snapshot.geoip
        if database is None or client.trusted:
            return CONTINUE
        account = client.account
        assert account is not None, "runs after AUTH"
        country = database.country(client.ip)
        refusal = replies.SENDER_REJECTED.format(sender=sender)
        if country is None:
            if snapshot.settings.geoip.unknown == "allow":
                return CONTINUE
            return reject(self.name, refusal, "country unknown")
        allowed = snapshot.tenants.countries(account, snapshot.settings.geoip.default_countries)
        if country in allowed:
            return CONTINUE
        return reject(self.name, refusal, f"country {country} not in {','.join(sorted(allowed))}")
