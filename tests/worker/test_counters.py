from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from cluster.counting import Op, Outcome, check_wire_ops
from worker.counters import SLOTS, CounterShard, TrailingWindow
from worker.counters.shard import OPEN, RELEASED

# A multiple of every bucket width used below (1 s, 5 s, 60 s, 720 s), so
# that bucket boundaries in the assertions are easy to read.
T0 = 1_000_080.0

MINUTE, HOUR, HALF_DAY = 60.0, 3600.0, 43200.0
DEFAULT_LIMITS = ((MINUTE, 250), (HOUR, 1000), (HALF_DAY, 10000))


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def msg_ops(key: str, limits=DEFAULT_LIMITS, amount: int = 1) -> list[Op]:
    return [Op(key, "msg", window, limit, amount) for window, limit in limits]


def count(shard: CounterShard, key: str, series: str, window: float) -> int:
    for row in shard.snapshot(key):
        if row["series"] == series and row["window"] == window:
            return row["count"]
    return 0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shard(clock: Clock) -> CounterShard:
    return CounterShard(clock=clock)


# -- limits -----------------------------------------------------------------


def test_reserves_admit_exactly_the_limit(shard: CounterShard, clock: Clock) -> None:
    admitted = 0
    for i in range(400):
        clock.advance(0.1)  # crosses bucket boundaries along the way
        outcome = shard.reserve(f"r{i}", msg_ops("ip:127.0.0.5"))
        if outcome.ok:
            admitted += 1
        else:
            assert outcome.denied == 0
            assert outcome.counts == (250, 250, 250)
    assert admitted == 250
    assert count(shard, "ip:127.0.0.5", "msg", MINUTE) == 250


def test_open_reservations_count_against_the_limit(shard: CounterShard) -> None:
    # Racing sessions all reserve before any of them confirms.
    outcomes = [shard.reserve(f"r{i}", msg_ops("acct:jan@kowalski.pl")) for i in range(300)]
    assert sum(o.ok for o in outcomes) == 250


def test_longer_window_binds_once_the_short_one_slides(shard: CounterShard, clock: Clock) -> None:
    limits = ((MINUTE, 5), (HOUR, 8))
    for _ in range(5):
        assert shard.add(msg_ops("ip:a", limits)).ok
    assert shard.check(msg_ops("ip:a", limits)) == Outcome(False, (5, 5), 0)
    clock.advance(61)
    for _ in range(3):
        assert shard.add(msg_ops("ip:a", limits)).ok
    assert shard.check(msg_ops("ip:a", limits)) == Outcome(False, (3, 8), 1)


def test_multi_op_reserve_is_all_or_nothing(shard: CounterShard) -> None:
    shard.add([Op("acct:jan@kowalski.pl", "msg", MINUTE, None, 3)])
    ops = [Op("ip:127.0.0.5", "msg", MINUTE, 10), Op("acct:jan@kowalski.pl", "msg", MINUTE, 3)]
    outcome = shard.reserve("r1", ops)
    assert outcome == Outcome(False, (0, 3), 1)
    assert count(shard, "ip:127.0.0.5", "msg", MINUTE) == 0
    assert count(shard, "acct:jan@kowalski.pl", "msg", MINUTE) == 3
    assert not shard.release("r1")


def test_same_counter_twice_in_one_decision_must_fit_together(shard: CounterShard) -> None:
    shard.add([Op("ip:a", "msg", MINUTE, None, 4)])
    op = Op("ip:a", "msg", MINUTE, 5)
    assert shard.check([op]).ok
    assert shard.reserve("r1", [op, op]) == Outcome(False, (4, 4), 1)
    assert count(shard, "ip:a", "msg", MINUTE) == 4


def test_add_counts_unconditionally_and_reports_counts_before(shard: CounterShard) -> None:
    fail = [Op("auth-fail:127.0.0.5", "fail", 300.0, 2)]
    assert shard.add(fail) == Outcome(True, (0,), None)
    assert shard.add(fail) == Outcome(True, (1,), None)
    assert shard.add(fail) == Outcome(False, (2,), 0)
    assert count(shard, "auth-fail:127.0.0.5", "fail", 300.0) == 3


def test_check_counts_nothing_and_creates_no_key(shard: CounterShard) -> None:
    assert shard.check(msg_ops("ip:a")) == Outcome(True, (0, 0, 0), None)
    assert len(shard) == 0
    assert list(shard.keys()) == []


def test_negative_amount_is_refused_outside_mark(shard: CounterShard) -> None:
    with pytest.raises(ValueError, match="negative amount"):
        shard.reserve("r1", [Op("ip:a", "msg", MINUTE, 5, -1)])
    with pytest.raises(ValueError, match="negative amount"):
        shard.add([Op("ip:a", "msg", MINUTE, None, -1)])


