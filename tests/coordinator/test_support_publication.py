"""A support change travels as a small SupportSnapshot; a worker applies it only on its base.

The coordinator's real sources, publisher and sockets, and a worker's real
line and snapshot feed, over ipc:// in one process: what is published for
each kind of change, what the worker holds after each, and a worker that
missed a full snapshot ignoring the small one until the catch-up resends
the full one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.asyncio
from geoipdb import write_country_db

from cluster import wire
from cluster.support_state import Suspension
from coordinator.outbox import Outbox
from coordinator.snapshots import SnapshotPublisher, StateFile
from coordinator.sources import SnapshotSources
from worker.link.line import CoordinatorLine
from worker.link.snapshots import SnapshotFeed

JAN, ANNA = "jan@kowalski.pl", "anna@nowak.pl"
TENANTS = ('[domains."kowalski.pl"]\ncountries = ["PL"]\n[domains."nowak.pl"]\n'
           f'[accounts."{JAN}"]\npassword = "{{PLAIN}}x"\n'
           f'[accounts."{ANNA}"]\npassword = "{{PLAIN}}x"\n')
CONFIG = ('[tenants]\nfile = "tenants.toml"\n[geoip]\ndatabase = "country.mmdb"\n'
          '[[limits]]\nwindow = "1m"\nmax = 5\n')


@dataclass
class Parts:
    sources: SnapshotSources
    outbox: Outbox
    publisher: SnapshotPublisher
    line: CoordinatorLine
    feed: SnapshotFeed
    identity: bytes


@pytest.fixture
async def parts(short_tmp: Path) -> AsyncIterator[Parts]:
    (short_tmp / "tenants.toml").write_text(TENANTS)
    write_country_db(short_tmp / "country.mmdb", {"127.0.0.0/8": "PL"})
    (short_tmp / "sendguard.toml").write_text(CONFIG)
    sources = SnapshotSources(short_tmp / "sendguard.toml")
    context = zmq.asyncio.Context()
    outbox = Outbox(context, short_tmp)
    publisher = SnapshotPublisher(sources, outbox, StateFile(short_tmp), lambda: 1)
    line = CoordinatorLine(short_tmp, "w1")
    feed = SnapshotFeed(line)
    try:
        first = asyncio.create_task(feed.first())
        async with asyncio.timeout(10):
            identity, payload = await outbox.receive()
        assert isinstance(wire.decode(payload), wire.SnapshotRequest)
        await publisher.send_to(identity)
        async with asyncio.timeout(10):
            await first
        await joined(outbox, line)
        yield Parts(sources, outbox, publisher, line, feed, identity)
    finally:
        await line.close()
        outbox.close()
        context.term()


async def joined(outbox: Outbox, line: CoordinatorLine) -> None:
    """Until the worker's subscription reaches the PUB (ZeroMQ's slow joiner)."""
    async with asyncio.timeout(10):
        while True:
            await outbox.publish(wire.TOPIC_CONNECTIONS, wire.encode(wire.ConnectionCounts({})))
            try:
                async with asyncio.timeout(0.1):
                    if isinstance(await line.receive(), wire.ConnectionCounts):
                        return
            except TimeoutError:
                continue


async def next_snapshot(line: CoordinatorLine) -> wire.SnapshotMessage | wire.SupportSnapshot:
    async with asyncio.timeout(10):
        while True:
            message = await line.receive()
            if isinstance(message, (wire.SnapshotMessage, wire.SupportSnapshot)):
                return message


def suspend(sources: SnapshotSources, account: str) -> None:
    sources.set_support(sources.support.with_suspension(
        Suspension(account, "leak", "anna", time.time())))


def suspended(feed: SnapshotFeed, account: str) -> bool:
    return feed.current().support.suspension(account, time.time()) is not None


async def test_a_support_change_is_small_and_keeps_what_the_worker_built(parts: Parts) -> None:
    # A coordinator's first publication is whole: the workers may hold a snapshot of
    # its predecessor, whose base they cannot tell from this one's.
    suspend(parts.sources, ANNA)
    await parts.publisher.publish()
    first = await next_snapshot(parts.line)
    assert isinstance(first, wire.SnapshotMessage) and (first.version, first.base) == (2, 1)
    parts.feed.offer(first)
    held = parts.feed.current()

    suspend(parts.sources, JAN)
    await parts.publisher.publish()
    message = await next_snapshot(parts.line)
    assert isinstance(message, wire.SupportSnapshot)
    assert (message.version, message.base) == (3, 1)
    assert len(wire.encode(message)) < 400 < len(parts.publisher.frame())
    parts.feed.offer(message)
    now = parts.feed.current()
    assert now.version == 3 and suspended(parts.feed, JAN) and suspended(parts.feed, ANNA)
    assert now.settings is held.settings and now.tenants is held.tenants
    assert now.geoip is held.geoip and now.dkim is held.dkim

    # What one worker is sent alone is the full snapshot, with the current support.
    full = wire.decode(parts.publisher.frame())
    assert isinstance(full, wire.SnapshotMessage)
    assert (full.version, full.base) == (3, 1)
    assert sorted(s["account"] for s in full.support["suspensions"]) == [ANNA, JAN]


async def test_tenants_and_support_changed_before_one_publication_go_out_whole(
        parts: Parts, short_tmp: Path) -> None:
    # As `tenant disallow-country` does: the tenant file rewritten, an exception dropped.
    (short_tmp / "tenants.toml").write_text(TENANTS.replace('["PL"]', '["PL", "DE"]'))
    assert parts.sources.force_tenants()
    suspend(parts.sources, ANNA)
    await parts.publisher.publish()
    message = await next_snapshot(parts.line)
    assert isinstance(message, wire.SnapshotMessage)
    assert (message.version, message.base) == (3, 2)
    parts.feed.offer(message)
    assert parts.feed.current().tenants.domains["kowalski.pl"].countries == {"PL", "DE"}
    assert suspended(parts.feed, ANNA)

    # The next support change applies on top of that one.
    suspend(parts.sources, JAN)
    await parts.publisher.publish()
    small = await next_snapshot(parts.line)
    assert isinstance(small, wire.SupportSnapshot) and (small.version, small.base) == (4, 2)
    parts.feed.offer(small)
    assert parts.feed.version == 4 and suspended(parts.feed, JAN) and suspended(parts.feed, ANNA)


async def test_a_worker_that_missed_a_full_snapshot_waits_for_the_catch_up(
        parts: Parts, short_tmp: Path) -> None:
    suspend(parts.sources, ANNA)
    await parts.publisher.publish()
    parts.feed.offer(await next_snapshot(parts.line))
    assert parts.feed.version == 2

    (short_tmp / "tenants.toml").write_text(TENANTS.replace('["PL"]', '["PL", "CZ"]'))
    assert parts.sources.force_tenants()
    await parts.publisher.publish()
    lost = await next_snapshot(parts.line)   # this worker never sees it
    assert isinstance(lost, wire.SnapshotMessage) and lost.version == 3

    suspend(parts.sources, JAN)
    await parts.publisher.publish()
    small = await next_snapshot(parts.line)
    assert isinstance(small, wire.SupportSnapshot) and (small.version, small.base) == (4, 3)
    parts.feed.offer(small)
    # Not applied on the tenants of version 2: the worker holds version 2 whole.
    assert parts.feed.version == 2
    assert not suspended(parts.feed, JAN)
    assert parts.feed.current().tenants.domains["kowalski.pl"].countries == {"PL"}

    # Its report names version 2: the coordinator sends the full current snapshot.
    await parts.publisher.catch_up("w1", parts.identity, parts.feed.version, time.monotonic())
    resent = await next_snapshot(parts.line)
    assert isinstance(resent, wire.SnapshotMessage) and (resent.version, resent.base) == (4, 3)
    parts.feed.offer(resent)
    assert parts.feed.version == 4 and suspended(parts.feed, JAN) and suspended(parts.feed, ANNA)
    assert parts.feed.current().tenants.domains["kowalski.pl"].countries == {"PL", "CZ"}

    # And support changes apply on it again.
    parts.sources.set_support(parts.sources.support.without_suspension(JAN))
    await parts.publisher.publish()
    parts.feed.offer(await next_snapshot(parts.line))
    assert parts.feed.version == 5 and not suspended(parts.feed, JAN)
