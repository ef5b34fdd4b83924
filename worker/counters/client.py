"""How the policy engine reaches counters: one awaitable call per decision.

:class:`LocalCounters` answers from this process's own shard (one worker).
The cluster's routed client (``routing.RoutedCounters``) has the same
methods and raises :class:`CounterUnavailable` when an owner does not
answer in time. Any backend implements :class:`CounterClient`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cluster.counting import Op, Outcome
from worker.counters.shard import CounterShard

# How long an owner remembers a reservation by its id (a retried reserve
# gets the first answer, a release finds what to undo). An open reservation
# keeps its counts when its record goes: it is the message's count.
RESERVATION_TTL = 30.0


class CounterUnavailable(Exception):
    """The owner of a key could not be reached in time."""


class CounterClient(Protocol):
    async def check(self, ops: Sequence[Op]) -> Outcome:
        """Would this decision fit? Counts nothing."""

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        """Count every op if all fit, else nothing; idempotent by `rid`. The
        reservation stands as the event's count unless released."""

    async def release(self, rid: str) -> bool:
        """Undo the reservation `rid`; False if there is nothing to undo."""

    async def add(self, ops: Sequence[Op]) -> Outcome:
        """Count unconditionally; the Outcome is as `check` saw it before."""

    async def mark(self, ops: Sequence[Op]) -> None:
        """Add each op's amount (possibly negative) in the bucket of `op.at`."""

    async def reset(self, keys: Sequence[str]) -> int:
        """Forget every count of `keys` and their part of open reservations;
        how many counters (series and window) held a count."""

    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per key, rows of series, window, count, clears_at and buckets
        (`CounterShard.rows`; a backend that knows the limit adds max)."""


class LocalCounters:
    def __init__(self, shard: CounterShard) -> None:
        self.shard = shard

    async def check(self, ops: Sequence[Op]) -> Outcome:
        return self.shard.check(ops)

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        return self.shard.reserve(rid, ops, RESERVATION_TTL)

    async def release(self, rid: str) -> bool:
        return self.shard.release(rid)

    async def add(self, ops: Sequence[Op]) -> Outcome:
        return self.shard.add(ops)

    async def mark(self, ops: Sequence[Op]) -> None:
        self.shard.mark(ops)

    async def reset(self, keys: Sequence[str]) -> int:
        return self.shard.reset(keys)

    async def inspect(self, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        return {key: self.shard.rows(key) for key in keys}