# -- reservations -----------------------------------------------------------


def test_reserve_is_idempotent_on_rid(shard: CounterShard) -> None:
    first = shard.reserve("r1", msg_ops("ip:a"))
    assert shard.reserve("r1", msg_ops("ip:a")) is first
    assert count(shard, "ip:a", "msg", MINUTE) == 1
    # A late duplicate after a release still gets the first answer, and
    # counts nothing again.
    assert shard.release("r1")
    assert shard.reserve("r1", msg_ops("ip:a")) is first
    assert count(shard, "ip:a", "msg", MINUTE) == 0


def test_denied_reserve_is_idempotent_too(shard: CounterShard) -> None:
    op = Op("ip:a", "msg", MINUTE, 1)
    assert shard.reserve("r1", [op]).ok
    denied = shard.reserve("r2", [op])
    assert not denied.ok
    assert shard.release("r1")
    assert shard.reserve("r2", [op]) is denied
    assert count(shard, "ip:a", "msg", MINUTE) == 0


def test_release_restores_exactly(shard: CounterShard, clock: Clock) -> None:
    shard.add(msg_ops("ip:a"))
    clock.advance(30)  # the reservation lands in a later bucket
    ops = msg_ops("ip:a") + msg_ops("acct:jan@kowalski.pl")
    assert shard.reserve("r1", ops) == Outcome(True, (1, 1, 1, 0, 0, 0), None)
    clock.advance(10)
    assert shard.release("r1")
    assert shard.release("r1")  # a retry subtracts nothing more
    assert [r["count"] for r in shard.snapshot("ip:a")] == [1, 1, 1]
    assert shard.snapshot("acct:jan@kowalski.pl") == []  # no count left: no row


def test_a_reservation_is_the_count_when_its_record_goes(shard: CounterShard,
                                                        clock: Clock) -> None:
    shard.reserve("r1", msg_ops("ip:a"))
    clock.advance(121)
    assert shard.expire() == 1  # the record goes, the count stays
    assert count(shard, "ip:a", "msg", HOUR) == 1


def test_unknown_rid(shard: CounterShard) -> None:
    assert not shard.release("nope")


def test_unconfirmed_reservation_keeps_its_count_when_it_expires(
    shard: CounterShard, clock: Clock
) -> None:
    # An open reservation may belong to a message that was acknowledged by a
    # worker that died before confirming: it goes on counting.
    shard.reserve("r1", msg_ops("ip:a"), ttl=10)
    clock.advance(9.9)
    assert shard.expire() == 0
    clock.advance(0.1)
    assert shard.expire() == 1
    assert count(shard, "ip:a", "msg", MINUTE) == 1
    assert not shard.release("r1")  # too late to undo
    assert count(shard, "ip:a", "msg", MINUTE) == 1


def test_expired_reservation_frees_its_id_without_expire_call(
    shard: CounterShard, clock: Clock
) -> None:
    shard.reserve("r1", msg_ops("ip:a"), ttl=10)
    clock.advance(11)
    assert not shard.release("r1")
    assert count(shard, "ip:a", "msg", MINUTE) == 1
    # After expiry the rid is free again: a new reserve counts anew.
    assert shard.reserve("r1", msg_ops("ip:a")).ok
    assert count(shard, "ip:a", "msg", MINUTE) == 2


def test_expired_reservations_are_dropped_by_other_calls(
    shard: CounterShard, clock: Clock
) -> None:
    for i in range(5):
        shard.reserve(f"r{i}", msg_ops("ip:a"), ttl=10)
    clock.advance(11)
    assert shard.check(msg_ops("ip:a")).counts == (5, 5, 5)
    assert not any(shard.release(f"r{i}") for i in range(5))
    assert shard.check(msg_ops("ip:a")).counts == (5, 5, 5)


# -- windows ----------------------------------------------------------------


@pytest.mark.parametrize("window", [1.0, 60.0, 300.0, 3600.0, 43200.0, 86400.0 * 7])
def test_bucket_width_is_at_most_a_sixtieth(window: float) -> None:
    assert TrailingWindow(window).width <= window / 60
    assert SLOTS >= 60


@pytest.mark.parametrize("window", [MINUTE, HOUR, HALF_DAY])
def test_count_falls_off_after_the_window_not_before(
    shard: CounterShard, clock: Clock, window: float
) -> None:
    width = window / SLOTS
    clock.advance(width / 2)  # mid-bucket
    shard.add([Op("ip:a", "msg", window, None)])
    event = clock.t
    clock.t = event + window - 0.001
    assert count(shard, "ip:a", "msg", window) == 1
    # Conservative: still counted until its bucket's end is a window old.
    clock.t = event + window + width / 2 - 0.001
    assert count(shard, "ip:a", "msg", window) == 1
    clock.t = event + window + width / 2
    assert count(shard, "ip:a", "msg", window) == 0


