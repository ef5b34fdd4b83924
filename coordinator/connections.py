"""The open-connection tables of the live workers, republished to every worker.

Each worker reports the client keys it holds several connections of in its
``MetricsReport`` (``values["connections"]``, its whole table each time).
The coordinator keeps nothing of its own: it reads the tables from the
reports of the workers its membership knows, so the table of a worker that
exited, crashed or went silent disappears with it, and publishes them as one
``ConnectionCounts``. Workers add up the other workers of their host
(worker/connections.py explains the whole design).

Published on every tick while any table is non-empty, once more when the
last one empties (so workers forget sooner than their staleness limit), and
soon after a report changes a table, so a growing key travels in a fraction
of a second rather than on the next tick.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coordinator.membership import Worker

# After a table changes, publish this soon (and no sooner, to batch bursts).
SOON = 0.05


def table_of(report: dict[str, Any]) -> dict[str, int]:
    """A worker's reported table, with anything malformed left out."""
    raw = report.get("connections")
    if not isinstance(raw, dict):
        return {}
    return {key: held for key, held in raw.items()
            if isinstance(key, str) and isinstance(held, int) and not isinstance(held, bool)
            and held > 0}


class ConnectionBoard:
    def __init__(self) -> None:
        self._published: dict[str, dict[str, int]] = {}

    @staticmethod
    def collect(workers: Iterable[Worker]) -> dict[str, dict[str, int]]:
        tables = {}
        for worker in workers:
            table = table_of(worker.report)
            if table:
                tables[worker.name] = table
        return tables

    def due(self, tables: dict[str, dict[str, int]]) -> bool:
        """Whether ``tables`` should go out on a tick."""
        return bool(tables) or bool(self._published)

    def changed(self, tables: dict[str, dict[str, int]]) -> bool:
        return tables != self._published

    def published(self, tables: dict[str, dict[str, int]]) -> None:
        self._published = tables
