"""The immutable view a worker decides with: settings, tenants, GeoIP database, support state.

A new snapshot is swapped in by reference; a session in flight keeps using
the one it read, so a reload never tears a decision in half.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.settings import Settings
from cluster.support_state import SupportState
from cluster.tenants import TenantDirectory
from worker.dkim import EMPTY_KEYRING, DkimKeyring
from worker.geo import CountryDatabase


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    tenants: TenantDirectory
    geoip: CountryDatabase | None
    version: int = 0
    # Suspensions and time-limited country exceptions, from the coordinator.
    support: SupportState = field(default_factory=SupportState)
    dkim: DkimKeyring = field(default=EMPTY_KEYRING)  # read with the tenant directory