def test_count_stays_within_one_bucket_of_the_exact_count(clock: Clock) -> None:
    rng = random.Random(7)
    window = 600.0
    width = window / SLOTS
    shard = CounterShard(clock=clock)
    events: list[float] = []
    for _ in range(5000):
        clock.advance(rng.expovariate(1 / 1.5))
        if rng.random() < 0.6:
            shard.add([Op("ip:a", "msg", window, None)])
            events.append(clock.t)
        now = clock.t
        counted = shard.check([Op("ip:a", "msg", window, None, 0)]).counts[0]
        exact = sum(1 for t in events if t > now - window)
        generous = sum(1 for t in events if t > now - window - width)
        assert exact <= counted <= generous


def test_clock_stepping_back_never_forgets_counts(shard: CounterShard, clock: Clock) -> None:
    shard.add([Op("ip:a", "msg", MINUTE, None)])
    clock.advance(59)
    clock.t = T0 - 3600
    assert count(shard, "ip:a", "msg", MINUTE) == 1
    clock.t = T0 + 61
    assert count(shard, "ip:a", "msg", MINUTE) == 0


def test_snapshot_reports_when_the_oldest_bucket_clears(shard: CounterShard, clock: Clock) -> None:
    fail = [Op("auth-fail:127.0.0.5", "fail", 300.0, 5)]
    for _ in range(3):
        shard.add(fail)
        clock.advance(10)
    assert shard.snapshot("auth-fail:127.0.0.5") == [
        {"series": "fail", "window": 300.0, "count": 3, "clears_at": T0 + 305.0,
         "buckets": [[T0 + 305.0, 1], [T0 + 315.0, 1], [T0 + 325.0, 1]]}
    ]
    clock.t = T0 + 305.0
    assert shard.snapshot("auth-fail:127.0.0.5")[0]["count"] == 2
    assert shard.snapshot("ip:unknown") == []


# -- mark -------------------------------------------------------------------


def test_mark_flags_and_unflags_in_the_acceptance_bucket(shard: CounterShard, clock: Clock) -> None:
    accepted_at = clock.t + 5
    clock.t = accepted_at
    shard.add([Op("bounce:127.0.0.5", "acc", HOUR, None)])
    clock.advance(1800)
    bad = Op("bounce:127.0.0.5", "bad", HOUR, None, 1, at=accepted_at)
    shard.mark([bad])
    row = {r["series"]: r for r in shard.snapshot("bounce:127.0.0.5")}["bad"]
    # Counted with the acceptance, and clears with it.
    assert row["count"] == 1
    assert row["clears_at"] == T0 + HOUR + 60
    clock.t = T0 + HOUR + 60 - 0.001
    assert count(shard, "bounce:127.0.0.5", "bad", HOUR) == 1
    clock.t = T0 + HOUR + 60
    assert count(shard, "bounce:127.0.0.5", "bad", HOUR) == 0


def test_negative_mark_never_goes_below_zero(shard: CounterShard, clock: Clock) -> None:
    flag = Op("bounce:127.0.0.5", "bad", HOUR, None, 1, at=clock.t)
    unflag = Op("bounce:127.0.0.5", "bad", HOUR, None, -1, at=clock.t)
    clock.advance(600)
    shard.mark([flag])
    shard.mark([unflag])
    shard.mark([unflag])
    assert count(shard, "bounce:127.0.0.5", "bad", HOUR) == 0
    shard.mark([flag])
    assert count(shard, "bounce:127.0.0.5", "bad", HOUR) == 1


def test_mark_outside_the_window_is_ignored(shard: CounterShard, clock: Clock) -> None:
    long_ago = clock.t
    clock.advance(HOUR + 120)
    shard.mark([Op("bounce:127.0.0.5", "bad", HOUR, None, 1, at=long_ago)])
    shard.mark([Op("bounce:127.0.0.6", "bad", HOUR, None, -1)])
    assert len(shard) == 0


# -- memory -----------------------------------------------------------------


def test_dead_keys_are_evicted_without_an_expire_call(shard: CounterShard, clock: Clock) -> None:
    for i in range(10_000):
        shard.add(msg_ops(f"ip:10.0.{i // 256}.{i % 256}", ((MINUTE, 250),)))
    assert len(shard) == 10_000
    clock.advance(MINUTE + 2)
    for i in range(1_000):
        shard.reserve(f"r{i}", msg_ops("ip:hot", ((MINUTE, 5000),)))
    assert list(shard.keys()) == ["ip:hot"]


