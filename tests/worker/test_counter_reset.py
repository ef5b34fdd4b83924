"""``counters reset``: every counter of a key, on its owner and its replica, exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from test_counter_node import HOUR, count_in, form, key_where, msg, sock_dir, start  # noqa: F401

from cluster.counting import Op
from cluster.ring import Ring
from worker.counters.node import CounterNode
from worker.counters.shard import CounterShard


@pytest.fixture
async def made() -> AsyncIterator[list[CounterNode]]:
    nodes: list[CounterNode] = []
    yield nodes
    await asyncio.gather(*(node.close() for node in nodes))


def test_a_shard_reset_forgets_the_key_and_keeps_later_counts_out_of_old_undos() -> None:
    now = [1000.0]
    shard = CounterShard(clock=lambda: now[0])
    shard.add([msg("acct:a@x", None), Op("acct:a@x", "fail", 60.0, None)])
    assert shard.reserve("r1", [msg("acct:a@x", 10), msg("ip:1.2.3.4", 10)]).ok
    shard.add([msg("ip:9.9.9.9", None)])
    assert shard.reset(["acct:a@x", "acct:nobody@x"]) == 2
    assert shard.snapshot("acct:a@x") == []
    assert count_in(shard.snapshot("ip:1.2.3.4")) == 1
    # A message after the reset, then the old reservation released: the new count stays.
    shard.add([msg("acct:a@x", None)])
    assert shard.release("r1")
    assert count_in(shard.snapshot("acct:a@x")) == 1
    assert count_in(shard.snapshot("ip:1.2.3.4")) == 0
    assert count_in(shard.snapshot("ip:9.9.9.9")) == 1
    # Eviction still works for keys that were reset and came back.
    now[0] += 2 * HOUR
    assert shard.expire() >= 1
    assert len(shard) == 0


async def test_a_reset_clears_owner_and_replica_once(sock_dir: str,  # noqa: F811
                                                     made: list[CounterNode]) -> None:
    nodes = await start(made, sock_dir, ["a", "b", "c"])
    await form(nodes, 1)
    by_name = {node.name: node for node in nodes}
    ring = Ring(["a", "b", "c"])
    key = key_where(ring, "b", "c")
    other = key_where(ring, "a", "b")
    for _ in range(5):
        assert (await by_name["a"].client.reserve(f"m{_}", [msg(key, 10), msg(other, 10)])).ok
    assert count_in(by_name["c"].shard.snapshot(key)) == 5  # the replica has them

    # Asked from the node that owns neither key; each owner's replica applies it too.
    cleared, owners = await by_name["c"].reset([key, other], "reset-1")
    assert (cleared, owners) == (2, ["a", "b"])
    for node in nodes:
        assert count_in(node.shard.snapshot(key)) == 0
        assert count_in(node.shard.snapshot(other)) == 0

    # New mail counts again; the same reset asked again (a retry) changes nothing.
    assert (await by_name["a"].client.reserve("m9", [msg(key, 10)])).ok
    assert await by_name["a"].reset([key, other], "reset-1") == (2, ["a", "b"])
    assert count_in(by_name["b"].shard.snapshot(key)) == 1
    assert count_in(by_name["c"].shard.snapshot(key)) == 1

    # A new reset is a new one; the limit is whole again on the owner and its replica.
    assert (await by_name["a"].reset([key], "reset-2"))[0] == 1
    accepted = await asyncio.gather(*(by_name["a"].client.reserve(f"n{i}", [msg(key, 10)])
                                      for i in range(12)))
    assert sum(outcome.ok for outcome in accepted) == 10
    assert count_in(by_name["c"].shard.snapshot(key)) == 10
