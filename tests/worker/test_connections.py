"""The connection table's arithmetic (worker/connections.py) and the coordinator's board.

Real processes and sockets are in tests/integration/test_connection_cap.py;
these pin the rules with an injected clock: what is reported, how the other
workers of the host are added up, and that nothing stale is kept.
"""

from __future__ import annotations

from coordinator.connections import ConnectionBoard, table_of
from coordinator.membership import Worker
from worker.connections import REPORT_FROM, STALE_AFTER, ConnectionTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_alone_is_exact() -> None:
    table = ConnectionTable()
    assert all(table.admit("203.0.113.7", 3) for _ in range(3))
    assert not table.admit("203.0.113.7", 3)
    assert table.admit("203.0.113.8", 3)
    table.release("203.0.113.7")
    assert table.admit("203.0.113.7", 3)
    assert table.admit("203.0.113.7", 0)  # 0: no cap


def test_only_keys_held_several_times_are_reported() -> None:
    table = ConnectionTable()
    table.admit("a", 10)
    assert table.report() == {} and not table.near_cap.is_set()
    for _ in range(REPORT_FROM - 1):
        table.admit("a", 10)
    assert table.report() == {"a": REPORT_FROM}
    assert not table.near_cap.is_set()  # in the next regular report: far from the cap
    while table.held("a") < 5:
        table.admit("a", 10)
    assert table.near_cap.is_set()  # half the cap: reported early
    for _ in range(4):
        table.release("a")
    assert table.report() == ({} if REPORT_FROM > 1 else {"a": 1})


def test_a_key_another_worker_reported_is_reported_whole() -> None:
    table = ConnectionTable()
    table.admit("a", 10)
    table.admit("b", 10)
    assert table.report() == {} and not table.near_cap.is_set()
    table.update({"w1": {"a": 4, "b": 2}}, "w0")
    assert table.report() == {"a": 1, "b": 1}
    assert table.near_cap.is_set()  # "a" is at half the cap on the host: reported early
    table.admit("a", 10)
    assert table.report() == {"a": 2, "b": 1}


def test_the_other_workers_count() -> None:
    clock = Clock()
    table = ConnectionTable(clock)
    table.update({"w0": {"a": 5}, "w1": {"a": 2, "b": 2}, "w2": {"a": 1}}, "w0")
    assert table.others("a") == 3 and table.others("b") == 2  # not its own report
    table.admit("a", 5)
    assert table.held("a") == 1
    assert not table.admit("a", 4)  # 1 here + 3 elsewhere


def test_published_counts_go_stale() -> None:
    clock = Clock()
    table = ConnectionTable(clock)
    table.update({"w1": {"a": 3}}, "w0")
    assert not table.admit("a", 3)
    clock.now += STALE_AFTER + 0.1
    table.expire()
    assert table.others("a") == 0 and table.admit("a", 3)


def test_the_board_publishes_live_workers_tables_only() -> None:
    board = ConnectionBoard()
    alive = Worker("w1", 42, report={"connections": {"a": 2, "bad": "x", "neg": -1}})
    quiet = Worker("w0", 41, report={"sessions_open": 3})
    tables = board.collect([alive, quiet])
    assert tables == {"w1": {"a": 2}}
    assert board.due(tables) and board.changed(tables)
    board.published(tables)
    assert not board.changed(tables)
    # The worker died: its table goes with it, and one empty publication says so.
    assert board.collect([quiet]) == {} and board.due({})
    board.published({})
    assert not board.due({})
    assert table_of({"connections": [1, 2]}) == {}