def test_memory_stays_bounded_under_churn(shard: CounterShard, clock: Clock) -> None:
    # 100 new keys a second, each seen once, never an expire() call: what
    # is kept is about one window's worth of keys.
    peak = 0
    for i in range(30_000):
        clock.advance(0.01)
        shard.add([Op(f"ip:{i}", "msg", MINUTE, 250)])
        peak = max(peak, len(shard))
    assert peak <= 100 * (MINUTE + 2)


def test_expire_evicts_dead_keys_and_reservations(shard: CounterShard, clock: Clock) -> None:
    for i in range(1_000):
        shard.reserve(f"r{i}", [Op(f"ip:{i}", "msg", MINUTE, 250)], ttl=30)
    clock.advance(MINUTE + 2)
    assert shard.expire() == 2_000  # 1,000 reservations and 1,000 keys
    assert len(shard) == 0
    assert shard.expire() == 0
    assert not shard.release("r0")


def test_long_window_keeps_key_alive(shard: CounterShard, clock: Clock) -> None:
    shard.add([Op("acct:a", "msg", MINUTE, None), Op("acct:a", "msg", HALF_DAY, None)])
    clock.advance(HOUR)
    assert shard.expire() == 0
    assert [(r["window"], r["count"]) for r in shard.snapshot("acct:a")] == [(HALF_DAY, 1)]
    clock.advance(HALF_DAY)
    assert shard.expire() == 1
    assert len(shard) == 0


# -- export / import --------------------------------------------------------


def _wire(data: object) -> object:
    return msgpack.unpackb(msgpack.packb(data), strict_map_key=False)


def _state(shard: CounterShard) -> dict[str, list[dict]]:
    return {key: shard.snapshot(key) for key in sorted(shard.keys())}


def test_export_import_round_trip(clock: Clock) -> None:
    a = CounterShard(clock=clock)
    a.add(msg_ops("ip:a"))
    clock.advance(90)
    a.add(msg_ops("ip:a") + msg_ops("acct:b"))
    a.mark([Op("bounce:a", "bad", HOUR, None, 2, at=T0)])
    done = a.reserve("done", msg_ops("ip:a"))
    a.release("done")
    pending = a.reserve("open", msg_ops("ip:a") + msg_ops("acct:b"))

    b = CounterShard(clock=clock)
    b.import_(_wire(a.export()))
    assert _state(b) == _state(a)
    b.import_(_wire(a.export()))  # a replay counts nothing twice
    assert _state(b) == _state(a)

    assert b.reserve("done", msg_ops("ip:a")) == done
    assert b.reserve("open", msg_ops("ip:a")) == pending
    assert b.release("open")
    assert count(b, "ip:a", "msg", HOUR) == 2
    assert count(b, "acct:b", "msg", HOUR) == 1


def test_import_takes_the_larger_bucket(clock: Clock) -> None:
    a, b = CounterShard(clock=clock), CounterShard(clock=clock)
    a.add([Op("ip:a", "msg", HOUR, None, 3)])
    b.add([Op("ip:a", "msg", HOUR, None, 5)])
    clock.advance(120)
    b.add([Op("ip:a", "msg", HOUR, None, 2)])
    b.import_(a.export())
    assert count(b, "ip:a", "msg", HOUR) == 7


def test_export_of_some_keys(clock: Clock) -> None:
    a = CounterShard(clock=clock)
    a.reserve("r1", msg_ops("ip:a") + msg_ops("acct:b"))
    a.add(msg_ops("ip:c"))
    b = CounterShard(clock=clock)
    b.import_(_wire(a.export(["ip:a"])))
    assert list(b.keys()) == ["ip:a"]
    assert b.release("r1")
    assert count(b, "ip:a", "msg", MINUTE) == 0
    assert len(b) == 1


def test_import_of_a_finished_reservation_finishes_it_here(clock: Clock) -> None:
    a = CounterShard(clock=clock)
    a.reserve("r1", msg_ops("ip:a"))
    b = CounterShard(clock=clock)
    b.import_(a.export())
    assert a.release("r1")
    b.import_(a.export())
    assert count(b, "ip:a", "msg", MINUTE) == 0
    assert b.release("r1")  # finished: a repeat subtracts nothing
    assert count(b, "ip:a", "msg", MINUTE) == 0


