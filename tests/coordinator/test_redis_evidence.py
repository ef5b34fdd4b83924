"""Compromise evidence in Redis against a real redis-server: two clients are two hosts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redisserver import RedisCluster, RedisServer, free_port

from cluster.settings import Settings, parse_settings
from coordinator.evidence import BadNote
from coordinator.redis_evidence import SharedEvidence, evidence_keys
from coordinator.state_store import StoreUnavailable

JAN = "jan@kowalski.pl"


def settings(url: str) -> Settings:
    return parse_settings(Path("/etc/sendguard/sendguard.toml"), {
        "tenants": {"file": "t.toml"}, "geoip": {"database": "country.mmdb"},
        "counters": {"backend": "redis", "redis_url": url},
        "compromise": {"window": "1h", "countries": 3, "spam_messages": 2}})


@pytest.fixture
async def hosts(redis_server: RedisServer) -> AsyncIterator[tuple[SharedEvidence, SharedEvidence]]:
    redis_server.cli("FLUSHALL")
    made = SharedEvidence(settings(redis_server.url)), SharedEvidence(settings(redis_server.url))
    yield made
    for one in made:
        await one.close()


def login(country: str, at: float, sid: str = "s" * 22) -> list[object]:
    return ["login", JAN, country, sid, at]


def spam(queue_id: str, at: float) -> list[object]:
    return ["spam", JAN, queue_id, "q" * 22, at]


async def test_countries_seen_by_two_hosts_add_up_and_one_claims_the_incident(
        redis_server: RedisServer, hosts: tuple[SharedEvidence, SharedEvidence]) -> None:
    a, b = hosts
    watch = settings(redis_server.url).compromise
    assert watch is not None
    now = time.time()
    assert await a.note(watch, login("PL", now - 4000), now) is None  # out of the window
    assert await a.note(watch, login("PL", now - 10), now) is None
    assert await b.note(watch, login("DE", now - 5), now) is None
    assert (await a.evidence(watch, JAN, now))["countries"].keys() == {"DE", "PL"}

    # Two hosts noting a third country at once: one incident between them.
    found = await asyncio.gather(a.note(watch, login("US", now), now),
                                 b.note(watch, login("FR", now), now))
    [incident] = [i for i in found if i is not None]
    assert incident.signal == "countries" and incident.account == JAN
    # The first of the two to run made three countries; the second, four, found it claimed.
    assert len(incident.evidence["countries"]) == 3
    assert {"DE", "PL"} < set(incident.evidence["countries"])
    assert await b.note(watch, login("CN", now), now) is None  # still claimed
    await a.unclaim(JAN)
    again = await b.note(watch, login("CN", now), now)
    assert again is not None and len(again.evidence["countries"]) == 5

    # Each key lives one window after its last note, and support's forget clears all.
    assert 3500_000 < int(redis_server.cli("PTTL", evidence_keys(JAN)[0])) <= 3601_000
    assert await b.forget(JAN)
    assert (await a.evidence(watch, JAN, now))["countries"] == {}


async def test_spam_keeps_the_last_messages_and_reaches_its_threshold(
        redis_server: RedisServer, hosts: tuple[SharedEvidence, SharedEvidence]) -> None:
    a, b = hosts
    watch = settings(redis_server.url).compromise
    assert watch is not None
    now = time.time()
    assert await a.note(watch, spam("Q1", now - 3700), now) is None  # too late to count
    assert await a.note(watch, spam("Q2", now - 20), now) is None
    incident = await b.note(watch, spam("Q3", now - 10), now)
    assert incident is not None and incident.signal == "spam"
    assert [s["queue_id"] for s in incident.evidence["spam"]] == ["Q2", "Q3"]
    assert incident.reason == "compromise: 2 spam messages within 1h"
    assert int(redis_server.cli("ZCARD", evidence_keys(JAN)[1])) == 2
    with pytest.raises(BadNote):
        await a.note(watch, ["spam", JAN, "Q4"], now)


async def test_redis_down_is_unavailable_at_once() -> None:
    down = SharedEvidence(settings(f"redis://127.0.0.1:{free_port()}/0"))
    watch = settings("redis://127.0.0.1:1/0").compromise
    assert watch is not None
    try:
        with pytest.raises(StoreUnavailable):
            await down.note(watch, login("PL", time.time()), time.time())
        with pytest.raises(StoreUnavailable):
            await down.evidence(watch, JAN, time.time())
    finally:
        await down.close()


async def test_every_script_is_one_slot_in_a_redis_cluster(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "rc").start()
    try:
        made = parse_settings(Path("/etc/sendguard/sendguard.toml"), {
            "tenants": {"file": "t.toml"},
            "counters": {"backend": "redis", "redis_cluster": cluster.seeds[:2]},
            "compromise": {"countries": 0, "spam_messages": 2}})
        watch = made.compromise
        assert watch is not None
        a, b = SharedEvidence(made), SharedEvidence(made)
        now = time.time()
        assert await a.note(watch, spam("Q1", now), now) is None
        incident = await b.note(watch, spam("Q2", now), now)
        assert incident is not None and incident.evidence["messages"] == 2
        assert (await a.evidence(watch, JAN, now))["spam_messages"] == 2
        await a.unclaim(JAN)
        assert await b.forget(JAN)
        assert (await a.evidence(watch, JAN, now))["spam_messages"] == 0
        await a.close()
        await b.close()
    finally:
        cluster.stop()
