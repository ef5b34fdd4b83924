"""Cluster-wide metrics: the sum of the workers' reports, served as Prometheus text.

Each worker reports its totals since it started, every second. A worker
that is replaced (new process, same name) or retired leaves its last totals
in ``retired``, so the cluster's counters never go backwards when a process
restarts. The aggregate is rebuilt on the coordinator's event loop and read
by the HTTP thread as one immutable object, never as dicts being changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


@dataclass(frozen=True, slots=True)
class Totals:
    sessions_open: int = 0
    sessions_total: int = 0
    accepted: int = 0
    refusals: Mapping[str, int] = field(default_factory=dict)
    latency_bounds: tuple[float, ...] = ()
    latency_buckets: tuple[int, ...] = ()
    latency_sum: float = 0.0
    latency_count: int = 0
    remote_calls: int = 0


def _int(values: Mapping[str, Any], name: str) -> int:
    value = values.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def add(total: Totals, values: Mapping[str, Any], *, with_gauges: bool = True) -> Totals:
    """``total`` plus one worker's report (malformed parts are skipped, not trusted)."""
    refusals = dict(total.refusals)
    raw_refusals = values.get("refusals")
    if isinstance(raw_refusals, dict):
        for policy, count in raw_refusals.items():
            if isinstance(policy, str) and isinstance(count, int):
                refusals[policy] = refusals.get(policy, 0) + count
    bounds, buckets = total.latency_bounds, total.latency_buckets
    latency_sum, latency_count = total.latency_sum, total.latency_count
    remote = total.remote_calls
    latency = values.get("counter_latency")
    if isinstance(latency, dict):
        their_bounds = tuple(float(b) for b in latency.get("le", ()))
        their_buckets = tuple(int(n) for n in latency.get("buckets", ()))
        if len(their_bounds) == len(their_buckets):
            if not bounds:
                bounds, buckets = their_bounds, (0,) * len(their_bounds)
            if their_bounds == bounds:
                buckets = tuple(a + b for a, b in zip(buckets, their_buckets, strict=True))
                latency_sum += float(latency.get("sum", 0.0))
                latency_count += int(latency.get("count", 0))
        remote += _int(latency, "remote")
    return Totals(
        sessions_open=total.sessions_open + (_int(values, "sessions_open") if with_gauges else 0),
        sessions_total=total.sessions_total + _int(values, "sessions_total"),
        accepted=total.accepted + _int(values, "accepted"),
        refusals=refusals,
        latency_bounds=bounds,
        latency_buckets=buckets,
        latency_sum=latency_sum,
        latency_count=latency_count,
        remote_calls=remote,
    )


@dataclass(frozen=True, slots=True)
class CompromiseCounts:
    """Compromise detection, counted by the coordinator itself (it makes the suspensions)."""

    suspensions: Mapping[str, int] = field(default_factory=dict)    # by signal
    notifications: Mapping[str, int] = field(default_factory=dict)  # delivered|retried|failed
    watched: int = 0                                                # accounts with evidence


@dataclass(frozen=True, slots=True)
class ClusterView:
    totals: Totals = Totals()
    config_version: int = 0
    ring_epoch: int = 0
    ring_members: int = 0
    workers: int = 0


class MetricsBook:
    """Latest report per worker process plus what finished processes left behind."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, dict[str, Any]]] = {}
        self._retired = Totals()
        self.view = ClusterView()
        self.compromise = CompromiseCounts()  # replaced whole, read by the HTTP thread

    def report(self, name: str, pid: int, values: dict[str, Any]) -> None:
        previous = self._latest.get(name)
        if previous is not None and previous[0] != pid:
            self.retire(name)
        self._latest[name] = (pid, values)

    def retire(self, name: str) -> None:
        previous = self._latest.pop(name, None)
        if previous is not None:
            self._retired = add(self._retired, previous[1], with_gauges=False)

    def count_suspension(self, signal: str) -> None:
        counts = self.compromise
        suspensions = {**counts.suspensions, signal: counts.suspensions.get(signal, 0) + 1}
        self.compromise = CompromiseCounts(suspensions, counts.notifications, counts.watched)

    def count_notification(self, result: str) -> None:
        counts = self.compromise
        notifications = {**counts.notifications,
                         result: counts.notifications.get(result, 0) + 1}
        self.compromise = CompromiseCounts(counts.suspensions, notifications, counts.watched)

    def set_watched(self, accounts: int) -> None:
        counts = self.compromise
        if counts.watched != accounts:
            self.compromise = CompromiseCounts(counts.suspensions, counts.notifications,
                                               accounts)

    def refresh(self, config_version: int, ring_epoch: int, ring_members: int) -> None:
        total = self._retired
        for _, values in self._latest.values():
            total = add(total, values)
        self.view = ClusterView(total, config_version, ring_epoch, ring_members,
                                len(self._latest))


class ClusterCollector:
    """A prometheus-client collector over ``book.view``."""

    def __init__(self, book: MetricsBook) -> None:
        self.book = book

    def collect(self) -> Iterator[Metric]:
        view = self.book.view
        totals = view.totals
        yield GaugeMetricFamily("sendguard_sessions_open", "SMTP sessions open now",
                                value=totals.sessions_open)
        yield CounterMetricFamily("sendguard_sessions", "SMTP sessions accepted",
                                  value=totals.sessions_total)
        yield CounterMetricFamily("sendguard_messages_accepted",
                                  "Messages accepted and queued (250)", value=totals.accepted)
        refusals = CounterMetricFamily("sendguard_refusals", "Refusals by policy",
                                       labels=["policy"])
        for policy, count in sorted(totals.refusals.items()):
            refusals.add_metric([policy], count)
        yield refusals
        buckets = [(_le(bound), count) for bound, count
                   in zip(totals.latency_bounds, totals.latency_buckets, strict=True)]
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", totals.latency_count))
        yield HistogramMetricFamily("sendguard_counter_request_seconds",
                                    "Time for a counter owner to answer one decision",
                                    buckets=buckets, sum_value=totals.latency_sum)
        yield CounterMetricFamily("sendguard_counter_requests_remote",
                                  "Counter calls that asked another worker",
                                  value=totals.remote_calls)
        compromise = self.book.compromise
        suspensions = CounterMetricFamily("sendguard_compromise_suspensions",
                                          "Accounts suspended as compromised, by signal",
                                          labels=["signal"])
        for signal in ("countries", "spam"):
            suspensions.add_metric([signal], compromise.suspensions.get(signal, 0))
        yield suspensions
        notifications = CounterMetricFamily("sendguard_compromise_notifications",
                                            "POSTs to compromise.notify_url, by result",
                                            labels=["result"])
        for result in ("delivered", "retried", "failed"):
            notifications.add_metric([result], compromise.notifications.get(result, 0))
        yield notifications
        yield GaugeMetricFamily("sendguard_compromise_accounts_watched",
                                "Accounts with compromise evidence in the window",
                                value=compromise.watched)
        yield GaugeMetricFamily("sendguard_config_version", "Snapshot version in force",
                                value=view.config_version)
        yield GaugeMetricFamily("sendguard_ring_epoch", "Ring membership epoch",
                                value=view.ring_epoch)
        yield GaugeMetricFamily("sendguard_ring_members", "Workers in the ring",
                                value=view.ring_members)
        yield GaugeMetricFamily("sendguard_workers_reporting", "Workers reporting metrics",
                                value=view.workers)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def serve_metrics(book: MetricsBook, host: str, port: int) -> Any:
    """Start the HTTP endpoint in a thread of this process; returns the server (``shutdown()``)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(book))  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