def test_import_skips_what_has_aged_out(clock: Clock) -> None:
    a = CounterShard(clock=clock)
    a.reserve("r1", [Op("ip:a", "msg", MINUTE, None)], ttl=10)
    data = a.export()
    clock.advance(MINUTE + 2)
    b = CounterShard(clock=clock)
    b.import_(data)
    assert len(b) == 0
    assert not b.release("r1")


def test_import_rejects_an_unknown_version(shard: CounterShard) -> None:
    with pytest.raises(ValueError, match="version 99"):
        shard.import_([99, [], []])


class _Walks(dict[str, Any]):
    """A reservation table that counts walks over all of it (lookups by rid are free)."""

    walks = 0

    def __iter__(self) -> Iterator[str]:
        self.walks += 1
        return super().__iter__()

    def items(self) -> Any:
        self.walks += 1
        return super().items()

    def values(self) -> Any:
        self.walks += 1
        return super().values()


def _reserve_unrelated(shard: CounterShard, n: int) -> None:
    for i in range(n):
        shard.reserve(f"other{i}", [Op(f"ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "msg", HOUR,
                                       None)])


def test_exporting_a_key_does_not_walk_unrelated_reservations(clock: Clock) -> None:
    # Replication exports the keys of every decision: its cost must follow
    # those keys, not the thousands of reservations live on the shard.
    shard = CounterShard(clock=clock)
    table = shard._reservations = _Walks()
    _reserve_unrelated(shard, 10_000)
    shard.reserve("mine", msg_ops("ip:a"))
    shard.reserve("both", msg_ops("ip:a") + msg_ops("ip:10.0.0.1"))
    table.walks = 0
    version, keys, reservations = shard.export(["ip:a"])
    assert table.walks == 0
    assert [name for name, _ in keys] == ["ip:a"]
    assert sorted(r[0] for r in reservations) == ["both", "mine"]
    assert all(r[4] == ["ip:a"] and {e[0] for e in r[5]} == {"ip:a"} for r in reservations)
    shard.export()
    assert table.walks == 1  # the count above is real: a full export walks once
    # What it costs: python -m loadtest.bench_counters.


def test_export_can_be_limited_to_some_reservations(clock: Clock) -> None:
    a = CounterShard(clock=clock)
    for i in range(10_000):
        a.reserve(f"r{i}", [Op("ip:hot", "msg", HOUR, None), Op("acct:x", "msg", HOUR, None)])
    a.release("r7")
    version, keys, reservations = a.export(["ip:hot"], ["r7", "unknown", "r7"])
    assert [name for name, _ in keys] == ["ip:hot"]
    assert [(r[0], r[1], r[4]) for r in reservations] == [("r7", RELEASED, ["ip:hot"])]
    assert a.export(["ip:hot"], [])[2] == []
    assert a.export(["ip:other"], ["r8"])[2] == []  # it does not touch the keys asked for
    [(rid, state, _, _, rec_keys, entries, _)] = a.export(None, ["r8"])[2]
    assert (rid, state, rec_keys) == ("r8", OPEN, ["ip:hot", "acct:x"])
    assert [e[0] for e in entries] == ["ip:hot", "acct:x"]

    b = CounterShard(clock=clock)
    b.import_(_wire(a.export(["ip:hot"], ["r8"])))
    assert count(b, "ip:hot", "msg", HOUR) == 9_999
    assert b.release("r8")
    assert count(b, "ip:hot", "msg", HOUR) == 9_998


def _assert_index_exact(shard: CounterShard, keys: list[str]) -> None:
    expected: dict[str, set[str]] = {}
    for rid, rec in shard._reservations.items():
        for key in rec.keys:
            expected.setdefault(key, set()).add(rid)
    assert {key: set(rids) for key, rids in shard._rsv_by_key.items()} == expected
    live = {r[0]: set(r[4]) for r in shard.export()[2]}
    for key in keys:
        assert {r[0] for r in shard.export([key])[2]} == {
            rid for rid, rec_keys in live.items() if key in rec_keys
        }


def test_reservations_stay_indexed_by_key_exactly(clock: Clock) -> None:
    rng = random.Random(7)
    a, b = CounterShard(clock=clock), CounterShard(clock=clock)
    keys = [f"ip:{i}" for i in range(8)]
    for step in range(4_000):
        roll, shard = rng.random(), rng.choice((a, b))
        rid = f"r{rng.randrange(300)}"  # reused, also after expiry
        picked = rng.sample(keys, rng.randint(1, 3))
        if roll < 0.35:
            ops = [Op(k, "msg", MINUTE, rng.choice((None, 5))) for k in picked]
            shard.reserve(rid, ops, ttl=rng.choice((5.0, 30.0, 120.0)))
        elif roll < 0.65:
            shard.release(rid)
        elif roll < 0.8:
            b.import_(_wire(a.export(picked)))  # parts of one reservation join on b
        elif roll < 0.85:
            a.import_(_wire(b.export(picked, [rid])))
        elif roll < 0.95:
            clock.advance(rng.uniform(0, 20))  # windows slide and keys are evicted
        else:
            shard.expire()
        if step % 40 == 0:
            _assert_index_exact(a, keys)
            _assert_index_exact(b, keys)
    clock.advance(121)
    for shard in (a, b):
        shard.expire()
        assert shard._rsv_by_key == {} and shard.export()[2] == []


