"""Decoding checks every field of every message type against the type its dataclass declares."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from cluster import admin_wire as aw
from cluster import wire


def frame(kind: str, *values: Any) -> bytes:
    return msgpack.packb([kind, wire.PROTOCOL_VERSION, *values], use_bin_type=True)


def test_every_message_type_has_a_reader_for_each_field() -> None:
    for cls in set(wire._TYPES.values()):
        assert len(wire._readers_of(cls)) == len(dataclasses.fields(cls)), cls.TYPE


@pytest.mark.parametrize("message", [
    wire.CounterRequest([["r1", 3, "reserve", "res", [["ip:192.0.2.1", "msg", 60.0, 5, 1, None]],
                          None]]),
    wire.RingMessage(4, [["w0", "ipc:///run/w0"], ["w1", "ipc:///run/w1"]]),
    wire.SnapshotMessage(2, "/etc/sg.toml", {"server": {}}, {}, "abc", None, ""),
    wire.SnapshotMessage(5, "/etc/sg.toml", {}, {}, "abc", b"db", "v1", {"suspensions": []}, 3),
    wire.SupportSnapshot(6, 3, {"suspensions": [], "exceptions": []}),
    wire.MetricsReport("w0", 10, {"accepted": 3}),
    aw.QueueRequest("purge", ip="192.0.2.1", bounce=True, by="ops"),
    aw.StatusReply(1, 2, 2, 3, ["w0"], 4, "/etc/sg.toml", "v", 1, 2, "", [{"name": "w0"}]),
    aw.AdminFailed("no such account", aw.NOT_FOUND),
    aw.WorkerQueueRequest("hold", ids=["Q1"], rid="r9"),
    aw.WorkerInspectReply("r9", "w1", {"ip:192.0.2.1": [{"series": "msg", "count": 2}]}),
    aw.WorkerAdoptReply("r9", "w0", {"w3": 12}, ["w4"]),
    aw.WorkerFailed("r9", "w0", "w0 has not loaded its spool yet"),
])
def test_round_trip(message: wire.Message) -> None:
    assert wire.decode(wire.encode(message)) == message


@pytest.mark.parametrize(("data", "error"), [
    (frame("counter", "r1"), "items must be a list"),
    (frame("counter", ["r1"]), "items[] must be a list"),
    (frame("hello", "w0", True, "ipc:///x"), "pid must be an integer"),
    (frame("ring", 1, [["w0", 5]]), "members[][] must be a string"),
    (frame("ring", 1, "w0"), "members must be a list"),
    (frame("snapshot", 1, "/c", {}, {}, "v", "not bytes", "", {}, 1), "geoip must be bytes"),
    (frame("support-snapshot", 2, "1", {}), "base must be an integer"),
    (frame("support-snapshot", 2, 1, []), "support must be a map"),
    (frame("metrics", "w0", 1, {3: "x"}), "values key must be a string"),
    (frame("admin-scale", "4"), "workers must be an integer"),
    (frame("admin-queue", "list", None, "id1", None, None, False, None, None),
     "ids must be a list"),
    (frame("admin-suspend", "a@b.pl", "ops", 12, None), "reason must be a string"),
    (frame("worker-reset-reply", "r9", "w0", "3", ["w1"]), "cleared must be an integer"),
    (frame("worker-why-reply", "r9", "w0", [{"stage": "MAIL"}], ["kept"]), "kept must be a map"),
])
def test_a_field_of_the_wrong_type_is_refused(data: bytes, error: str) -> None:
    with pytest.raises(wire.WireError, match=error.replace("[", r"\[").replace("]", r"\]")):
        wire.decode(data)


def test_the_field_count_is_still_checked() -> None:
    with pytest.raises(wire.WireError, match="2 fields, expected 3"):
        wire.decode(frame("hello", "w0", 1))


def test_reply_json_keeps_only_the_keys_a_command_has() -> None:
    ip = aw.InspectSubjectReply("ip", ["ip:192.0.2.1"], "w0", [], auth_failures={"count": 0},
                                bounce={"accepted": 0})
    assert set(ip.to_json()) == {"keys", "worker", "rows", "auth_failures", "bounce"}
    account = aw.InspectSubjectReply("account", ["acct:a@b.pl"], "w0", [])
    assert account.to_json() == {"keys": ["acct:a@b.pl"], "worker": "w0", "rows": [],
                                 "suspension": None}
    lifted = aw.SuspensionReply("a@b.pl", False, True)
    assert lifted.to_json() == {"account": "a@b.pl", "suspended": False, "changed": True}
    made = aw.SuspensionReply("a@b.pl", True, True, "spam", "ops", "2026-01-01T00:00:00Z")
    assert made.to_json()["until"] is None
    countries = aw.CountriesReply("b.pl", ["PL"], [], "v", 3)
    assert "changed" not in countries.to_json()
    purged = aw.QueueReply("purge", ["w0"], {}, messages=[], touched=0, per_worker={},
                           client="192.0.2.1", bounce=False)
    assert purged.to_json()["bounce"] is False and "ids" not in purged.to_json()
