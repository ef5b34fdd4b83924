"""A worker's memory of recent decisions: what ``why`` reads, bounded by count and age."""

from __future__ import annotations

from worker.recent import RecentDecisions


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def decide(memory: RecentDecisions, sid: str, stage: str = "MAIL", **extra: object) -> None:
    memory.add(sid, "203.0.113.7", "PL", "jan@kowalski.pl", stage, "rate_limit", "reject",
               f"550 5.1.0 {sid} policy violation", "acct:jan@kowalski.pl 1h 3/3", extra)


def test_a_session_reads_back_in_order_with_its_extras() -> None:
    clock = Clock()
    memory = RecentDecisions(100, 3600, clock)
    memory.add("s1", "203.0.113.7", "PL", None, "AUTH", "auth", "reject", "535 no", "wrong "
               "password", {"account": "ignored"})
    clock.now += 0.25
    decide(memory, "s1", key="acct:jan@kowalski.pl", window="1h", count=3, max=3,
           clears_at="2023-11-14T23:13:20Z", symbols=["A", "B"], score=1.5)
    decide(memory, "other")
    first, second = memory.session("s1")
    assert first == {"ts": "2023-11-14T22:13:20Z", "sid": "s1", "client_ip": "203.0.113.7",
                     "country": "PL", "account": None, "stage": "AUTH", "policy": "auth",
                     "verdict": "reject", "reply": "535 no", "detail": "wrong password"}
    assert second["ts"] == "2023-11-14T22:13:20.250Z" and second["account"] == "jan@kowalski.pl"
    assert {k: second[k] for k in ("key", "window", "count", "max", "clears_at", "symbols",
                                   "score")} == {
        "key": "acct:jan@kowalski.pl", "window": "1h", "count": 3, "max": 3,
        "clears_at": "2023-11-14T23:13:20Z", "symbols": ["A", "B"], "score": 1.5}
    assert memory.session("unknown") == []
    assert len(memory) == 3


def test_the_oldest_sessions_go_first_when_over_the_count() -> None:
    memory = RecentDecisions(5, 3600, Clock())
    for n in range(4):
        decide(memory, f"s{n}", stage="AUTH")
        decide(memory, f"s{n}", stage="MAIL")
    assert len(memory) <= 5
    assert memory.session("s0") == [] and memory.session("s1") == []
    assert [d["stage"] for d in memory.session("s3")] == ["AUTH", "MAIL"]


def test_sessions_older_than_the_age_bound_are_forgotten() -> None:
    clock = Clock()
    memory = RecentDecisions(1000, 60, clock)
    decide(memory, "old")
    clock.now += 30
    decide(memory, "newer")
    clock.now += 31
    decide(memory, "newest")
    assert memory.session("old") == []
    assert memory.session("newer") and memory.session("newest")
    assert len(memory) == 2


def test_zero_keeps_nothing_and_an_unpackable_extra_keeps_the_decision() -> None:
    off = RecentDecisions(0, 60, Clock())
    decide(off, "s")
    assert off.session("s") == [] and len(off) == 0
    memory = RecentDecisions(10, 60, Clock())
    decide(memory, "s", odd=object())
    [decision] = memory.session("s")
    assert decision["verdict"] == "reject" and "odd" not in decision