# -- wire -------------------------------------------------------------------


def test_op_and_outcome_wire_round_trip() -> None:
    ops = [
        Op("ip:127.0.0.5", "msg", 60.0, 250),
        Op("acct:jan@kowalski.pl", "msg", 43200.0, None, 0),
        Op("bounce:2001:db8::/64", "bad", 3600.0, None, -1, at=1234.5),
        Op("acct:zażółć@xn--z-uga.pl", "msg", 60, 1),
    ]
    for op in ops:
        assert Op.from_wire(_wire(op.to_wire())) == op
    outcomes = [Outcome(True, (1, 2, 3), None), Outcome(False, (250,), 0), Outcome(True, (), None)]
    for outcome in outcomes:
        assert Outcome.from_wire(_wire(outcome.to_wire())) == outcome


@pytest.mark.parametrize(
    "data",
    [
        ["ip:a", "msg", 60.0, 250, 1],
        ["ip:a", "msg", "60", 250, 1, None],
        ["ip:a", "msg", 60.0, 2.5, 1, None],
        ["ip:a", "msg", 0.0, 250, 1, None],
        ["ip:a", None, 60.0, 250, 1, None],
        ["ip:a", "msg", 60.0, 250, True, None],
        {"key": "ip:a"},
    ],
)
def test_op_from_wire_rejects_malformed(data: object) -> None:
    with pytest.raises(ValueError):
        Op.from_wire(data)


@pytest.mark.parametrize("data", [[True, [1], 1], [True, ["1"], None], [True, [1]]])
def test_outcome_from_wire_rejects_malformed(data: object) -> None:
    with pytest.raises(ValueError):
        Outcome.from_wire(data)


# -- leases, reset, rows ---------------------------------------------------------


def test_a_lease_counts_its_units_at_once_in_its_own_bucket(
        shard: CounterShard, clock: Clock) -> None:
    clock.advance(0.25)  # a quarter into a one-second bucket of the minute window
    ops = msg_ops("acct:a")
    units, expires, counts = shard.lend("L1", ops, want=10, ttl=30)
    assert (units, counts) == (10, (0, 0, 0))
    assert expires == T0 + 1.0  # the end of the minute window's bucket
    assert [r["count"] for r in shard.snapshot("acct:a")] == [10, 10, 10]
    # Still counted when the lease's last moment has slid out of the window.
    clock.t = T0 + 1.0 - 1e-6 + MINUTE
    assert count(shard, "acct:a", "msg", MINUTE) == 10
    clock.t = T0 + 1.0 + MINUTE
    assert count(shard, "acct:a", "msg", MINUTE) == 0


def test_a_lease_returns_what_was_not_spent_once(shard: CounterShard) -> None:
    ops = msg_ops("acct:a")
    assert shard.lend("L1", ops, want=10, ttl=30)[0] == 10
    assert shard.lend("L1", ops, want=10, ttl=30)[0] == 10  # a repeat lends nothing more
    assert count(shard, "acct:a", "msg", HOUR) == 10
    assert shard.return_lease("L1", [4, 4, 6])
    assert [r["count"] for r in shard.snapshot("acct:a")] == [6, 6, 4]
    assert not shard.return_lease("L1", [6, 6, 6])  # returned: nothing more comes back
    assert not shard.return_lease("unknown", [1])
    assert not shard.release("L1")  # a lease is returned, not released
    assert [r["count"] for r in shard.snapshot("acct:a")] == [6, 6, 4]


def test_nothing_is_lent_near_a_limit(shard: CounterShard) -> None:
    small = msg_ops("ip:a", ((MINUTE, 60), (HOUR, 1000)))
    assert shard.lend("L1", small, want=5, ttl=30)[0] == 0
    assert len(shard) == 0
    big = msg_ops("ip:b", ((MINUTE, 250), (HOUR, 1000)))
    shard.add([Op("ip:b", "msg", MINUTE, None, 150)])
    # 100 left on the minute: at most a quarter of it, and never into the last 64.
    assert shard.lend("L2", big, want=500, ttl=30)[0] == 25
    shard.add([Op("ip:b", "msg", MINUTE, None, 20)])
    assert shard.lend("L3", big, want=500, ttl=30)[0] == 0


