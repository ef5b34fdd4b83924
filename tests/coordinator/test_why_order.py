"""The decisions of a session from several workers, merged in the order they were made."""

from __future__ import annotations

from coordinator.why import _moment


def test_a_decision_on_a_whole_second_sorts_before_later_ones_of_that_second() -> None:
    # Decision lines leave out the milliseconds on a whole second: as text,
    # "13Z" sorts after "13.004Z".
    auth = {"ts": "2026-12-05T18:39:13Z", "stage": "AUTH"}
    mail = {"ts": "2026-12-05T18:39:13.004Z", "stage": "MAIL"}
    connect = {"ts": "2026-12-05T18:39:12.999Z", "stage": "CONNECT"}
    merged = sorted([mail, auth, connect], key=_moment)
    assert [d["stage"] for d in merged] == ["CONNECT", "AUTH", "MAIL"]


def test_a_decision_without_a_readable_time_goes_first_rather_than_failing() -> None:
    assert _moment({"ts": "yesterday"}) == 0.0
    assert _moment({}) == 0.0
