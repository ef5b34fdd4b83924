"""Snapshots to the workers: published on every new version, sent again to one that lags.

A version that changed only suspensions or country exceptions is published
as a small :class:`~cluster.wire.SupportSnapshot` on top of the last full
snapshot published; a worker that does not hold that one reports an older
version and is sent the full snapshot (which carries the current support
state too). Everything sent to one worker alone is the full snapshot.

The coordinator's last published snapshot version and ring epoch are kept
in ``coordinator.state`` under the runtime folder, so a coordinator
restarted within a running cluster continues its numbering (:func:`read_state`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import msgpack

from cluster import wire
from coordinator.outbox import Outbox
from coordinator.sources import SnapshotSources

RESEND_AFTER = 3.0       # a lagging worker gets the snapshot again at most this often
STATE_FILE = "coordinator.state"


def read_state(runtime_dir: Path) -> dict[str, int] | None:
    """What an earlier coordinator of this cluster published last, if one ran."""
    try:
        data = msgpack.unpackb((runtime_dir / STATE_FILE).read_bytes())
    except (OSError, ValueError, msgpack.UnpackException):
        return None
    if not isinstance(data, dict):
        return None
    return {k: v for k, v in data.items() if k in ("version", "epoch") and isinstance(v, int)}


def write_state(runtime_dir: Path, version: int, epoch: int) -> None:
    temp = runtime_dir / f".{STATE_FILE}.tmp"
    temp.write_bytes(msgpack.packb({"version": version, "epoch": epoch}))
    os.replace(temp, runtime_dir / STATE_FILE)


class StateFile:
    """Writes (version, epoch) when either changed since the last write."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self._written = (0, 0)

    def save(self, version: int, epoch: int) -> None:
        if (version, epoch) != self._written:
            write_state(self.runtime_dir, version, epoch)
            self._written = (version, epoch)


class SnapshotPublisher:
    def __init__(self, sources: SnapshotSources, outbox: Outbox, state: StateFile,
                 epoch: Callable[[], int]) -> None:
        self.sources = sources
        self._outbox = outbox
        self._state = state
        self._epoch = epoch
        self._frame = (0, b"")
        self._published_base = 0   # the base of the last full snapshot published
        self._resent: dict[str, float] = {}

    def frame(self) -> bytes:
        # One encoding per version: the GeoIP database may be megabytes.
        if self._frame[0] != self.sources.version:
            self._frame = (self.sources.version, wire.encode(self.sources.message))
        return self._frame[1]

    async def publish(self) -> None:
        sources = self.sources
        if sources.base == self._published_base and sources.version != sources.base:
            # Only support changed since the full snapshot workers were sent: re-encoding
            # and rebuilding a large tenant directory and GeoIP database would cost
            # every worker tens of milliseconds of its event loop per change.
            frame = wire.encode(sources.support_message())
        else:
            frame = self.frame()
            self._published_base = sources.base
        await self._outbox.publish(wire.TOPIC_SNAPSHOT, frame)
        self.persist()

    def persist(self) -> None:
        self._state.save(self.sources.version, self._epoch())

    async def send_to(self, identity: bytes) -> None:
        await self._outbox.send(identity, self.frame())

    async def catch_up(self, name: str, identity: bytes, version: object, now: float) -> None:
        """A worker whose report names an older version gets the snapshot directly."""
        if isinstance(version, int) and version < self.sources.version:
            if now - self._resent.get(name, -RESEND_AFTER) >= RESEND_AFTER:
                self._resent[name] = now
                await self.send_to(identity)

    async def tick(self, reload_config: bool) -> None:
        """SIGHUP's reread of the configuration, then the watched files."""
        if reload_config and self.sources.reload_config():
            await self.publish()
        if self.sources.poll():
            await self.publish()