def test_a_renewal_returns_the_old_lease_and_lends_the_next_in_one_step(
        shard: CounterShard, clock: Clock) -> None:
    ops = msg_ops("acct:a", ((MINUTE, 250), (HOUR, 1000)))
    assert shard.lend("L1", ops, want=10, ttl=30)[0] == 10
    clock.advance(1.0)  # the lease's bucket ended: 3 and 4 units of it were spent
    returned, grants = shard.renew([("L1", [7, 6], "L2", ops, 20)], ttl=30)
    assert returned == ["L1"]
    [(units, expires, counts)] = grants
    # The next lease is sized on the counts the return left, in its own bucket.
    assert (units, counts, expires) == (20, (3, 4), T0 + 2.0)
    assert [r["count"] for r in shard.snapshot("acct:a")] == [23, 24]
    assert [r["buckets"] for r in shard.snapshot("acct:a")][0] == [
        [T0 + 1.0 + MINUTE, 3], [T0 + 2.0 + MINUTE, 20]]
    # A repeat takes nothing back and lends nothing more.
    assert shard.renew([("L1", [7, 6], "L2", ops, 20)], ttl=30)[0] == []
    assert [r["count"] for r in shard.snapshot("acct:a")] == [23, 24]
    # A lease spent to its last unit is renewed with no return ("").
    clock.advance(1.0)
    assert shard.renew([("", [0, 0], "L3", ops, 5)], ttl=30)[1][0][0] == 5
    assert [r["count"] for r in shard.snapshot("acct:a")] == [28, 29]
    assert shard.return_lease("L2", [0, 0])  # the old one still comes back on its own


def test_near_a_limit_a_renewal_takes_the_old_lease_back_and_lends_nothing(
        shard: CounterShard, clock: Clock) -> None:
    ops = msg_ops("ip:b", ((MINUTE, 250),))
    shard.add([Op("ip:b", "msg", MINUTE, None, 150)])
    assert shard.lend("L1", ops, want=500, ttl=30)[0] == 25  # a quarter of the 100 left
    shard.add([Op("ip:b", "msg", MINUTE, None, 20)])
    clock.advance(1.0)
    returned, [(units, _, counts)] = shard.renew([("L1", [5], "L2", ops, 500)], ttl=30)
    # 60 left after the return: under LEND_MIN_ROOM, per message from here.
    assert (returned, units, counts) == (["L1"], 0, (190,))
    assert count(shard, "ip:b", "msg", MINUTE) == 190


def test_a_malformed_renewal_changes_nothing(shard: CounterShard, clock: Clock) -> None:
    ops = msg_ops("acct:a", ((MINUTE, 250), (HOUR, 1000)))
    assert shard.lend("L1", ops, want=10, ttl=30)[0] == 10
    assert shard.lend("L9", ops, want=10, ttl=30)[0] == 10
    clock.advance(1.0)
    good = ("L9", [10, 10], "L10", ops, 8)
    for bad in [("L1", [4], "L2", ops, 8),  # one unused count for two counters
                ("L1", [4, 4], "L2", [Op("acct:a", "msg", MINUTE, None, 0)], 8)]:
        with pytest.raises(ValueError):
            shard.renew([good, bad], ttl=30)
        assert [r["count"] for r in shard.snapshot("acct:a")] == [20, 20]
    assert shard.return_lease("L1", [4, 4]) and shard.return_lease("L9", [10, 10])
    assert [r["count"] for r in shard.snapshot("acct:a")] == [6, 6]


def test_an_unreturned_lease_stays_counted(shard: CounterShard, clock: Clock) -> None:
    assert shard.lend("L1", msg_ops("acct:a"), want=8, ttl=30)[0] == 8
    clock.advance(40)
    assert shard.expire() == 1  # the record goes, its units stay
    assert count(shard, "acct:a", "msg", HOUR) == 8
    assert not shard.return_lease("L1", [8, 8, 8])


