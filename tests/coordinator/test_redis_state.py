"""The support state in Redis against a real redis-server: two stores are two hosts.

Each store has its own state folder, as each host has; what they share is
the server (or a three-node Redis Cluster). Same semantics as the file
store: atomic changes, lapses recorded once, audit entries read back.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import RedisCluster, RedisServer, free_port

from cluster.support_state import AuditEntry, CountryException, SupportState, Suspension
from coordinator.redis_state import COPY, IMPORTED, SUSPENSIONS_KEY, RedisStore
from coordinator.state_store import AUDIT, EXCEPTIONS, SUSPENSIONS, FileStore, StoreUnavailable
from worker.counters.redis_store import redis_client

NOW = 1_700_000_000.0
JAN = "jan@kowalski.pl"


def host(folder: Path, url: str = "", seeds: tuple[tuple[str, int], ...] = ()) -> RedisStore:
    return RedisStore(lambda: redis_client(url, seeds, 2.0), 2.0, folder)


@pytest.fixture
def hosts(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[RedisStore, RedisStore]]:
    redis_server.cli("FLUSHALL")
    yield host(tmp_path / "a", redis_server.url), host(tmp_path / "b", redis_server.url)


async def test_what_one_host_changes_the_other_reads(
        hosts: tuple[RedisStore, RedisStore]) -> None:
    a, b = hosts
    assert await a.start() == SupportState() == await b.start()
    assert await b.refresh() is None  # nothing changed: one GET, no full read

    jan = Suspension(JAN, "leaked", "anna", NOW)
    trip = CountryException("kowalski.pl", "US", "trip", "anna", NOW, NOW + 7 * 86400)
    await a.put_suspension(jan)
    await a.put_suspension(Suspension("eve@kowalski.pl", "spam", "bob", NOW, NOW + 60))
    await a.put_exception(trip)
    await a.drop_suspension("eve@kowalski.pl")
    seen = await b.refresh()
    assert seen is not None
    assert dict(seen.suspensions) == {JAN: jan}
    assert seen.exceptions["kowalski.pl"]["US"] == trip
    assert await b.refresh() is None

    await b.drop_exception("kowalski.pl", "US")
    assert (await a.refresh() or SupportState()).exceptions == {}
    await b.drop_exception("kowalski.pl", "US")  # nothing there: no new version
    assert await a.refresh() is None

    # The audit log: entries from both hosts, one list per tenant, oldest first.
    await b.record(AuditEntry(NOW + 2, "bob", "unsuspend", JAN, "kowalski.pl"))
    await a.record(AuditEntry(NOW + 1, "anna", "suspend", JAN, "kowalski.pl", "leaked"))
    await a.record(AuditEntry(NOW + 3, "anna", "counters-reset", "192.0.2.1", ""))
    assert [(e.by, e.action) for e in await b.history("kowalski.pl")] == [
        ("anna", "suspend"), ("bob", "unsuspend")]
    assert [e.subject for e in await a.history("")] == ["192.0.2.1"]
    assert await a.history("nowak.pl") == []

    # Each host keeps a copy of what it read last, for a start while Redis is down.
    copy = json.loads((a.folder / COPY).read_text())
    assert SupportState.from_wire(copy["state"]) == await a.load()
    await a.close()
    await b.close()


async def test_a_lapse_is_recorded_once_and_spares_a_newer_suspension(
        hosts: tuple[RedisStore, RedisStore]) -> None:
    a, b = hosts
    short = Suspension(JAN, "cool down", "anna", NOW, NOW + 5)
    grant = CountryException("kowalski.pl", "US", "trip", "anna", NOW, NOW + 5)
    await a.put_suspension(short)
    await a.put_exception(grant)
    lapsed = AuditEntry(NOW + 6, "sendguard", "suspension-lapsed", JAN, "kowalski.pl")
    assert [await a.expire_suspension(short, lapsed),
            await b.expire_suspension(short, lapsed)] == [True, False]
    ended = AuditEntry(NOW + 6, "sendguard", "exception-lapsed", "kowalski.pl", "kowalski.pl")
    assert [await b.expire_exception(grant, ended),
            await a.expire_exception(grant, ended)] == [True, False]
    assert [e.action for e in await a.history("kowalski.pl")] == [
        "suspension-lapsed", "exception-lapsed"]
    assert await a.load() == SupportState()

    # A host that saw the old suspension lapse must not take away a new one.
    await a.put_suspension(short)
    newer = Suspension(JAN, "again", "bob", NOW + 4, NOW + 3600)
    await b.put_suspension(newer)
    assert not await a.expire_suspension(short, lapsed)
    assert dict((await a.load()).suspensions) == {JAN: newer}
    assert len(await a.history("kowalski.pl")) == 2
    await a.close()
    await b.close()


async def file_host(folder: Path, *suspensions: Suspension,
                    audit: tuple[AuditEntry, ...] = (),
                    exceptions: tuple[CountryException, ...] = ()) -> None:
    """What a host kept with the file store before the switch to Redis."""
    store = FileStore(folder)
    store.load_now()
    for item in suspensions:
        await store.put_suspension(item)
    for grant in exceptions:
        await store.put_exception(grant)
    for entry in audit:
        await store.record(entry)


def test_each_hosts_files_move_into_redis_once(redis_server: RedisServer, tmp_path: Path) -> None:
    # Synchronous: each start runs its own event loop, as the coordinator's start-up does.
    redis_server.cli("FLUSHALL")
    jan_on_a = Suspension(JAN, "leaked", "anna", NOW)
    jan_on_b = Suspension(JAN, "leaked too", "bob", NOW + 1)
    eve = Suspension("eve@nowak.pl", "spam", "bob", NOW)
    trip = CountryException("nowak.pl", "DE", "fair", "bob", NOW, NOW + 1e9)
    asyncio.run(file_host(tmp_path / "a", jan_on_a,
                          audit=(AuditEntry(NOW, "anna", "suspend", JAN, "kowalski.pl",
                                            "leaked"),)))
    asyncio.run(file_host(tmp_path / "b", jan_on_b, eve, exceptions=(trip,),
                          audit=(AuditEntry(NOW + 1, "bob", "suspend", JAN, "kowalski.pl"),
                                 AuditEntry(NOW + 2, "bob", "suspend", "eve@nowak.pl",
                                            "nowak.pl"))))

    first = asyncio.run(host(tmp_path / "a", redis_server.url).start())
    assert dict(first.suspensions) == {JAN: jan_on_a}
    both = asyncio.run(host(tmp_path / "b", redis_server.url).start())
    # What was in Redis first stays; the second host adds what was only its own.
    assert dict(both.suspensions) == {JAN: jan_on_a, "eve@nowak.pl": eve}
    assert both.exceptions["nowak.pl"]["DE"] == trip
    for folder in (tmp_path / "a", tmp_path / "b"):
        names = set(os.listdir(folder))
        assert {SUSPENSIONS, EXCEPTIONS, AUDIT} & names == set()
        assert f"{SUSPENSIONS}{IMPORTED}" in names

    # A crash between the move and the renaming: the files are back, nothing is moved twice.
    for name in (SUSPENSIONS, EXCEPTIONS, AUDIT):
        (tmp_path / "b" / f"{name}{IMPORTED}").rename(tmp_path / "b" / name)
    store = host(tmp_path / "b", redis_server.url)
    assert asyncio.run(store.start()) == both
    assert [(e.ts, e.by) for e in asyncio.run(history(store, "kowalski.pl"))] == [
        (NOW, "anna"), (NOW + 1, "bob")]
    assert not (tmp_path / "b" / SUSPENSIONS).exists()


async def history(store: RedisStore, domain: str) -> list[AuditEntry]:
    try:
        return await store.history(domain)
    finally:
        await store.close()


async def test_redis_down_fails_fast_and_a_start_uses_the_last_copy(
        redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.cli("FLUSHALL")
    up = host(tmp_path, redis_server.url)
    await up.start()
    jan = Suspension(JAN, "leaked", "anna", NOW)
    await up.put_suspension(jan)
    assert (await up.refresh() or SupportState()).suspensions == {JAN: jan}
    await up.close()

    down = host(tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert dict((await down.start()).suspensions) == {JAN: jan}
    for attempt in (down.refresh(), down.put_suspension(jan), down.history("kowalski.pl")):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await attempt
        assert time.monotonic() - started < 2.0
        assert str(caught.value).startswith("redis: ") and "\n" not in str(caught.value)
    # With no copy either, a start while Redis is down starts empty.
    assert await host(tmp_path / "new", f"redis://127.0.0.1:{free_port()}/0").start() == \
        SupportState()


async def test_a_bad_entry_in_redis_keeps_the_state_in_force(
        hosts: tuple[RedisStore, RedisStore], redis_server: RedisServer) -> None:
    a, _ = hosts
    await a.put_suspension(Suspension(JAN, "leaked", "anna", NOW))
    redis_server.cli("HSET", SUSPENSIONS_KEY, "eve@x.pl", '{"account": "eve@x.pl"}')
    with pytest.raises(StoreUnavailable) as caught:
        await a.load()
    assert "eve@x.pl" in str(caught.value) and "reason must be a string" in str(caught.value)
    await a.close()


async def test_every_script_is_one_slot_in_a_redis_cluster(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "rc").start()
    try:
        seeds = tuple((h, int(p)) for h, p in (s.split(":") for s in cluster.seeds[:2]))
        await file_host(tmp_path / "a", Suspension("eve@nowak.pl", "spam", "bob", NOW),
                        audit=(AuditEntry(NOW, "bob", "suspend", "eve@nowak.pl", "nowak.pl"),))
        a, b = host(tmp_path / "a", seeds=seeds), host(tmp_path / "b", seeds=seeds)
        assert list((await a.start()).suspensions) == ["eve@nowak.pl"]
        await b.start()
        short = Suspension(JAN, "cool down", "anna", NOW, NOW + 5)
        await b.put_suspension(short)
        assert set((await a.refresh() or SupportState()).suspensions) == {JAN, "eve@nowak.pl"}
        lapsed = AuditEntry(NOW + 6, "sendguard", "suspension-lapsed", JAN, "kowalski.pl")
        assert [await a.expire_suspension(short, lapsed),
                await b.expire_suspension(short, lapsed)] == [True, False]
        await b.record(AuditEntry(NOW + 7, "bob", "unsuspend", "eve@nowak.pl", "nowak.pl"))
        assert [e.action for e in await a.history("nowak.pl")] == ["suspend", "unsuspend"]
        assert [e.action for e in await b.history("kowalski.pl")] == ["suspension-lapsed"]
        await a.close()
        await b.close()
    finally:
        cluster.stop()
