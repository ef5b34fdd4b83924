"""Rate and abuse counters kept in memory by the owner of each key."""

from __future__ import annotations

from worker.counters.shard import CounterShard
from worker.counters.window import SLOTS, TrailingWindow

__all__ = ["SLOTS", "CounterShard", "TrailingWindow"]
