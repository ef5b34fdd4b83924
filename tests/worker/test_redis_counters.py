"""The Redis counter backend against a real redis-server: each script's semantics.

The reference is :class:`~worker.counters.shard.CounterShard`, the ring's
owner: the same decisions at the same (injected) times must get the same
outcomes and counts from both. Injected times start at the real time
because Redis expires keys by its own clock.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redisserver import RedisCluster, RedisServer

from cluster.counting import Op, Outcome
from worker.counters.client import RESERVATION_TTL, CounterUnavailable
from worker.counters.redis_store import RedisCounters, connect, subject_tag
from worker.counters.shard import CounterShard


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(redis_server: RedisServer, clock: Clock) -> AsyncIterator[RedisCounters]:
    redis_server.cli("FLUSHALL")
    counters = connect(redis_server.url, (), timeout=2.0)
    counters._clock = clock
    yield counters
    await counters.aclose()


def ip(n: int = 1) -> str:
    return f"ip:192.0.2.{n}"


ACCT = "acct:jan@kowalski.pl"


# -- the same answers as the ring's shard ----------------------------------------------

async def test_random_decisions_match_the_shard(store: RedisCounters, clock: Clock) -> None:
    shard = CounterShard(clock)
    rng = random.Random(15)
    keys = [ip(1), ip(2), ACCT, "bounce:192.0.2.1", "spam:192.0.2.1"]
    windows = [60.0, 3600.0, 7.5]
    open_rids: list[str] = []
    seen: set[object] = set()
    for step in range(400):
        clock.now += rng.choice([0.0, 0.05, 0.4, 1.3, 9.0, 61.0])
        ops = [Op(rng.choice(keys), rng.choice(["msg", "acc"]), rng.choice(windows),
                  rng.choice([None, 2, 5, 9]), rng.choice([0, 1, 1, 1, 3]))
               for _ in range(rng.randint(1, 4))]
        kind = rng.choice(["check", "reserve", "reserve", "add", "release", "mark"])
        if kind == "check":
            assert await store.check(ops) == shard.check(ops), step
        elif kind == "reserve":
            rid = f"r{step}"
            outcome = shard.reserve(rid, ops, RESERVATION_TTL)
            assert await store.reserve(rid, ops) == outcome, step
            open_rids.append(rid)
            seen.add(("reserve", outcome.ok))
        elif kind == "add":
            assert await store.add(ops) == shard.add(ops), step
        elif kind == "release" and open_rids:
            rid = open_rids.pop(rng.randrange(len(open_rids)))
            released = shard.release(rid)
            assert await store.release(rid) == released, step
            seen.add(("release", released))
        elif kind == "mark":
            marks = [Op(op.key, op.series, op.window, None, rng.choice([1, -1, 2]),
                        at=clock.now - rng.choice([0.0, 30.0, 5000.0])) for op in ops]
            await store.mark(marks)
            shard.mark(marks)
        rows = await store.inspect(keys)
        for key in keys:
            assert _rows(rows[key]) == _rows(shard.snapshot(key)), (step, key)
    # The run went through refusals and releases of both kinds, not only the easy path.
    assert seen == {("reserve", True), ("reserve", False), ("release", True),
                    ("release", False)}


def _rows(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return sorted((r["series"], r["window"], r["count"], r["clears_at"], str(r["buckets"]))
                  for r in rows if r["count"])


# -- each operation ------------------------------------------------------------------------

async def test_a_reserve_retried_with_its_id_counts_once(store: RedisCounters) -> None:
    ops = [Op(ip(), "msg", 60.0, 2), Op(ACCT, "msg", 60.0, 5)]
    first = await store.reserve("sid.q1", ops)
    assert first == Outcome(True, (0, 0), None)
    assert await store.reserve("sid.q1", ops) == first
    assert (await store.check(ops)).counts == (1, 1)


async def test_an_account_over_its_limit_releases_the_address_part(store: RedisCounters) -> None:
    await store.add([Op(ACCT, "msg", 60.0, None, 5)])
    ops = [Op(ip(), "msg", 60.0, 10), Op(ACCT, "msg", 60.0, 5)]
    outcome = await store.reserve("sid.q2", ops)
    assert outcome == Outcome(False, (0, 5), 1)
    # The address's part fitted and was counted, then taken back.
    assert (await store.check(ops)).counts == (0, 5)
    assert await store.release("sid.q2") is False


async def test_amounts_over_one_must_fit_whole(store: RedisCounters) -> None:
    ops = [Op(ACCT, "rcpt", 3600.0, 10, 4)]
    assert (await store.reserve("a", ops)).ok
    assert (await store.reserve("b", ops)).ok
    third = await store.reserve("c", ops)
    assert third == Outcome(False, (8,), 0)
    assert (await store.reserve("d", [Op(ACCT, "rcpt", 3600.0, 10, 2)])).ok
    assert (await store.check([Op(ACCT, "rcpt", 3600.0, 10, 0)])).counts == (10,)


async def test_release_takes_back_exactly_once(store: RedisCounters) -> None:
    ops = [Op(ip(), "msg", 60.0, 3)]
    await store.reserve("keep", ops)
    await store.reserve("undo", ops)
    assert await store.release("undo") is True
    assert await store.release("undo") is True  # again, and nothing more is taken back
    assert (await store.check(ops)).counts == (1,)
    assert await store.release("never-reserved") is False


async def test_a_release_that_overtakes_its_reserve_voids_it(store: RedisCounters,
                                                             redis_server: RedisServer) -> None:
    ops = [Op(ip(), "msg", 60.0, 3)]
    # What a release sent on a fresh connection after a lost reserve does.
    store._remember("late", [(subject_tag(ip()), [])])
    assert await store.release("late") is False
    outcome = await store.reserve("late", ops)
    assert not outcome.ok
    assert (await store.check(ops)).counts == (0,)


async def test_an_open_reservation_keeps_its_count_after_its_ttl(store: RedisCounters,
                                                                 clock: Clock) -> None:
    ops = [Op(ACCT, "msg", 3600.0, 3)]
    await store.reserve("open", ops)
    clock.now += RESERVATION_TTL + 1
    assert await store.release("open") is False
    assert (await store.check(ops)).counts == (1,)


async def test_windows_slide_by_buckets_of_a_sixtieth(store: RedisCounters,
                                                      clock: Clock) -> None:
    clock.now = (int(time.time()) // 60 + 1) * 60.0  # a bucket boundary of the 1m window
    op = Op(ip(), "msg", 60.0, 1)
    assert (await store.reserve("one", [op])).ok
    clock.now += 60.0
    assert not (await store.check([op])).ok  # the bucket counts a full window after it ends
    clock.now += 0.999
    assert not (await store.check([op])).ok
    clock.now += 0.002
    assert (await store.check([op])).ok


async def test_mark_at_an_acceptance_time_and_take_it_back(store: RedisCounters,
                                                           clock: Clock) -> None:
    bad = Op("bounce:192.0.2.1", "bad", 3600.0, None, 0)
    accepted_at = clock.now - 600
    await store.mark([Op(bad.key, "bad", 3600.0, None, 1, at=accepted_at)])
    await store.mark([Op(bad.key, "bad", 3600.0, None, 1, at=clock.now - 7200)])  # too old
    assert (await store.check([bad])).counts == (1,)
    rows = (await store.inspect([bad.key]))[bad.key]
    assert rows[0]["clears_at"] == pytest.approx(
        (int(accepted_at // 60) + 61) * 60.0)
    for _ in range(2):  # never below zero
        await store.mark([Op(bad.key, "bad", 3600.0, None, -1, at=accepted_at)])
    assert (await store.check([bad])).counts == (0,)


async def test_reset_clears_counters_and_open_reservations(store: RedisCounters) -> None:
    keys = [ip(), "auth-fail:192.0.2.1", "bounce:192.0.2.1", "spam:192.0.2.1"]
    await store.reserve("before", [Op(ip(), "msg", 60.0, 9), Op(keys[2], "acc", 3600.0, None)])
    await store.add([Op(keys[1], "fail", 600.0, None)])
    await store.add([Op(ACCT, "msg", 60.0, None)])
    assert await store.reset(keys) == 3
    assert await store.reset(keys) == 0
    assert await store.inspect(keys) == {key: [] for key in keys}
    await store.add([Op(ip(), "msg", 60.0, None, 2)])
    # The reservation made before the reset no longer holds anything to take back.
    assert await store.release("before") is False
    assert (await store.check([Op(ip(), "msg", 60.0, 9)])).counts == (2,)
    assert (await store.check([Op(ACCT, "msg", 60.0, 9)])).counts == (1,)  # another subject


async def test_scripts_are_loaded_again_after_a_flush(store: RedisCounters,
                                                      redis_server: RedisServer) -> None:
    await store.add([Op(ACCT, "msg", 60.0, None)])
    redis_server.cli("SCRIPT", "FLUSH")
    assert (await store.check([Op(ACCT, "msg", 60.0, 5)])).counts == (1,)


# -- failures ------------------------------------------------------------------------------

async def test_a_stopped_redis_is_unavailable_and_then_back(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "r").start()
    store = connect(redis.url, (), timeout=0.5)
    try:
        op = Op(ACCT, "msg", 60.0, 5)
        assert (await store.reserve("a", [op])).ok
        redis.stop()
        started = time.monotonic()
        with pytest.raises(CounterUnavailable):
            await store.reserve("b", [op])
        assert time.monotonic() - started < 2.5
        redis.start()
        assert (await store.check([op])).counts == (0,)  # no AOF here: the count is gone
    finally:
        await store.aclose()
        redis.stop()


async def test_a_redis_slower_than_the_timeout_is_unavailable(redis_server: RedisServer) -> None:
    store = connect(redis_server.url, (), timeout=0.3)
    op = Op(ACCT, "msg", 60.0, 5)
    try:
        await store.check([op])
        os.kill(redis_server.pid(), signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(CounterUnavailable):
                await store.reserve("slow", [op])
            assert time.monotonic() - started < 2.5
        finally:
            os.kill(redis_server.pid(), signal.SIGCONT)
        # The reserve may have run once Redis woke up: it stands (an under-admission)
        # and a retry with its id does not count it again.
        outcome = await store.reserve("slow", [op])
        assert outcome.ok
        assert (await store.check([op])).counts == (1,)
    finally:
        await store.aclose()


# -- a Redis Cluster ------------------------------------------------------------------------

async def test_every_operation_on_a_redis_cluster(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path).start()
    nodes = [(host, int(port)) for host, port in (s.split(":") for s in cluster.seeds)]
    store = connect("", nodes[:1], timeout=2.0)
    try:
        addresses = [ip(n) for n in range(1, 9)]  # subjects spread over the three masters
        for n, key in enumerate(addresses):
            ops = [Op(key, "msg", 60.0, 2), Op(ACCT, "msg", 60.0, 100),
                   Op(key.replace("ip:", "bounce:"), "acc", 3600.0, None)]
            assert (await store.reserve(f"q{n}", ops)).ok
            assert (await store.reserve(f"q{n}", ops)).ok  # a retry
        assert (await store.check([Op(ACCT, "msg", 60.0, 100)])).counts == (8,)
        assert await store.release("q0") is True
        await store.mark([Op("bounce:192.0.2.2", "bad", 3600.0, None, 1, at=time.time())])
        rows = await store.inspect([ip(2), "bounce:192.0.2.2", ACCT])
        assert [r["count"] for r in rows[ip(2)]] == [1]
        assert sorted(r["series"] for r in rows["bounce:192.0.2.2"]) == ["acc", "bad"]
        assert rows[ACCT][0]["count"] == 7
        assert await store.reset([ip(3), "bounce:192.0.2.3"]) == 2
        assert (await store.check([Op(ip(3), "msg", 60.0, 2)])).counts == (0,)
    finally:
        await store.aclose()
        cluster.stop()


async def test_an_unreachable_redis_cluster_is_unavailable() -> None:
    from redisserver import free_port

    store = connect("", [("127.0.0.1", free_port(cluster=True))], timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(CounterUnavailable):
            await store.check([Op(ACCT, "msg", 60.0, 5)])
        assert time.monotonic() - started < 3.0
    finally:
        await store.aclose()
