from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import zmq
import zmq.asyncio

from cluster import wire
from cluster.counting import Op
from cluster.ring import Ring
from worker.counters.client import CounterUnavailable
from worker.counters.node import CounterNode
from worker.counters.shard import CounterShard

HOUR = 3600.0  # long enough that no bucket leaves its window during a test
TIMEOUT = 2.0  # generous: these tests prove exactness, not speed
SETTLE = 10.0


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short on purpose: ipc:// paths are limited to ~107 bytes.
    folder = tempfile.mkdtemp(dir="/tmp", prefix="sg")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def zctx() -> Iterator[zmq.asyncio.Context]:
    """A context for the test's own sockets (a stranger, a silent owner)."""
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def made() -> AsyncIterator[list[CounterNode]]:
    nodes: list[CounterNode] = []
    yield nodes
    await asyncio.gather(*(node.close() for node in nodes))


async def start(made: list[CounterNode], folder: str, names: list[str],
                request_timeout: float = TIMEOUT, leasing: bool = True,
                **options: Any) -> list[CounterNode]:
    nodes = []
    for name in names:
        node = CounterNode(name, f"ipc://{folder}/{name}.sock", CounterShard(),
                           request_timeout, **options)
        node.client.leasing = leasing
        await node.start()
        made.append(node)
        nodes.append(node)
    return nodes


def members(nodes: list[CounterNode]) -> list[tuple[str, str]]:
    return [(node.name, node.endpoint) for node in nodes]


async def form(nodes: list[CounterNode], epoch: int) -> None:
    ring_members = members(nodes)
    await asyncio.gather(*(node.apply_ring(epoch, ring_members) for node in nodes))
    assert all(await asyncio.gather(*(node.wait_active(SETTLE) for node in nodes)))


def key_where(ring: Ring, owner: str, replica: str | None = None, skip: int = 0) -> str:
    for i in range(100_000):
        key = f"ip:10.0.{i >> 8}.{i & 255}"
        if ring.owner(key) == owner and replica in (None, ring.replica(key)):
            if skip == 0:
                return key
            skip -= 1
    raise AssertionError(f"no key owned by {owner}")


def msg(key: str, limit: int | None, amount: int = 1) -> Op:
    return Op(key, "msg", HOUR, limit, amount)


def count_in(rows: list[dict], series: str = "msg") -> int:
    return sum(row["count"] for row in rows if row["series"] == series and row["window"] == HOUR)


async def reserve_many(node: CounterNode, key: str, limit: int, n: int, tag: str) -> list[str]:
    """`n` concurrent reserves; the rids of those accepted."""
    rids = [f"{tag}-{node.name}-{key}-{i}" for i in range(n)]
    outcomes = await asyncio.gather(*(node.client.reserve(r, [msg(key, limit)]) for r in rids))
    return [r for r, outcome in zip(rids, outcomes, strict=False) if outcome.ok]


# -- exactness -------------------------------------------------------------------


