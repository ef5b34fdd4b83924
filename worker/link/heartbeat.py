"""The worker's report to the coordinator, every second: its heartbeat.

A report carries the worker's figures (worker/metrics.py), the connections
it holds of busy client addresses (worker/connections.py), its phase
(starting, serving, draining, drained), whether it is a ring member, its
counter endpoint, and the snapshot version and ring epoch it holds, so a
publication it missed is sent to it again. A new phase is reported at once;
an address nearing the connection cap (``near_cap``) is reported within
:data:`~worker.connections.EARLY_REPORT` instead of within the second.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from cluster import wire
from worker.connections import EARLY_REPORT
from worker.link.line import CoordinatorLine
from worker.link.rings import RingFollower
from worker.link.snapshots import SnapshotFeed

REPORT_INTERVAL = 1.0


class Heartbeat:
    def __init__(self, line: CoordinatorLine, endpoint: str, values: Callable[[], dict[str, Any]],
                 snapshots: SnapshotFeed, rings: RingFollower, near_cap: asyncio.Event) -> None:
        self._line = line
        self._endpoint = endpoint
        self._values = values
        self._snapshots = snapshots
        self._rings = rings
        self._near_cap = near_cap
        self.phase = "starting"

    async def run(self) -> None:
        """Report every second, and early when an address nears the connection cap."""
        early = asyncio.create_task(self._early_reports())
        try:
            while True:
                await self.report()
                await asyncio.sleep(REPORT_INTERVAL)
        finally:
            early.cancel()

    async def enter(self, phase: str) -> None:
        self.phase = phase
        await self.report()

    async def report(self) -> None:
        values = self._values()
        values.update(phase=self.phase, member=self._rings.member, endpoint=self._endpoint,
                      snapshot_version=self._snapshots.version, ring_epoch=self._rings.epoch)
        await self._line.send(wire.MetricsReport(self._line.name, os.getpid(), values))

    async def _early_reports(self) -> None:
        while True:
            await self._near_cap.wait()
            await asyncio.sleep(EARLY_REPORT)
            self._near_cap.clear()  # growth meanwhile is in this report
            await self.report()
