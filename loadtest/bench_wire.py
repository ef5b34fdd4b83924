"""What encoding and decoding one ZeroMQ message costs (cluster/wire.py), per message type.

    .venv/bin/python -m loadtest.bench_wire [--count N] [--runs R]

Encodes and decodes, ``--count`` times each, the messages the hot path and
the heartbeat carry: a counter request of one decision (three ops), its
reply, a worker's metrics report, and an admin request and reply.
Prints microseconds per encode and per decode (checked against the
message's field types), the best of ``--runs`` runs. Pure CPU, one process.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from cluster import wire
from cluster.admin_wire import InspectSubjectRequest, ResetCountersReply
from cluster.counting import Op, Outcome

SAMPLES: dict[str, wire.Message] = {
    # As the counter path frames them: one item per request, plain lists (wire.R_*, wire.A_*).
    "counter request, 3 ops": wire.CounterRequest([[
        "r1f3", 7, "reserve", "res-0001",
        [Op("ip:192.0.2.10", "msg", 60.0, 100).to_wire(),
         Op("ip:192.0.2.10", "msg", 3600.0, 1000).to_wire(),
         Op("acct:jan@kowalski.pl", "msg", 3600.0, 500).to_wire()], None]]),
    "counter reply": wire.CounterReply([[
        "r1f3", "ok", 7, Outcome(True, (3, 40, 12), None).to_wire(), "", None]]),
    "metrics report": wire.MetricsReport("w0", 4242, {
        "sessions_open": 12, "sessions_total": 90210, "accepted": 81234, "phase": "serving",
        "snapshot_version": 14, "ring_epoch": 3, "member": True, "endpoint": "ipc:///run/w0",
        "refusals": {"rate": 12, "geoip": 3}, "latency": {"count": 5, "sum": 0.2}}),
}


def per_call(work: Callable[[], object], count: int, runs: int) -> float:
    """Microseconds per call, the best of ``runs``."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(count):
            work()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def add_samples(samples: dict[str, wire.Message]) -> None:
    """An admin request and reply (cluster/admin_wire.py)."""
    samples["admin request (inspect)"] = InspectSubjectRequest("account", "jan@kowalski.pl")
    samples["admin reply (reset)"] = ResetCountersReply(["acct:jan@kowalski.pl"], 3,
                                                        ["w0", "w1"], "w0")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_wire")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    samples = dict(SAMPLES)
    add_samples(samples)
    print(f"{'message':28} {'encode µs':>10} {'decode µs':>10}")
    for name, message in samples.items():
        frame = wire.encode(message)
        assert wire.decode(frame) == message, name
        encode = per_call(partial(wire.encode, message), args.count, args.runs)
        decode = per_call(partial(wire.decode, frame), args.count, args.runs)
        print(f"{name:28} {encode:10.2f} {decode:10.2f}")


if __name__ == "__main__":
    main()
