"""The coordinator's support state on disk: atomic tables, an append-only audit log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.support_state import AuditEntry, CountryException, SupportState, Suspension
from coordinator.state_store import AUDIT, EXCEPTIONS, SUSPENSIONS, FileStore, StoreError

NOW = 1_700_000_000.0


async def test_what_one_store_wrote_the_next_one_reads(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "deep"
    store = FileStore(folder)
    assert store.load_now() == SupportState()
    assert (folder.stat().st_mode & 0o777) == 0o700
    await store.put_suspension(Suspension("jan@kowalski.pl", "leaked", "anna", NOW))
    await store.put_suspension(Suspension("eve@kowalski.pl", "spam", "bob", NOW, NOW + 60))
    await store.put_exception(CountryException("kowalski.pl", "US", "trip", "anna", NOW,
                                               NOW + 7 * 86400))
    await store.drop_suspension("eve@kowalski.pl")
    await store.record(AuditEntry(NOW, "anna", "suspend", "jan@kowalski.pl", "kowalski.pl",
                                  "leaked"))
    await store.record(AuditEntry(NOW + 1, "anna", "allow-country", "nowak.pl", "nowak.pl",
                                  until=NOW + 5, details={"country": "DE"}))
    assert sorted(os.listdir(folder)) == sorted([SUSPENSIONS, EXCEPTIONS, AUDIT])  # no temp

    again = FileStore(folder).load_now()
    assert list(again.suspensions) == ["jan@kowalski.pl"]
    assert again.suspension("jan@kowalski.pl", NOW + 1e9) == Suspension(
        "jan@kowalski.pl", "leaked", "anna", NOW)
    assert again.extra_countries("kowalski.pl", NOW + 86400) == {"US"}
    assert again.extra_countries("kowalski.pl", NOW + 8 * 86400) == frozenset()
    [entry] = await FileStore(folder).history("nowak.pl")
    assert (entry.action, entry.until, dict(entry.details)) == ("allow-country", NOW + 5,
                                                               {"country": "DE"})


async def test_a_torn_audit_line_is_skipped(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.record(AuditEntry(NOW, "anna", "suspend", "a@x.pl", "x.pl", "r"))
    with open(tmp_path / AUDIT, "ab") as handle:
        handle.write(b'{"ts": 17000, "by": "an')  # a crash in the middle of a write
    await store.record(AuditEntry(NOW + 2, "anna", "unsuspend", "a@x.pl", "x.pl"))
    assert [e.action for e in await store.history("x.pl")] == ["suspend", "unsuspend"]


@pytest.mark.parametrize("text, problem", [
    ("{", "is not valid JSON"),
    ('{"version": 9, "items": []}', "is not a sendguard state file of version 1"),
    ('{"version": 1, "items": [{"account": "a@x.pl"}]}', "reason must be a string"),
    ('{"version": 1, "items": [{"account": "a@x.pl", "reason": "r", "by": "b", "at": "now"}]}',
     "a time must be a number of seconds"),
])
def test_a_bad_table_is_refused_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / SUSPENSIONS).write_text(text)
    with pytest.raises(StoreError) as caught:
        FileStore(tmp_path).load_now()
    assert str(caught.value).startswith(f"{tmp_path / SUSPENSIONS}: ")
    assert problem in str(caught.value)


def test_the_state_travels_to_workers_and_back() -> None:
    state = SupportState().with_suspension(Suspension("a@x.pl", "r", "b", NOW, NOW + 1))
    state = state.with_exception(CountryException("x.pl", "DE", "", "b", NOW, NOW + 10))
    wire = json.loads(json.dumps(state.to_wire()))
    assert SupportState.from_wire(wire) == state
    assert state.lapsed(NOW + 5) == ([state.suspensions["a@x.pl"]], [])
    assert state.without_exception("x.pl", "DE").exceptions == {}
    with pytest.raises(ValueError):
        SupportState.from_wire({"suspensions": "nope"})
