"""The coordinator's view of the files it owns: configuration, tenant directory, GeoIP.

Each file is validated before it can reach a worker; the result is one
versioned :class:`~cluster.wire.SnapshotMessage` (and, when only the support
state changed since version ``base``, the small
:class:`~cluster.wire.SupportSnapshot`). ``poll()`` watches the
tenant file and the GeoIP database by (mtime, size, inode), ``reload_config()``
rereads the main file on SIGHUP. A bad new version is refused and logged and
the old one stays in force (SPEC §5); a refused file is not read again until
it changes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.geoip import CountryDatabase, GeoDatabaseError
from cluster.logjson import log_event
from cluster.reload import load_for_reload, needs_restart
from cluster.settings import Settings, load_settings
from cluster.support_state import SupportState
from cluster.tenants import TenantDirectory, read_tenant_file
from cluster.validate import ConfigError
from cluster.wire import SnapshotMessage, SupportSnapshot

Stamp = tuple[int, int, int] | None

def stamp(path: Path | None) -> Stamp:
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


@dataclass(frozen=True, slots=True)
class Tenants:
    directory: TenantDirectory
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Geoip:
    blob: bytes
    version: str


def read_tenants(path: Path) -> Tenants:
    """The tenant file validated, with the plain data workers rebuild it from."""
    return Tenants(*read_tenant_file(path))


def read_geoip(settings: Settings) -> Geoip | None:
    path = settings.geoip.database
    if path is None:
        return None
    try:
        blob = path.read_bytes()
        # Opening it here refuses a truncated or foreign database before any
        # worker sees it; workers reopen the same bytes from memory.
        with CountryDatabase.from_bytes(blob) as database:
            version = database.version
    except OSError as exc:
        raise ConfigError(settings.path, "geoip.database", f"cannot be read: {exc.strerror}",
                          str(path)) from None
    except GeoDatabaseError as exc:
        raise ConfigError(settings.path, "geoip.database", str(exc), str(path)) from None
    return Geoip(blob, version)


class SnapshotSources:
    """Loads and watches the three sources; ``message`` is what workers get."""

    def __init__(self, config_path: Path, first_version: int = 1) -> None:
        self.config_path = config_path
        # Raises ConfigError: at start a bad file is fatal (exit 2).
        self.settings = load_settings(config_path)
        self.tenants = read_tenants(self.settings.tenants_file)
        self.geoip = read_geoip(self.settings)
        self._stamps = self._current_stamps()
        self.support = SupportState()
        self.version = first_version
        # The version of the last change to configuration, tenants or GeoIP: a change
        # of support alone is published as a SupportSnapshot on top of it.
        self.base = first_version
        self.message = self._build()

    def start_at(self, version: int, support: SupportState | None = None) -> None:
        """Number from ``version`` on: a restarted coordinator continues its predecessor's
        count; ``support`` is the state kept from before the restart."""
        self.version = self.base = version
        if support is not None:
            self.support = support
        self.message = self._build()

    def _current_stamps(self) -> tuple[Stamp, Stamp]:
        return stamp(self.settings.tenants_file), stamp(self.settings.geoip.database)

    def _build(self) -> SnapshotMessage:
        geoip = self.geoip
        return SnapshotMessage(
            version=self.version,
            config_path=str(self.settings.path),
            config=self.settings.raw,
            tenants=self.tenants.raw,
            tenants_version=self.tenants.directory.version,
            geoip=geoip.blob if geoip is not None else None,
            geoip_version=geoip.version if geoip is not None else "",
            support=self.support.to_wire(),
            base=self.base,
        )

    def support_message(self) -> SupportSnapshot:
        """The current version as a support change on top of ``base``."""
        return SupportSnapshot(self.version, self.base, self.message.support)

    def _publish(self, reason: str) -> None:
        self.version += 1
        if reason != "support":
            self.base = self.version
        self.message = self._build()
        log_event("snapshot", version=self.version, reason=reason,
                  tenants=self.tenants.directory.version,
                  geoip=self.geoip.version if self.geoip else None)

    def poll(self) -> bool:
        """Reread the tenant file or the GeoIP database if either changed on disk."""
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return False
        tenants_changed = stamps[0] != self._stamps[0]
        geoip_changed = stamps[1] != self._stamps[1]
        self._stamps = stamps
        changed = False
        if tenants_changed:
            changed |= self._try("tenants", self._load_tenants)
        if geoip_changed:
            changed |= self._try("geoip", self._load_geoip)
        return changed

    def _load_tenants(self) -> bool:
        tenants = read_tenants(self.settings.tenants_file)
        if tenants.directory.version == self.tenants.directory.version:
            return False  # touched, not changed
        self.tenants = tenants
        return True

    def _load_geoip(self) -> bool:
        geoip = read_geoip(self.settings)
        if (geoip and geoip.version) == (self.geoip and self.geoip.version):
            return False
        self.geoip = geoip
        return True

    def _try(self, what: str, load: Any) -> bool:
        try:
            changed = bool(load())
        except ConfigError as exc:
            log_event("reload_refused", logging.ERROR, source=what, error=str(exc))
            return False
        if changed:
            self._publish(what)
        return changed

    def reload_config(self) -> bool:
        """SIGHUP: the main file, and the files it names, all or nothing."""
        try:
            settings = load_for_reload(self.config_path)
            tenants = read_tenants(settings.tenants_file)
            geoip = read_geoip(settings)
        except ConfigError as exc:
            log_event("reload_refused", logging.ERROR, source="config", error=str(exc))
            return False
        if settings.counters != self.settings.counters:
            # Workers keep the counter store they started with, and one restarted
            # later would take the new one: two stores would each see part of the counts.
            log_event("reload_refused", logging.ERROR, source="config",
                      error=f"{self.config_path}: counters: changes only with a restart "
                            "of the gateway")
            return False
        waiting = needs_restart(self.settings, settings)
        if waiting:
            # One line for the whole reload: what is in force is everything else.
            log_event("reload_partial", logging.WARNING, keys=waiting,
                      note="these settings take effect at the next start of the cluster; "
                           "the rest of the file is in force")
        self.settings, self.tenants, self.geoip = settings, tenants, geoip
        self._stamps = self._current_stamps()
        self._publish("config")
        return True

    def set_support(self, support: SupportState) -> None:
        """Suspensions or country exceptions changed: a new version for the workers."""
        self.support = support
        self._publish("support")

    def force_tenants(self) -> bool:
        """The coordinator itself rewrote the tenant file: in force now, not at the next poll."""
        self._stamps = (stamp(self.settings.tenants_file), self._stamps[1])
        return self._try("tenants", self._load_tenants)
