"""Snapshots read straight from disk, for a worker that runs without a coordinator.

Used by a single worker and by tests; it watches the tenant file and the
GeoIP database and swaps a new snapshot in when either changes, keeping
the old one when the new version is bad.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cluster.logjson import log_event
from cluster.settings import Settings
from cluster.tenants import load_tenants
from cluster.validate import ConfigError
from worker.dkim import DkimKeyring
from worker.geo import CountryDatabase, GeoDatabaseError
from worker.snapshot import Snapshot


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def load_snapshot(settings: Settings, version: int = 1,
                  previous: Snapshot | None = None) -> Snapshot:
    """Raises ConfigError for a bad tenant file or GeoIP database."""
    tenants = load_tenants(settings.tenants_file)
    geoip = None
    if settings.geoip.database is not None:
        try:
            geoip = CountryDatabase.from_path(settings.geoip.database)
        except GeoDatabaseError as exc:
            raise ConfigError(settings.path, "geoip.database", str(exc),
                              str(settings.geoip.database)) from None
    dkim = DkimKeyring.load(settings.dkim.keys_dir, tenants,
                            previous.dkim if previous is not None else None)
    return Snapshot(settings, tenants, geoip, version, dkim=dkim)


class LocalSnapshotSource:
    def __init__(self, settings: Settings, interval: float = 1.0) -> None:
        self.interval = interval
        self._snapshot = load_snapshot(settings)
        self._stamps = self._current_stamps()

    def current(self) -> Snapshot:
        return self._snapshot

    def _current_stamps(self) -> tuple[object, object]:
        settings = self._snapshot.settings
        return _stamp(settings.tenants_file), _stamp(settings.geoip.database)

    def reload(self) -> bool:
        """Re-read the files if they changed; True when a new snapshot is in force."""
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return False
        old = self._snapshot
        try:
            new = load_snapshot(old.settings, old.version + 1, old)
        except ConfigError as exc:
            self._stamps = stamps  # do not retry a bad file until it changes again
            log_event("reload_refused", logging.ERROR, error=str(exc))
            return False
        self._stamps = stamps
        self._snapshot = new
        log_event("reload", version=new.version, tenants=new.tenants.version,
                  geoip=new.geoip.version if new.geoip else None)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload()
