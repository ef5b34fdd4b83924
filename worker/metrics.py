"""What one worker counts for the cluster's metrics, reported every second.

The engine tells :meth:`WorkerMetrics.decision` every verdict it logs; the
counter node tells :meth:`WorkerMetrics.observe_counter` how long each
decision's counter call took and whether it crossed a socket (a call that
failed shows up as a refusal of the "counters" policy: 451 4.3.0). The
totals only grow; the coordinator sums them over the workers (see
``coordinator/metrics.py``).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from worker.policies import Action, Verdict

# Seconds. A local owner answers in microseconds, a peer over ipc in about
# half a millisecond; request_timeout (500ms by default) is the far end.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, math.inf)


class WorkerMetrics:
    def __init__(self) -> None:
        self.accepted = 0
        self.refusals: dict[str, int] = {}
        self._buckets = [0] * len(LATENCY_BOUNDS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.remote_calls = 0

    def decision(self, stage: str, verdict: Verdict) -> None:
        if verdict.action is Action.CONTINUE:
            if stage == "DATA":
                self.accepted += 1
            return
        if verdict.action is Action.SHADOW:
            return  # nothing was refused
        policy = verdict.policy or "other"
        self.refusals[policy] = self.refusals.get(policy, 0) + 1

    def observe_counter(self, seconds: float, remote: bool) -> None:
        if remote:
            self.remote_calls += 1
        self._buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def values(self, sessions_open: int, sessions_total: int) -> dict[str, Any]:
        cumulative, running = [], 0
        for count in self._buckets:
            running += count
            cumulative.append(running)
        return {
            "sessions_open": sessions_open,
            "sessions_total": sessions_total,
            "accepted": self.accepted,
            "refusals": dict(self.refusals),
            "counter_latency": {
                "le": list(LATENCY_BOUNDS),
                "buckets": cumulative,
                "sum": self.latency_sum,
                "count": self.latency_count,
                "remote": self.remote_calls,
            },
        }
