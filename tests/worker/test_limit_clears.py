"""When a full window lets the next message in, as a rate-limit refusal's decision says."""

from __future__ import annotations

from cluster.counting import Op
from worker.counters.shard import CounterShard
from worker.policies.limit_clears import fits_again_at


def test_the_oldest_counts_must_leave_until_the_message_fits() -> None:
    now = [6000.0]
    shard = CounterShard(clock=lambda: now[0])
    window = 600.0  # buckets of 10 s
    for step, amount in ((0, 2), (25, 1), (50, 3)):
        now[0] = 6000.0 + step
        shard.add([Op("acct:a@x.pl", "msg", window, None, amount)])
    [row] = shard.snapshot("acct:a@x.pl")
    assert row["count"] == 6
    # A bucket stops counting a full window after its end: 6010 + 600 ...
    assert [end for end, _ in row["buckets"]] == [6610.0, 6630.0, 6660.0]
    assert row["clears_at"] == 6610.0
    assert fits_again_at(row, limit=6, amount=1) == 6610.0     # the first two make room
    assert fits_again_at(row, limit=4, amount=1) == 6630.0     # the limit was lowered: 3 must go
    assert fits_again_at(row, limit=6, amount=4) == 6660.0     # four recipients: all 6 must go
    assert fits_again_at(row, limit=3, amount=4) is None       # never, in this window
    assert fits_again_at({"count": 1, "clears_at": 7.0}, 1, 1) == 7.0  # no buckets listed
