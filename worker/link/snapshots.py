"""Configuration snapshots from the coordinator: the first one to start with, then each newer.

Every snapshot is complete, so a newer one simply replaces what is held (a
skipped version needs nothing else), and the worker's report names the
version it holds: the coordinator sends one that was missed (a
subscription not yet joined, a full queue) directly.

A version that changed only suspensions and country exceptions arrives as a
``SupportSnapshot``: the whole support state, on top of the full snapshot
``base``. It is applied only to a snapshot built from that very ``base``, so
support state never meets tenants of another version; otherwise it is
ignored, the report names the older version, and the full snapshot comes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from cluster import wire
from cluster.geoip import CountryDatabase, GeoDatabaseError
from cluster.logjson import log_event
from cluster.settings import parse_settings
from cluster.support_state import SupportState
from cluster.tenants import parse_tenants
from cluster.validate import ConfigError
from worker.dkim import DkimKeyring
from worker.link.line import CoordinatorLine
from worker.snapshot import Snapshot

# How long to wait for the coordinator's answer before asking again (it may still be starting).
ASK_AGAIN_AFTER = 5.0


def build_snapshot(message: wire.SnapshotMessage, previous: Snapshot | None) -> Snapshot:
    """Raises ConfigError when the snapshot cannot be used (it was validated upstream).

    What did not change is taken from ``previous`` as it is: a new version may
    only carry a suspension, and a large tenant directory costs a noticeable
    time to parse again."""
    if (previous is not None and str(previous.settings.path) == message.config_path
            and previous.settings.raw == message.config):
        settings = previous.settings
    else:
        settings = parse_settings(Path(message.config_path), message.config)
    if (previous is not None and message.tenants_version
            and previous.tenants.version == message.tenants_version
            and previous.settings.tenants_file == settings.tenants_file):
        tenants = previous.tenants
    else:
        tenants = parse_tenants(settings.tenants_file, message.tenants,
                                version=message.tenants_version)
    try:
        support = SupportState.from_wire(message.support or {})
    except ValueError as exc:
        raise ConfigError(settings.path, "cluster.state_dir", f"bad support state: {exc}",
                          show_value=False) from None
    geoip = None
    if message.geoip is not None:
        old = previous.geoip if previous is not None else None
        if old is not None and old.version == message.geoip_version:
            geoip = old  # a tenant change: no need to map the database again
        else:
            try:
                geoip = CountryDatabase.from_bytes(message.geoip, message.geoip_version)
            except GeoDatabaseError as exc:
                raise ConfigError(settings.path, "geoip.database", str(exc),
                                  show_value=False) from None
    dkim = DkimKeyring.load(settings.dkim.keys_dir, tenants,
                            previous.dkim if previous is not None else None)
    return Snapshot(settings, tenants, geoip, message.version, support, dkim=dkim)


class SnapshotFeed:
    """The snapshot in force; :meth:`current` is what the engine reads per decision."""

    def __init__(self, line: CoordinatorLine) -> None:
        self._line = line
        self._snapshot: Snapshot | None = None
        self._base = 0  # the full snapshot's version its settings, tenants and GeoIP are from

    @property
    def version(self) -> int:
        return self._snapshot.version if self._snapshot is not None else 0

    def current(self) -> Snapshot:
        assert self._snapshot is not None, "the worker is built from its first snapshot"
        return self._snapshot

    async def first(self) -> tuple[Snapshot, list[wire.Message]]:
        """The first snapshot, asked for until the coordinator answers, and whatever
        else arrived meanwhile (for the parts built from it). Raises ConfigError
        when it cannot be used: the worker cannot start."""
        held: list[wire.Message] = []
        while self._snapshot is None:
            await self._line.send(wire.SnapshotRequest(self._line.name))
            try:
                async with asyncio.timeout(ASK_AGAIN_AFTER):
                    while self._snapshot is None:
                        message = await self._line.receive()
                        if isinstance(message, wire.SnapshotMessage):
                            self._snapshot = build_snapshot(message, None)
                            self._base = message.base or message.version
                        else:
                            held.append(message)
            except TimeoutError:
                log_event("waiting_for_coordinator", logging.WARNING, worker=self._line.name)
        return self._snapshot, held

    def offer(self, message: wire.SnapshotMessage | wire.SupportSnapshot) -> None:
        """A newer snapshot replaces the one in force; a bad one is refused and logged."""
        old = self.current()
        if message.version <= old.version:
            return
        if isinstance(message, wire.SupportSnapshot):
            self._offer_support(message, old)
            return
        try:
            snapshot = build_snapshot(message, old)
        except ConfigError as exc:
            log_event("snapshot_refused", logging.ERROR, version=message.version, error=str(exc))
            return
        self._snapshot, self._base = snapshot, message.base or message.version
        log_event("snapshot", version=snapshot.version, base=self._base,
                  tenants=snapshot.tenants.version,
                  geoip=snapshot.geoip.version if snapshot.geoip else None)

    def _offer_support(self, message: wire.SupportSnapshot, old: Snapshot) -> None:
        if message.base != self._base:
            # Built on a full snapshot this worker missed: the next report names the
            # older version and the coordinator sends the full current one.
            log_event("snapshot_skipped", version=message.version, base=message.base,
                      held=old.version, held_base=self._base)
            return
        try:
            support = SupportState.from_wire(message.support)
        except ValueError as exc:
            log_event("snapshot_refused", logging.ERROR, version=message.version,
                      error=f"bad support state: {exc}")
            return
        # Settings, tenants, GeoIP and DKIM keys are those of ``base``, held as they are.
        self._snapshot = dataclasses.replace(old, version=message.version, support=support)
        log_event("snapshot", version=message.version, base=self._base, support_only=True)
