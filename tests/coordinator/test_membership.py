"""Ring membership and epochs, without sockets: the coordinator's rules on their own."""

from __future__ import annotations

from coordinator.membership import Membership


def joined(members: Membership, name: str, pid: int, now: float = 0.0) -> None:
    members.started(name, pid, now)
    members.hello(name, pid, f"ipc:///run/w-{name}.sock", name.encode(), now)
    members.ready(name, name.encode(), now)


def test_each_change_of_members_is_one_new_epoch() -> None:
    members = Membership(0.0)
    assert members.next_ring(0.0) is None  # nobody yet: no empty ring published
    joined(members, "w0", 100)
    assert members.next_ring(0.0) == (1, [["w0", "ipc:///run/w-w0.sock"]])
    joined(members, "w1", 101)
    assert members.next_ring(0.0) == (2, [["w0", "ipc:///run/w-w0.sock"],
                                          ["w1", "ipc:///run/w-w1.sock"]])
    assert members.next_ring(0.0) is None
    members.leaving("w1")
    assert members.next_ring(0.0) == (3, [["w0", "ipc:///run/w-w0.sock"]])


def test_hello_without_ready_does_not_join_and_w10_sorts_after_w2() -> None:
    members = Membership(0.0)
    for index in (10, 2):
        joined(members, f"w{index}", 100 + index)
    members.hello("w3", 103, "ipc:///run/w-w3.sock", b"w3", 0.0)
    assert [name for name, _ in members.members()] == ["w2", "w10"]


def test_a_restarted_worker_replaces_its_old_process_and_stale_exits_are_ignored() -> None:
    members = Membership(0.0)
    joined(members, "w0", 100)
    joined(members, "w1", 101)
    members.next_ring(0.0)
    # The new process says Hello before the supervisor's "exited" for the old one arrives.
    members.hello("w1", 201, "ipc:///run/w-w1.sock", b"new", 1.0)
    assert members.next_ring(1.0) == (2, [["w0", "ipc:///run/w-w0.sock"]])
    members.exited("w1", 101)  # late news about the old pid
    members.ready("w1", b"new", 1.0)
    epoch, ring = members.next_ring(1.0) or (0, [])
    assert epoch == 3 and [name for name, _ in ring] == ["w0", "w1"]


def test_a_silent_member_leaves_after_the_silence_limit() -> None:
    members = Membership(0.0, silence=5.0)
    joined(members, "w0", 100)
    joined(members, "w1", 101)
    members.next_ring(0.0)
    members.report("w0", 100, {}, b"w0", 4.0)
    assert [w.name for w in members.expire(5.5)] == ["w1"]
    assert members.next_ring(5.5) == (2, [["w0", "ipc:///run/w-w0.sock"]])
    # It is not let back in by a late report: it must start over.
    assert members.report("w1", 101, {"member": True}, b"w1", 6.0) is None


def test_after_a_restart_members_come_back_from_reports_before_any_ring() -> None:
    members = Membership(0.0, first_epoch=7, recovery=2.5)
    members.started("w0", 100, 0.1)  # the supervisor's introduction may come first
    members.report("w0", 100, {"member": True, "ring_epoch": 9,
                               "endpoint": "ipc:///run/w-w0.sock"}, b"w0", 0.2)
    members.report("w1", 101, {"member": True, "ring_epoch": 9,
                               "endpoint": "ipc:///run/w-w1.sock"}, b"w1", 0.3)
    assert members.next_ring(1.0) is None and members.expire(2.0) == []
    # Newer than any epoch a worker applied, with the same members.
    assert members.next_ring(2.6) == (10, [["w0", "ipc:///run/w-w0.sock"],
                                           ["w1", "ipc:///run/w-w1.sock"]])