async def test_concurrent_reserves_from_every_node_admit_exactly_the_limit(
        sock_dir: str, made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    ring = Ring(["a", "b", "c"])
    key = key_where(ring, "b")
    limit = 40
    accepted = await asyncio.gather(*(reserve_many(n, key, limit, 30, "r") for n in nodes))
    assert sum(len(rids) for rids in accepted) == limit
    for node in nodes:
        assert count_in(await node.inspect(key)) == limit
    # Replicated before any answer went out: the replica already agrees.
    replica = next(n for n in nodes if n.name == ring.replica(key))
    assert count_in(replica.shard.snapshot(key)) == limit
    # A limit this small is never lent: every message was reserved at the owner.
    assert not any(node.client._book.leases for node in nodes)


async def test_a_decision_on_two_owners_is_all_or_nothing(
        sock_dir: str, made: list[CounterNode]) -> None:
    # Per message: leases (tested below) would hold the wide key's count up.
    a, b, c = await start(made, sock_dir, ["a", "b", "c"], leasing=False)
    await form([a, b, c], 1)
    ring = Ring(["a", "b", "c"])
    wide, narrow = key_where(ring, "a"), key_where(ring, "b")
    # The wide limit never binds, so exactly the narrow one decides.
    decision = [msg(wide, 100), msg(narrow, 4)]
    rids = [f"d{i}" for i in range(12)]
    outcomes = await asyncio.gather(*(c.client.reserve(r, decision) for r in rids))
    ok = [r for r, outcome in zip(rids, outcomes, strict=False) if outcome.ok]
    assert len(ok) == 4
    assert {o.denied for o in outcomes if not o.ok} == {1}
    late = await c.client.reserve("late", decision)
    assert (late.ok, late.counts, late.denied) == (False, (4, 4), 1)
    # The denied decisions' parts on the wide key were released again.
    assert count_in(await c.inspect(wide)) == 4
    assert count_in(await c.inspect(narrow)) == 4

    assert all(await asyncio.gather(*(c.client.release(r) for r in ok[2:])))
    assert count_in(await c.inspect(wide)) == 2
    assert count_in(await c.inspect(narrow)) == 2
    assert await c.client.release(ok[2])  # a repeat subtracts nothing more
    assert count_in(await c.inspect(narrow)) == 2
    assert await c.client.release("never-reserved") is False


async def test_check_add_and_mark_answer_in_op_order_across_owners(
        sock_dir: str, made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    ring = Ring(["a", "b", "c"])
    keys = [key_where(ring, owner, skip=n) for owner, n in (("c", 0), ("a", 0), ("b", 0), ("a", 1))]
    await nodes[0].client.add([msg(k, None, amount=i + 1) for i, k in enumerate(keys)])
    await nodes[1].client.mark([msg(keys[2], None, amount=10)])
    outcome = await nodes[2].client.check([msg(k, 12) for k in keys])
    assert outcome.counts == (1, 2, 13, 4)
    assert not outcome.ok and outcome.denied == 2


# -- leases ----------------------------------------------------------------------


async def settled(nodes: list[CounterNode], owner: CounterNode, key: str, expected: int) -> None:
    """Wait until no node holds a lease or tally, and the owner counts `expected`."""
    deadline = time.monotonic() + SETTLE
    while any(n.client._book.leases or n.client._book.tallies for n in nodes) or \
            count_in(owner.shard.snapshot(key)) != expected:
        assert time.monotonic() < deadline, (count_in(owner.shard.snapshot(key)), expected)
        await asyncio.sleep(0.02)


async def test_leases_never_admit_over_a_limit_and_give_back_what_is_not_spent(
        sock_dir: str, made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    ring = Ring(["a", "b", "c"])
    key = key_where(ring, "b")
    owner = nodes[1]
    replica = next(n for n in nodes if n.name == ring.replica(key))
    limit, accepted, lent = 300, 0, False
    for round_ in range(8):
        tries = await asyncio.gather(*(reserve_many(n, key, limit, 60, f"r{round_}")
                                       for n in nodes))
        lent = lent or any(n.client._book.leases for n in nodes)
        accepted += sum(len(rids) for rids in tries)
        assert accepted <= limit
        if round_ == 0:
            assert accepted == 180  # room for all: nothing held back
        # Once the leases end, the owner counts exactly what was admitted.
        await settled(nodes, owner, key, accepted)
        if accepted == limit:
            break
    assert lent, "a wide limit is lent"
    assert accepted == limit
    assert count_in(replica.shard.snapshot(key)) == limit


async def test_a_lease_spent_from_is_renewed_with_its_bucket_and_an_idle_one_is_not(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"])
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    decision = [msg(key, 1000)]
    to_a = b.links.peers["a"]
    admitted = 0

    async def decide() -> None:
        nonlocal admitted
        assert (await b.client.reserve(f"d{admitted}", decision)).ok
        admitted += 1

    async def spent_lease() -> Any:
        # The second decision in a second borrows, the next ones spend.
        deadline = time.monotonic() + SETTLE
        while True:
            assert time.monotonic() < deadline
            held = list(b.client._book.leases.values())
            if held and held[0].expires - time.time() <= 0.3:
                # Too close to its end: wait for the next one rather than spend
                # (decisions on a lease take microseconds; the limit would go first).
                await asyncio.sleep(0.01)
                continue
            if held and held[0].units > min(held[0].left):
                return held[0]
            await decide()

    lease = await spent_lease()
    # Ended with its second, it comes back renewed with no decision asking.
    deadline = time.monotonic() + SETTLE
    while True:
        assert time.monotonic() < deadline, "the spent lease was not renewed"
        held = list(b.client._book.leases.values())
        if held and held[0].lease_id != lease.lease_id and \
                held[0].expires - time.time() > 0.3:
            break
        if held and held[0].lease_id != lease.lease_id:
            lease = held[0]  # renewed too close to its end to test: spend it, wait again
            await decide()
        await asyncio.sleep(0.005)
    asked = to_a.requests
    await decide()  # on the renewed lease: nothing goes to the owner
    assert to_a.requests == asked
    # Not spent from in its bucket, the last lease goes back and is not renewed;
    # the owner then counts exactly what was admitted.
    await settled([a, b], a, key, admitted)
    await asyncio.sleep(1.2)
    assert not b.client._book.leases
    assert count_in(a.shard.snapshot(key)) == admitted == count_in(b.shard.snapshot(key))


async def hold_spent_lease(b: CounterNode, key: str, limit: int, tag: str) -> tuple[Any, int]:
    """Decide on `key` from `b` until it holds a lease spent from with 0.3 s or
    more to go; (the lease, decisions admitted)."""
    admitted = 0
    deadline = time.monotonic() + SETTLE
    while True:
        assert time.monotonic() < deadline, "no lease was lent"
        held = list(b.client._book.leases.values())
        if held and held[0].expires - time.time() <= 0.3:
            # Too close to its end: wait for the next one rather than spend
            # (decisions on a lease take microseconds; the limit would go first).
            await asyncio.sleep(0.01)
            continue
        if held and held[0].units > min(held[0].left):
            return held[0], admitted
        assert (await b.client.reserve(f"{tag}{admitted}", [msg(key, limit)])).ok
        admitted += 1


async def test_a_spent_lease_is_renewed_in_one_op_at_its_owner(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"])
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    to_a = b.links.peers["a"]
    deadline = time.monotonic() + SETTLE
    while True:
        assert time.monotonic() < deadline, "no lease was renewed whole"
        old, admitted = await hold_spent_lease(b, key, 1000, f"t{time.monotonic()}-")
        asked, book = to_a.requests, b.client._book
        renewing = False
        while True:  # until the renewal is answered
            assert time.monotonic() < deadline, "the spent lease was not renewed"
            new = book.leases.get(old.shape)
            if (new is not None and new is not old) or old.shape in book.refused or \
                    (renewing and old.shape not in book.asking):
                break
            renewing = renewing or old.shape in book.asking
            await asyncio.sleep(0.001)
        if new is not None and new is not old:
            break  # (else the owner lent nothing at that moment: try again)
    # Still within this turn of the loop, the new lease is unspent and not yet
    # returned: what went to the owner since the old one ended is the renewal.
    assert to_a.requests == asked + 1, "the return and the next lease in one op"
    unused = min(old.left)
    assert unused > 0 and new.units > 0
    for node in (a, b):  # the owner, and its replica through the answer
        assert records(node.shard, key)[old.lease_id] == "returned", node.name
        assert records(node.shard, key)[new.lease_id] == "open", node.name
    # What the owner counts: every decision once, the old lease's unused units
    # no more, the new lease's units all.
    spent = count_in(a.shard.snapshot(key)) - new.units
    assert spent == count_in(b.shard.snapshot(key)) - new.units
    assert (await b.client.reserve("after", [msg(key, 1000)])).ok
    assert to_a.requests == asked + 1  # decided on the renewed lease
    await settled([a, b], a, key, spent + 1)
    assert count_in(b.shard.snapshot(key)) == spent + 1


async def test_a_renewal_whose_answer_was_lost_gives_both_leases_back(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"], request_timeout=0.4)
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    book = b.client._book
    old, admitted = await hold_spent_lease(b, key, 1000, "d")
    assert min(old.left) > 0, "units left to give back"
    sent = a.links.send_router
    a.links.send_router = lambda ident, frame: True  # every answer of a's lost
    try:
        deadline = time.monotonic() + SETTLE
        while old.shape not in book.asking:  # the renewal went out...
            assert time.monotonic() < deadline, "the spent lease was not renewed"
            await asyncio.sleep(0.001)
        new_id = book.asking[old.shape][1][0]
        while old.shape in book.asking:  # ...and got no answer
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert not book.leases
        # The owner took the old lease back and lent the next one all the same.
        assert records(a.shard, key)[old.lease_id] == "returned"
        assert new_id in records(a.shard, key), "the next lease was lent"
    finally:
        a.links.send_router = sent
    # The next lease comes back whole, and the owner (and then its replica)
    # counts each decision once.
    await settled([a, b], a, key, admitted)
    assert records(a.shard, key)[new_id] == "returned"
    assert (await b.client.reserve("after", [msg(key, 1000)])).ok
    await settled([a, b], a, key, admitted + 1)
    assert count_in(b.shard.snapshot(key)) == admitted + 1


async def test_a_borrower_sees_its_own_spending_and_gives_back_what_it_releases(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"])
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    used = 0

    def recipients(n: int) -> list[Op]:
        return [Op(key, "msg", HOUR, 1000, n)]

    async def seen() -> int:
        # A MAIL-stage read: the count as the borrower sees it, its own unspent
        # units left out, whatever it holds of leases.
        return (await b.client.check(recipients(1))).counts[0]

    for rid, n in [("x1", 3), ("x2", 3), ("x3", 3), ("x4", 7), ("x5", 1)]:
        outcome = await b.client.reserve(rid, recipients(n))
        # The count before it, on leases too (shadow limits are judged by it).
        assert outcome.ok and outcome.counts == (used,), rid
        used += n
        assert await seen() == used, rid
    assert b.client._book.leases, "units were lent"
    assert await b.client.release("x2")
    used -= 3
    assert await seen() == used
    await settled([a, b], a, key, used)
    assert await b.client.release("x4")  # after its lease ended: taken back at the owner
    used -= 7
    await settled([a, b], a, key, used)
    assert await seen() == used


async def test_a_borrower_that_dies_leaves_its_lease_counted(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b, c = await start(made, sock_dir, ["a", "b", "c"], handoff_timeout=0.5)
    await form([a, b, c], 1)
    key = key_where(Ring(["a", "b", "c"]), "a")
    limit = 200
    b.client._ended = lambda ended: None  # like kill -9: nothing goes back
    # The second decision in a second borrows for the next ones.
    assert (await b.client.reserve("one", [msg(key, limit)])).ok
    assert (await b.client.reserve("two", [msg(key, limit)])).ok
    [lease] = b.client._book.leases.values()
    unspent = min(lease.left)
    assert unspent > 0
    made.remove(b)
    await b.close()
    await form([a, c], 2)
    for node in (a, c):
        node.client.leasing = False  # per message: what is left, exactly
    more = await asyncio.gather(*(reserve_many(n, key, limit, limit, "m") for n in (a, c)))
    assert sum(len(rids) for rids in more) == limit - 2 - unspent
    assert count_in(await a.inspect(key)) == limit


async def test_an_owner_that_dies_leaves_its_leases_with_its_replica(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b, c = await start(made, sock_dir, ["a", "b", "c"], handoff_timeout=0.5)
    await form([a, b, c], 1)
    key = key_where(Ring(["a", "b", "c"]), "a", "c")
    limit = 200
    spent = len(await reserve_many(b, key, limit, 20, "b"))
    assert spent == 20 and b.client._book.leases
    made.remove(a)
    await a.close()
    await form([b, c], 2)
    # The lease comes back to c, which held it as the replica.
    await settled([b, c], c, key, spent)
    more = await asyncio.gather(*(reserve_many(n, key, limit, limit, "m") for n in (b, c)))
    accepted = spent + sum(len(rids) for rids in more)
    assert accepted <= limit
    await settled([b, c], c, key, accepted)
    assert accepted == limit or accepted + sum(
        len(r) for r in await asyncio.gather(*(reserve_many(n, key, limit, limit, "z")
                                               for n in (b, c)))) == limit


async def test_nothing_is_lent_for_an_owner_whose_other_limit_is_small(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"])
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    # A wide message limit beside a small recipient limit on the same key: a
    # lease for the messages alone could never decide one here.
    decision = [msg(key, 1000), Op(key, "rcpt", HOUR, 14, 2)]
    accepted = sum([(await b.client.reserve(f"d{i}", decision)).ok for i in range(10)])
    assert accepted == 7
    assert not b.client._book.leases
    assert count_in(a.shard.snapshot(key)) == 7  # no units lent and held


async def test_a_lease_whose_answer_was_lost_is_given_back(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"], request_timeout=0.4)
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "a")
    assert (await b.client.reserve("one", [msg(key, 1000)])).ok
    sent = a.links.send_router
    a.links.send_router = lambda ident, frame: True  # every answer of a's lost
    try:
        with pytest.raises(CounterUnavailable):
            await b.client.reserve("two", [msg(key, 1000)])  # asks to borrow, too
        assert count_in(a.shard.snapshot(key)) > 2, "a counted the reservation and lent"
    finally:
        a.links.send_router = sent
    # The reservation is undone and whatever was lent comes back.
    await settled([a, b], a, key, 1)
    assert count_in(b.shard.snapshot(key)) == 1


# -- support -----------------------------------------------------------------------


async def test_reset_forgets_a_key_on_its_owner_and_replica(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b = await start(made, sock_dir, ["a", "b"], leasing=False)
    await form([a, b], 1)
    ring = Ring(["a", "b"])
    key, other = key_where(ring, "a"), key_where(ring, "b")
    assert (await b.client.reserve("early", [msg(key, 10), msg(other, 10)])).ok
    await a.client.add([msg(key, None, amount=4)])
    assert await b.client.reset([key, "ip:never.seen"]) == 1
    assert count_in(await a.inspect(key)) == 0
    assert a.shard.snapshot(key) == [] and b.shard.snapshot(key) == []
    assert await b.client.release("early")  # only its part on `other` is left
    assert count_in(await a.inspect(key)) == 0 and count_in(await a.inspect(other)) == 0
    assert await a.client.reset([key]) == 0
    await b.client.reserve("late", [msg(other, 10)])
    rows = await b.client.inspect([key, other])
    [row] = rows[other]
    assert rows[key] == [] and row["count"] == 1 and row["max"] == 10
    assert time.time() + HOUR < row["clears_at"] <= time.time() + HOUR + HOUR / 60


# -- failure ---------------------------------------------------------------------


async def test_an_owner_that_never_answers_is_unavailable_within_the_timeout(
        sock_dir: str, made: list[CounterNode], zctx: zmq.asyncio.Context) -> None:
    timeout = 0.4
    silent = zctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(f"ipc://{sock_dir}/silent.sock")
    heard: list[bytes] = []

    async def ignore() -> None:
        while True:
            heard.append((await silent.recv_multipart())[-1])

    listener = asyncio.create_task(ignore())
    try:
        (a,) = await start(made, sock_dir, ["a"], request_timeout=timeout, handoff_timeout=0.3)
        ring_members = [("a", a.endpoint), ("silent", f"ipc://{sock_dir}/silent.sock")]
        await a.apply_ring(1, ring_members)
        ring = Ring(["a", "silent"])

        began = time.monotonic()
        with pytest.raises(CounterUnavailable):
            await a.client.reserve("r1", [msg(key_where(ring, "silent"), 5)])
        elapsed = time.monotonic() - began
        print(f"unanswered owner: CounterUnavailable after {elapsed:.3f}s (timeout {timeout}s)")
        assert timeout * 0.9 <= elapsed < timeout + 2.0  # late timers on a loaded machine

        # A local decision whose replica is silent still gets its answer in time.
        assert await a.wait_active(SETTLE)
        local = key_where(ring, "a")
        began = time.monotonic()
        assert (await a.client.reserve("r2", [msg(local, 5)])).ok
        assert time.monotonic() - began < timeout
        assert any(isinstance(wire.decode(f), wire.Replicate) for f in heard)
    finally:
        listener.cancel()


async def test_a_new_member_takes_its_keys_and_limits_stay_exact(
        sock_dir: str, made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    keys = [f"acct:user{i}@example.org" for i in range(24)]
    limit, half = 10, 5
    early = await asyncio.gather(*(reserve_many(nodes[i % 3], k, limit, half, "e")
                                   for i, k in enumerate(keys)))
    assert all(len(rids) == half for rids in early)

    (d,) = await start(made, sock_dir, ["d"])
    everyone = [*nodes, d]
    moved = [k for k in keys if Ring(["a", "b", "c", "d"]).owner(k) == "d"]
    assert moved, "pick keys so that some move to the new member"

    async def load(key: str, tag: str) -> list[str]:
        tries = [reserve_many(node, key, limit, 3, tag) for node in everyone]
        return [rid for rids in await asyncio.gather(*tries) for rid in rids]

    # Ask while the ring changes under the requests, then again once it settled.
    change = asyncio.create_task(form(everyone, 2))
    late = await asyncio.gather(*(load(k, "l") for k in keys))
    await change
    late_more = await asyncio.gather(*(load(k, "m") for k in keys))
    for key, first, second in zip(keys, late, late_more, strict=False):
        assert len(first) + len(second) == half, key
        assert count_in(await d.inspect(key)) == limit
    # Reservations made before the change are found where their keys went.
    for key, rids in zip(keys, early, strict=False):
        maker = next(n for n in nodes if rids[0].startswith(f"e-{n.name}-"))
        assert all(await asyncio.gather(*(maker.client.release(r) for r in rids))), key
        assert count_in(await d.inspect(key)) == limit - half, key


async def test_a_leaving_member_hands_off_before_its_keys_are_served_elsewhere(
        sock_dir: str, made: list[CounterNode]) -> None:
    a, b, c = await start(made, sock_dir, ["a", "b", "c"])
    await form([a, b, c], 1)
    ring = Ring(["a", "b", "c"])
    keys = [key_where(ring, "a", skip=i) for i in range(8)]
    limit, half = 10, 5
    early = await asyncio.gather(*(reserve_many(b, k, limit, half, "e") for k in keys))
    assert all(len(rids) == half for rids in early)

    # The survivors switch first; the leaving member has not heard yet and
    # still counts its keys in epoch 1, so nobody else may count them.
    await asyncio.gather(b.apply_ring(2, members([b, c])), c.apply_ring(2, members([b, c])))
    assert not await b.wait_active(0.3) and not c.active()
    waiting = asyncio.gather(*(reserve_many(n, k, limit, 3, "w") for n in (b, c) for k in keys))
    by_a = await asyncio.gather(*(reserve_many(a, k, limit, 4, "a") for k in keys))
    assert all(len(rids) == 4 for rids in by_a)
    assert not waiting.done()

    await a.apply_ring(2, members([b, c]))
    assert await b.wait_active(SETTLE) and await c.wait_active(SETTLE)
    accepted = await waiting
    for i, key in enumerate(keys):
        assert sum(len(rids) for rids in accepted[i::len(keys)]) == half - 4, key
        assert count_in(await c.inspect(key)) == limit


async def test_a_killed_owner_is_replaced_by_its_replica_without_exceeding_limits(
        sock_dir: str, made: list[CounterNode]) -> None:
    # A long hand-off timeout: the survivors must not wait for the dead one.
    nodes = await start(made, sock_dir, ["a", "b", "c"], handoff_timeout=60.0)
    await form(nodes, 1)
    ring = Ring(["a", "b", "c"])
    victim, survivors = nodes[0], nodes[1:]
    keys = [key_where(ring, "a", skip=i) for i in range(8)] + [key_where(ring, "b")]
    limit, half = 10, 5
    early = await asyncio.gather(*(reserve_many(survivors[i % 2], k, limit, half, "e")
                                   for i, k in enumerate(keys)))
    assert all(len(rids) == half for rids in early)

    # Like kill -9: no hand-off, no goodbye.
    made.remove(victim)
    await victim.close()
    await form(survivors, 2)

    for i, (key, rids) in enumerate(zip(keys, early, strict=False)):
        accepted = await asyncio.gather(*(reserve_many(n, key, limit, limit, "l")
                                          for n in survivors))
        total = sum(len(r) for r in accepted)
        assert total <= half, f"{key}: {total} more admitted after failover"
        # Replication is synchronous, so nothing is lost either.
        assert total == half, key
        # And the survivors hold the early reservations themselves, to release.
        maker = survivors[i % 2]
        assert await maker.client.release(rids[0]), key
        assert count_in(await maker.inspect(key)) == limit - 1, key


async def test_a_member_restarted_under_its_name_gets_its_counts_back(
        sock_dir: str, made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    ring = Ring(["a", "b", "c"])
    owned = [key_where(ring, "a", skip=i) for i in range(4)]
    replicated = [key_where(ring, "b", "a", skip=i) for i in range(4)]
    limit, half = 10, 5
    used = await asyncio.gather(*(reserve_many(nodes[1], k, limit, half, "e")
                                  for k in owned + replicated))
    assert all(len(rids) == half for rids in used)

    # Killed and started again with the same name and socket, and the ring
    # that follows lists the same members: only the lost connection tells.
    made.remove(nodes[0])
    await nodes[0].close()
    again, b, c = *await start(made, sock_dir, ["a"]), nodes[1], nodes[2]
    deadline = time.monotonic() + SETTLE
    while not all(n.links.peers["a"].dropped for n in (b, c)):  # the monitors saw the loss
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await form([again, b, c], 2)

    for key in owned + replicated:
        more = await asyncio.gather(*(reserve_many(n, key, limit, limit, "m")
                                      for n in (again, b, c)))
        assert sum(len(rids) for rids in more) == half, key
    # The restarted member holds the keys it replicates again, too.
    assert all(count_in(again.shard.snapshot(k)) == limit for k in replicated)


def request(rid: str, kind: str, arg: str, ops: list[Op], extra: Any = None) -> bytes:
    return wire.encode(wire.CounterRequest([[rid, 1, kind, arg, ops, extra]]))


async def replies_to(dealer: zmq.asyncio.Socket, n: int) -> list[list[Any]]:
    """The next `n` answer items, whatever frames they come in."""
    items: list[list[Any]] = []
    while len(items) < n:
        reply = wire.decode(await asyncio.wait_for(dealer.recv(), SETTLE))
        assert isinstance(reply, wire.CounterReply)
        items += reply.items
    return items


async def test_a_repeated_request_is_counted_once(sock_dir: str, made: list[CounterNode],
                                                 zctx: zmq.asyncio.Context) -> None:
    a, b = await start(made, sock_dir, ["a", "b"], leasing=False)
    await form([a, b], 1)
    ring = Ring(["a", "b"])
    key = key_where(ring, "a")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(a.endpoint)
    try:
        requests = [
            request("same-add", "add", "", [msg(key, None)]),
            request("same-mark", "mark", "", [msg(key, None, amount=2)]),
            request("same-rsv", "reserve", "R1", [msg(key, 100)]),
        ]
        for frame in requests:
            # Twice back to back: the repeat arrives while the first waits for its replica.
            await dealer.send(frame)
            await dealer.send(frame)
        replies = await replies_to(dealer, 6)
        assert all(r[1] == wire.Status.OK for r in replies)
        reserved = [r for r in replies if r[0] == "same-rsv"]
        assert len(reserved) == 2 and reserved[0] == reserved[1]  # the first answer, twice
        await dealer.send(requests[0])  # and once more, long after
        assert (await replies_to(dealer, 1))[0][1] == wire.Status.OK
    finally:
        dealer.close()
    assert count_in(a.shard.snapshot(key)) == 4
    assert count_in(b.shard.snapshot(key)) == 4  # the replica, too

    first = await b.client.reserve("engine-rid", [msg(key, 100)])
    again = await b.client.reserve("engine-rid", [msg(key, 100)])
    assert first == again and first.ok
    assert count_in(await b.inspect(key)) == 5


async def test_a_replica_gets_only_the_reservation_a_request_changed(
        sock_dir: str, made: list[CounterNode], zctx: zmq.asyncio.Context) -> None:
    # A hot key holds thousands of live reservations: shipping them all with
    # every change would make each decision cost more the busier the key is.
    replica = zctx.socket(zmq.ROUTER)
    replica.setsockopt(zmq.LINGER, 0)
    replica.bind(f"ipc://{sock_dir}/replica.sock")
    shipped: list[Any] = []

    async def acknowledge() -> None:
        while True:
            ident, frame = await replica.recv_multipart()
            message = wire.decode(frame)
            if isinstance(message, wire.Replicate):
                shipped.append(message.data)
                await replica.send_multipart([ident, wire.encode(wire.ReplicateAck(message.rid))])

    listener = asyncio.create_task(acknowledge())
    try:
        (a,) = await start(made, sock_dir, ["a"], handoff_timeout=0.3)
        await a.apply_ring(1, [("a", a.endpoint), ("replica", f"ipc://{sock_dir}/replica.sock")])
        assert await a.wait_active(SETTLE)
        key = key_where(Ring(["a", "replica"]), "a", "replica")
        for i in range(50):
            assert (await a.client.reserve(f"hot{i}", [msg(key, None)])).ok
        assert len(shipped) == 50
        assert [[(r[0].split("/")[0], r[1]) for r in data[2]] for data in shipped[-2:]] == [
            [("hot48", "open")], [("hot49", "open")]]
        shipped.clear()
        assert await a.client.release("hot8")
        await a.client.add([msg(key, None)])
        assert [[(r[0].split("/")[0], r[1]) for r in data[2]] for data in shipped] == [
            [("hot8", "released")], []]
        assert all([name for name, _ in data[1]] == [key] for data in shipped)
    finally:
        listener.cancel()


def records(shard: CounterShard, key: str) -> dict[str, str]:
    """The state of each reservation and lease touching `key`, by id."""
    return {rid: state for rid, state, *_ in shard.export([key])[2]}


async def test_a_renew_request_returns_each_lease_and_lends_the_next_in_one_step(
        sock_dir: str, made: list[CounterNode], zctx: zmq.asyncio.Context) -> None:
    a, b = await start(made, sock_dir, ["a", "b"], leasing=False)
    await form([a, b], 1)
    ring = Ring(["a", "b"])
    wide, narrow = key_where(ring, "a"), key_where(ring, "a", skip=1)
    ops = [msg(wide, 1000, amount=0), msg(narrow, 10, amount=0)]
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(a.endpoint)

    async def ask(rid: str, item_ops: list[Op], asks: list[Any]) -> list[Any]:
        await dealer.send(request(rid, "renew", "", item_ops, asks))
        [reply] = await replies_to(dealer, 1)
        return reply

    try:
        # No lease to return yet (""): a plain lend, each shape on its own.
        first = await ask("n1", ops, [["L-wide", 8, [0], "", [0]], ["L-narrow", 8, [1], "", [0]]])
        # Too little room under the narrow limit: no lease there, the wide one all the same.
        assert first[1] == wire.Status.OK and [g[0] for g in first[5]] == [8, 0]
        assert a.shard.snapshot(narrow) == []
        assert (await ask("n2", ops, [["L-bad", 8, [5], "", [0]]]))[1] == wire.Status.ERROR
        # 3 units of L-wide were spent: the 5 others come back and 8 more are lent.
        renewed = await ask("n3", ops[:1], [["L-wide2", 8, [0], "L-wide", [5]]])
        assert renewed[1] == wire.Status.OK and renewed[5][0][0] == 8
        assert renewed[5][0][2] == [3]  # the next lease sees the count the return left
        for node in (a, b):  # replicated before the answer: the replica agrees
            assert count_in(node.shard.snapshot(wide)) == 11, node.name
            assert records(node.shard, wide) == {"L-wide": "returned", "L-wide2": "open"}
        # One bad renewal in an item: nothing of the item changes anything.
        broken = await ask("n4", ops[:1], [["L-wide3", 8, [0], "L-wide2", [2]],
                                           ["L-wide4", 8, [0], "", [1, 1]]])
        assert broken[1] == wire.Status.ERROR
        assert count_in(a.shard.snapshot(wide)) == 11
        assert records(a.shard, wide) == {"L-wide": "returned", "L-wide2": "open"}
        # Near the limit the old lease comes back and nothing more is lent.
        await dealer.send(request("fill", "add", "", [msg(wide, None, amount=940)]))
        await replies_to(dealer, 1)
        tight = await ask("n5", ops[:1], [["L-wide5", 8, [0], "L-wide2", [8]]])
        assert tight[1] == wire.Status.OK and tight[5][0][0] == 0
        for node in (a, b):
            assert count_in(node.shard.snapshot(wide)) == 943, node.name
            assert records(node.shard, wide) == {"L-wide": "returned",
                                                 "L-wide2": "returned"}
    finally:
        dealer.close()


async def test_a_moved_request_is_answered_moved_and_counts_nothing(
        sock_dir: str, made: list[CounterNode], zctx: zmq.asyncio.Context) -> None:
    a, b = await start(made, sock_dir, ["a", "b"])
    await form([a, b], 1)
    key = key_where(Ring(["a", "b"]), "b")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(a.endpoint)
    try:
        await dealer.send(request("x", "add", "", [msg(key, None)]))
        [reply] = await replies_to(dealer, 1)
    finally:
        dealer.close()
    assert reply[1] == wire.Status.MOVED
    assert a.shard.snapshot(key) == [] and b.shard.snapshot(key) == []


# -- security --------------------------------------------------------------------


async def test_ipc_sockets_need_a_private_folder(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)
    node = CounterNode("a", f"ipc://{sock_dir}/a.sock", CounterShard(), TIMEOUT)
    with pytest.raises(ValueError, match="0700"):
        await node.start()
    await node.close()


async def test_counter_nodes_talk_over_ipc_only(made: list[CounterNode]) -> None:
    node = CounterNode("a", "tcp://127.0.0.1:*", CounterShard(), TIMEOUT)
    with pytest.raises(ValueError, match="ipc://"):
        await node.start()
    await node.close()


# -- across processes --------------------------------------------------------------


def _child(name: str, folder: str, conn: Connection) -> None:
    import uvloop

    uvloop.run(_child_main(name, folder, conn))


async def _child_main(name: str, folder: str, conn: Connection) -> None:
    node = CounterNode(name, f"ipc://{folder}/{name}.sock", CounterShard(), TIMEOUT)
    await node.start()
    conn.send(node.endpoint)
    while True:
        command, *args = await asyncio.to_thread(conn.recv)
        if command == "ring":
            await node.apply_ring(*args)
            conn.send(await node.wait_active(SETTLE))
        elif command == "reserve":
            key, limit, n = args
            conn.send(len(await reserve_many(node, key, limit, n, "p")))
        else:
            await node.close()
            conn.send("closed")
            return


async def _ask(conn: Connection, *command: Any) -> Any:
    conn.send(command)

    def wait() -> Any:
        if not conn.poll(60):
            raise AssertionError(f"child did not answer {command[0]}")
        return conn.recv()

    return await asyncio.to_thread(wait)


@pytest.mark.integration
async def test_nodes_in_separate_processes(sock_dir: str, made: list[CounterNode]) -> None:
    spawn = multiprocessing.get_context("spawn")
    links, children = {}, {}
    for name in ("x", "y"):
        parent_end, child_end = spawn.Pipe()
        child = spawn.Process(target=_child, args=(name, sock_dir, child_end), daemon=True)
        child.start()
        links[name], children[name] = parent_end, child
    try:
        samples: list[tuple[float, bool]] = []
        (p,) = await start(made, sock_dir, ["p"], observe=lambda s, r: samples.append((s, r)))
        ring_members = [("p", p.endpoint)]
        for name, conn in links.items():
            ring_members.append((name, await asyncio.to_thread(conn.recv)))
        formed = await asyncio.gather(p.apply_ring(1, ring_members),
                                      *(_ask(c, "ring", 1, ring_members) for c in links.values()))
        assert formed[1:] == [True, True] and await p.wait_active(SETTLE)
        ring = Ring(["p", "x", "y"])

        # Three processes race on one key owned by one of the children.
        key, limit = key_where(ring, "x"), 60
        counts = await asyncio.gather(reserve_many(p, key, limit, 50, "p"),
                                      *(_ask(c, "reserve", key, limit, 50) for c in links.values()))
        assert len(counts[0]) + counts[1] + counts[2] == limit

        # A decision is observed as remote exactly when its owner is another process
        # (how long it takes: python -m loadtest.bench_counters).
        local, remote = key_where(ring, "p", "x"), key_where(ring, "x", "y")
        for target, crosses in ((local, False), (remote, True)):
            samples.clear()
            for i in range(20):
                assert (await p.client.reserve(f"obs-{target}-{i}", [msg(target, None)])).ok
            assert [remote_call for _, remote_call in samples] == [crosses] * 20

        # kill -9 of an owner in another process: its replica takes over with the counts.
        doomed = [key_where(ring, "y", skip=i) for i in range(6)]
        used = await asyncio.gather(*(reserve_many(p, k, 10, 5, "k") for k in doomed))
        assert all(len(rids) == 5 for rids in used)
        os.kill(children["y"].pid, signal.SIGKILL)
        children["y"].join(10)
        survivors = ring_members[:2]
        formed = await asyncio.gather(p.apply_ring(2, survivors), _ask(links["x"], "ring", 2,
                                                                         survivors))
        assert formed[1] is True and await p.wait_active(SETTLE)
        for k in doomed:
            more = await asyncio.gather(reserve_many(p, k, 10, 10, "m"),
                                        _ask(links["x"], "reserve", k, 10, 10))
            assert len(more[0]) + more[1] == 5, k
        assert await _ask(links["x"], "stop") == "closed"
    finally:
        for child in children.values():
            child.join(5)
            if child.is_alive():
                child.kill()
