"""Rate-limit ops and judging against a real counter shard: recipients and shadow limits."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.counting import Op
from cluster.keys import MESSAGES, RECIPIENTS
from cluster.settings import parse_settings
from cluster.tenants import parse_tenants
from worker.client import Client
from worker.counters.shard import CounterShard
from worker.policies import Action
from worker.policies.base import Counts, Decision
from worker.policies.rate_limit import RateLimitPolicy
from worker.snapshot import Snapshot

SID = "A" * 22
T = TypeVar("T")


def snapshot(limits: list[dict[str, Any]], account_limits: list[dict[str, Any]] | None = None
             ) -> Snapshot:
    path = Path("/nonexistent/sendguard.toml")
    settings = parse_settings(path, {"tenants": {"file": "tenants.toml"}, "limits": limits})
    account: dict[str, Any] = {"password": "{PLAIN}x"}
    if account_limits is not None:
        account["limits"] = account_limits
    tenants = parse_tenants(path, {"domains": {"kowalski.pl": {}},
                                   "accounts": {"jan@kowalski.pl": account}})
    return Snapshot(settings, tenants, None)


def client(snap: Snapshot, trusted: bool = False) -> Client:
    return Client(SID, "127.0.0.5", "127.0.0.5", trusted,
                  account=snap.tenants.account("jan@kowalski.pl"))


def at_mail(snap: Snapshot, c: Client) -> Decision:
    return Decision(snap, c, "MAIL", sender="jan@kowalski.pl")


def at_data(snap: Snapshot, c: Client, recipients: int = 1) -> Decision:
    return Decision(snap, c, "DATA", sender="jan@kowalski.pl",
                    rcpt_tos=tuple(f"r{n}@example.org" for n in range(recipients)))


def shadows(decision: Decision) -> list[str]:
    return [verdict.detail for verdict, _ in decision.shadows]


@pytest.fixture
def shard() -> CounterShard:
    return CounterShard()


def test_each_count_has_its_own_series(shard: CounterShard) -> None:
    snap = snapshot([{"window": "1h", "max": 3},
                     {"window": "1h", "max": 10, "count": "recipients"}])
    ops = RateLimitPolicy().ops(at_data(snap, client(snap), recipients=4))
    assert ops == [Op("ip:127.0.0.5", MESSAGES, 3600.0, 3, 1),
                   Op("ip:127.0.0.5", RECIPIENTS, 3600.0, 10, 4),
                   Op("acct:jan@kowalski.pl", MESSAGES, 3600.0, 3, 1),
                   Op("acct:jan@kowalski.pl", RECIPIENTS, 3600.0, 10, 4)]
    assert shard.reserve("m1", ops).ok
    # 1 message and 4 recipients counted apart: were they one counter, it would hold 5.
    assert [row["count"] for row in shard.snapshot("ip:127.0.0.5")] == [1, 4]


def test_recipients_are_judged_as_one_amount(shard: CounterShard) -> None:
    policy = RateLimitPolicy()
    snap = snapshot([{"window": "1h", "max": 5, "count": "recipients"}])
    c = client(snap, trusted=True)  # the account key alone
    assert shard.reserve("m1", policy.ops(at_data(snap, c, recipients=3))).ok
    over = shard.reserve("m2", policy.ops(at_data(snap, c, recipients=3)))
    assert not over.ok and over.counts == (3,)
    assert shard.reserve("m3", policy.ops(at_data(snap, c, recipients=2))).ok
    # At MAIL the recipients are unknown: refused once the window is full.
    mail = at_mail(snap, c)
    mail_ops = policy.ops(mail)
    outcome = shard.check(mail_ops)
    verdict = await_(policy.judge(mail, Counts(mail_ops, outcome.counts, outcome.denied)))
    assert verdict.action is Action.REJECT
    assert verdict.reply == f"550 5.1.0 {SID} policy violation"
    assert verdict.detail == "acct:jan@kowalski.pl 1h 5/5"
    assert (mail.found["key"], mail.found["window"], mail.found["count"], mail.found["max"]) == (
        "acct:jan@kowalski.pl", "1h", 5, 5)


def test_a_shadow_limit_counts_but_never_makes_a_reservation_fail(shard: CounterShard) -> None:
    policy = RateLimitPolicy()
    snap = snapshot([{"window": "1h", "max": 1, "mode": "shadow"}])
    c = client(snap, trusted=True)
    for n in range(4):
        data = at_data(snap, c)
        ops = policy.ops(data)
        assert ops == [Op("acct:jan@kowalski.pl", MESSAGES, 3600.0, None, 1)]
        outcome = shard.reserve(f"m{n}", ops)
        assert outcome.ok and outcome.counts == (n,)
        assert await_(policy.judge(data, Counts(ops, outcome.counts, outcome.denied))).ok
        assert shadows(data) == ([] if n < 1 else [f"acct:jan@kowalski.pl 1h {n}/1"])
    assert shard.snapshot("acct:jan@kowalski.pl")[0]["count"] == 4


def test_shadow_beside_an_enforced_limit_of_the_same_window_shares_its_counter(
        shard: CounterShard) -> None:
    policy = RateLimitPolicy()
    snap = snapshot([{"window": "1h", "max": 1, "mode": "shadow"}, {"window": "1h", "max": 3}])
    c = client(snap, trusted=True)
    ops = policy.ops(at_data(snap, c))
    # One op: two on one counter would add the message twice and halve the real limit.
    assert ops == [Op("acct:jan@kowalski.pl", MESSAGES, 3600.0, 3, 1)]
    results = [shard.reserve(f"m{n}", ops) for n in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    judged = []
    for result in results[:3]:
        data = at_data(snap, c)
        assert await_(policy.judge(data, Counts(ops, result.counts, result.denied))).ok
        judged.append(len(shadows(data)))
    assert judged == [0, 1, 1]
    assert shard.snapshot("acct:jan@kowalski.pl")[0]["count"] == 3


def test_a_refused_reservation_counts_nothing_in_its_shadow_windows(shard: CounterShard) -> None:
    policy = RateLimitPolicy()
    snap = snapshot([{"window": "1m", "max": 1}, {"window": "1h", "max": 0, "mode": "shadow"}])
    c = client(snap, trusted=True)
    assert shard.reserve("m1", policy.ops(at_data(snap, c))).ok
    refused = at_data(snap, c)
    ops = policy.ops(refused)
    outcome = shard.reserve("m2", ops)
    assert not outcome.ok
    verdict = await_(policy.judge(refused, Counts(ops, outcome.counts, outcome.denied)))
    assert verdict.detail == "acct:jan@kowalski.pl 60s 1/1"  # the owner's refusal, as at DATA
    assert shadows(refused) == []
    counts = {row["window"]: row["count"] for row in shard.snapshot("acct:jan@kowalski.pl")}
    assert counts == {60.0: 1, 3600.0: 1}


def test_a_tenant_list_replaces_the_global_one_for_the_account_only(shard: CounterShard) -> None:
    snap = snapshot([{"window": "1h", "max": 100}],
                    [{"window": "1h", "max": 7, "count": "recipients", "mode": "shadow"}])
    assert RateLimitPolicy().ops(at_data(snap, client(snap), recipients=2)) == [
        Op("ip:127.0.0.5", MESSAGES, 3600.0, 100, 1),
        Op("acct:jan@kowalski.pl", RECIPIENTS, 3600.0, None, 2)]


def test_a_shadow_verdict_per_message_not_per_stage() -> None:
    policy = RateLimitPolicy()
    snap = snapshot([{"window": "1h", "max": 1, "mode": "shadow"},
                     {"window": "1h", "max": 4, "count": "recipients", "mode": "shadow"}])
    c = client(snap, trusted=True)
    mail = at_mail(snap, c)
    assert await_(policy.judge(mail, Counts(policy.ops(mail), (1, 0)))).ok
    assert [(v.action, v.reply, v.detail) for v, _ in mail.shadows] == [
        (Action.SHADOW, f"550 5.1.0 {SID} policy violation", "acct:jan@kowalski.pl 1h 1/1")]
    data = at_data(snap, c, recipients=5)
    assert await_(policy.judge(data, Counts(policy.ops(data), (1, 0)))).ok
    # The message limit again is not repeated; 5 recipients over 4 is new.
    assert shadows(data) == ["acct:jan@kowalski.pl 1h 0/4"]
    # The next transaction starts afresh.
    again = at_data(snap, c, recipients=5)
    assert await_(policy.judge(again, Counts(policy.ops(again), (1, 0)))).ok
    assert len(again.shadows) == 2


def await_(coroutine: Coroutine[Any, Any, T]) -> T:
    """A policy's judgement that needs nothing from the outside, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the judgement waited for something")