def test_reset_forgets_counts_and_reservations_but_not_open_leases(
        shard: CounterShard) -> None:
    shard.add(msg_ops("ip:a"))
    shard.reserve("r1", msg_ops("ip:a") + msg_ops("acct:b"))
    shard.mark([Op("bounce:a", "bad", HOUR, None, 2)])
    shard.lend("L1", msg_ops("ip:a"), want=5, ttl=30)
    assert shard.reset(["ip:a", "bounce:a", "ip:nothing"]) == 4  # counters that held a count
    # The lease's borrower may still spend its units: they stay counted.
    assert [r["count"] for r in shard.snapshot("ip:a")] == [5, 5, 5]
    assert shard.snapshot("bounce:a") == []
    assert count(shard, "acct:b", "msg", HOUR) == 1  # not asked for
    assert shard.release("r1")  # only its part on the other key is left to undo
    assert count(shard, "acct:b", "msg", HOUR) == 0
    assert [r["count"] for r in shard.snapshot("ip:a")] == [5, 5, 5]
    assert shard.return_lease("L1", [5, 5, 5])
    assert count(shard, "ip:a", "msg", HOUR) == 0


def test_rows_say_when_one_more_fits(shard: CounterShard, clock: Clock) -> None:
    limit = [(MINUTE, 3)]
    for _ in range(2):
        shard.reserve(f"a{_}", msg_ops("ip:a", limit))
    clock.advance(20)
    shard.reserve("b", msg_ops("ip:a", limit))
    shard.add([Op("ip:a", "plain", MINUTE, None)])
    rows = {r["series"]: r for r in shard.rows("ip:a")}
    # Full: one more fits once the first two leave (their bucket ends a minute on).
    assert rows["msg"] == {"series": "msg", "window": MINUTE, "count": 3, "max": 3,
                           "clears_at": T0 + 1 + MINUTE,
                           "buckets": [[T0 + 1 + MINUTE, 2], [T0 + 21 + MINUTE, 1]]}
    # No limit: when the oldest counted bucket leaves.
    assert rows["plain"]["max"] is None
    assert rows["plain"]["clears_at"] == T0 + 20 + 1 + MINUTE


def test_an_exact_import_replaces_the_copy(clock: Clock) -> None:
    owner, replica = CounterShard(clock=clock), CounterShard(clock=clock)
    owner.reserve("r1", msg_ops("ip:a"))
    owner.lend("L1", msg_ops("ip:a"), want=6, ttl=30)
    replica.import_(_wire(owner.export(["ip:a"], ["r1", "L1"])), exact=True)
    assert _state(replica) == _state(owner)
    owner.release("r1")
    owner.return_lease("L1", [6, 6, 6])
    owner.mark([Op("ip:a", "msg", MINUTE, None, -5)])  # no bucket below zero
    replica.import_(_wire(owner.export(["ip:a"], ["r1", "L1"])), exact=True)
    assert owner.snapshot("ip:a") == replica.snapshot("ip:a") == []
    # What the owner no longer has, the copy forgets too.
    owner.add(msg_ops("ip:b"))
    replica.import_(_wire(owner.export(["ip:b", "ip:a"])), exact=True)
    assert list(replica.keys()) == ["ip:b"]
    # A merge (a hand-off) never lowers a count instead.
    stale = CounterShard(clock=clock)
    stale.add(msg_ops("ip:b", amount=4))
    replica.import_(_wire(stale.export()))
    assert count(replica, "ip:b", "msg", MINUTE) == 4


@pytest.mark.parametrize("ops", [
    [["ip:a", "msg", 60.0, 250, 1, None], ["ip:a", "msg", 3600, None, 0, 1.5]],
    [],
])
def test_well_formed_ops_pass_the_quick_check(ops: list) -> None:
    check_wire_ops(ops)


@pytest.mark.parametrize("ops", [
    (["ip:a", "msg", 60.0, 250, 1, None],),
    [["ip:a", "msg", 60.0, 250, 1]],
    [["ip:a", "msg", -60.0, 250, 1, None]],
    [["ip:a", "msg", float("inf"), 250, 1, None]],
    [["ip:a", "msg", 60.0, 2.5, 1, None]],
    [["ip:a", "msg", 60.0, 250, True, None]],
])
def test_malformed_ops_fail_the_quick_check(ops: object) -> None:
    with pytest.raises(ValueError):
        check_wire_ops(ops)


def test_a_named_reset_is_done_once_and_its_copy_knows(clock: Clock) -> None:
    owner, replica = CounterShard(clock=clock), CounterShard(clock=clock)
    owner.add(msg_ops("ip:a"))
    assert owner.reset(["ip:a"], "reset-1") == 3
    replica.import_(_wire(owner.export(["ip:a"])), exact=True)
    owner.add(msg_ops("ip:a"))
    replica.add(msg_ops("ip:a"))  # the replica took over, and counted a message since
    assert owner.reset(["ip:a"], "reset-1") == 3  # the first answer; nothing cleared
    assert replica.reset(["ip:a"], "reset-1") == 3
    assert count(owner, "ip:a", "msg", HOUR) == count(replica, "ip:a", "msg", HOUR) == 1
    assert not owner.release("reset-1")
