"""Open connections per client address, counted across the workers of one host.

``server.max_connections_per_ip`` caps the connections one client address
(an IPv6 client by its /64) holds open on a host, whichever worker the
kernel's SO_REUSEPORT handed each one to. The cap is checked when a
connection opens, before the banner, so it must cost nothing a session
would notice, and it must never count a connection that no longer exists.

How it is counted:

- Each worker counts its own open connections per client key, exactly, in
  a dict: one increment at the banner, one decrement when the connection is
  gone. No message, no lock, no round trip on the path of a session.
- Each worker puts the keys it holds at least :data:`REPORT_FROM`
  connections of into the report it already sends the coordinator every
  second, and also every key it holds at all that another worker reported
  (a "hot" key): one connection per address, the common case, is never in
  a report, yet the count of an address that matters is complete. A report
  is the worker's whole table, not a change, so a lost report loses nothing.
- A report goes out early (after :data:`EARLY_REPORT` seconds rather than
  within the second) only when an address holds half the cap or more on
  the host: that is where a fraction of a second matters, and offices
  behind one address, which hold a few connections each, send nothing extra.
- The coordinator publishes the tables of the workers that are alive
  (``ConnectionCounts``), twice a second while any is non-empty and soon
  after one changes. A worker that exits, crashes or stops reporting leaves
  the coordinator's membership and its table goes with it: its connections
  died with it, and they are no longer counted from the next publication.
- A worker refuses a connection when its own count plus the other workers'
  published counts reach the cap (a coordinator serves the workers of one
  host only). Published counts older than :data:`STALE_AFTER` are dropped,
  so a coordinator that went away cannot freeze an address out either.

What that costs in precision: the other workers' counts are a fraction of
a second old. A burst of connections from one address opened faster than
a report travels (a report and a publication, about 0.2 s near the cap)
can exceed the cap by up to the cap on each other worker; once the reports
arrive every further connection is refused until enough have closed. A
single worker (or a worker running alone) is exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

# Keys held this many times or more are reported to the other workers.
REPORT_FROM = 2
# Other workers' counts older than this are forgotten.
STALE_AFTER = 5.0
# While a key grows, the worker reports this soon instead of within a second.
EARLY_REPORT = 0.1


class ConnectionTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._local: dict[str, int] = {}
        self._others: dict[str, int] = {}
        self._others_at = -STALE_AFTER
        self._cap = 0  # the cap last applied, for when to report early
        # Set when an address nears the cap: the worker's heartbeat
        # (worker/link/heartbeat.py) then reports early, and clears it.
        self.near_cap = asyncio.Event()

    def admit(self, key: str, cap: int) -> bool:
        """Count one more connection of ``key`` unless the host already has ``cap``."""
        held = self._local.get(key, 0)
        others = self._others.get(key, 0)
        if cap and held + others >= cap:
            return False
        self._local[key] = held + 1
        self._cap = cap
        if self._near_cap(held + 1 + others):
            self.near_cap.set()
        return True

    def _near_cap(self, total: int) -> bool:
        return bool(self._cap) and total >= max(REPORT_FROM, self._cap // 2)

    def release(self, key: str) -> None:
        held = self._local.get(key, 0)
        if held <= 1:
            self._local.pop(key, None)
        else:
            self._local[key] = held - 1

    def held(self, key: str) -> int:
        """This worker's connections of ``key``."""
        return self._local.get(key, 0)

    def others(self, key: str) -> int:
        """The other workers' connections of ``key``, as last published."""
        return self._others.get(key, 0)

    def report(self) -> dict[str, int]:
        """Keys held :data:`REPORT_FROM` times or more, and hot keys held at all."""
        others = self._others
        return {key: held for key, held in self._local.items()
                if held >= REPORT_FROM or key in others}

    def update(self, tables: Mapping[str, Mapping[str, int]], me: str) -> None:
        """A publication: every live worker's reported table, by worker name."""
        others: dict[str, int] = {}
        for worker, table in tables.items():
            if worker == me:
                continue
            for key, held in table.items():
                others[key] = others.get(key, 0) + held
        near = any(key not in self._others and self._near_cap(self._local.get(key, 0) + held)
                   for key, held in others.items() if key in self._local)
        self._others = others
        self._others_at = self._clock()
        if near:
            self.near_cap.set()  # our connections of an address near the cap count now

    def expire(self) -> None:
        if self._others and self._clock() - self._others_at > STALE_AFTER:
            self._others = {}
