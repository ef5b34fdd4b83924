"""How the policy engine reaches counters: one awaitable call per decision.

:class:`LocalCounters` answers from this process's own shard (one worker, or
keys this worker owns). The cluster's routed client has the same methods and
raises :class:`CounterUnavailable` when an owner does not answer in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cluster.counting import Op, Outcome
from worker.counters.shard import CounterShard

# An unconfirmed reservation is released after this long; the gap it covers is
# one spool write, so anything longer means the confirming worker is gone.
RESERVATION_TTL = 30.0


class CounterUnavailable(Exception):
    """The owner of a key could not be reached in time."""


class CounterClient(Protocol):
    async def check(self, ops: Sequence[Op]) -> Outcome: ...
    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome: ...
    async def confirm(self, rid: str) -> bool: ...
    async def release(self, rid: str) -> bool: ...
    async def add(self, ops: Sequence[Op]) -> Outcome: ...
    async def mark(self, ops: Sequence[Op]) -> None: ...
    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]: ...


class LocalCounters:
    def __init__(self, shard: CounterShard) -> None:
        self.shard = shard

    async def check(self, ops: Sequence[Op]) -> Outcome:
        return self.shard.check(ops)

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        return self.shard.reserve(rid, ops, RESERVATION_TTL)

    async def confirm(self, rid: str) -> bool:
        return self.shard.confirm(rid)

    async def release(self, rid: str) -> bool:
        return self.shard.release(rid)

    async def add(self, ops: Sequence[Op]) -> Outcome:
        return self.shard.add(ops)

    async def mark(self, ops: Sequence[Op]) -> None:
        self.shard.mark(ops)

    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Each key's rows: series, window, count, clears_at (``CounterShard.snapshot``)."""
        return {key: self.shard.snapshot(key) for key in keys}
