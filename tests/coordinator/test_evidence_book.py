"""The coordinator's evidence of stolen passwords: distinct countries and spam in a window."""

from __future__ import annotations

import pytest

from cluster.settings import CompromiseSettings
from coordinator.evidence import BadNote, EvidenceBook

NOW = 1_700_000_000.0
HOUR = 3600.0
JAN = "jan@kowalski.pl"
SETTINGS = CompromiseSettings(window=HOUR, countries=3, spam_messages=3, suspend_for=86400.0,
                              notify_url="")


def login(book: EvidenceBook, country: str, at: float, account: str = JAN,
          now: float | None = None, settings: CompromiseSettings = SETTINGS):
    return book.note(settings, ["login", account, country, f"sid-{country}-{at:g}", at],
                     at if now is None else now)


def spam(book: EvidenceBook, at: float, account: str = JAN, now: float | None = None,
         settings: CompromiseSettings = SETTINGS):
    return book.note(settings, ["spam", account, f"q{at:g}", f"sid{at:g}", at],
                     at if now is None else now)


def test_the_third_distinct_country_in_the_window_is_an_incident() -> None:
    book = EvidenceBook()
    assert login(book, "PL", NOW) is None
    assert login(book, "PL", NOW + 10) is None          # the same country again
    assert login(book, "DE", NOW + 20) is None
    assert login(book, "DE", NOW + 30, account="anna@nowak.pl") is None  # another account
    incident = login(book, "US", NOW + 40)
    assert incident is not None
    assert (incident.account, incident.signal) == (JAN, "countries")
    assert incident.reason == "compromise: logins from 3 countries within 1h: DE, PL, US"
    assert incident.evidence["countries"] == ["DE", "PL", "US"]
    assert incident.evidence["logins"]["PL"]["sid"] == f"sid-PL-{NOW + 10:g}"  # the last one
    assert incident.evidence["logins"]["US"]["at"] == "2023-11-14T22:14:00Z"


def test_a_country_leaves_the_window_at_its_last_login() -> None:
    book = EvidenceBook()
    login(book, "PL", NOW)
    login(book, "DE", NOW + 100)
    # PL's only login is an hour old when US comes: two countries in the window.
    assert login(book, "US", NOW + HOUR) is None
    assert book.evidence(SETTINGS, JAN, NOW + HOUR)["countries"] == {
        "DE": "2023-11-14T22:15:00Z", "US": "2023-11-14T23:13:20Z"}
    # A fresh login from PL brings it back.
    assert login(book, "PL", NOW + HOUR + 1) is not None


def test_notes_arriving_out_of_order_or_late() -> None:
    book = EvidenceBook()
    login(book, "PL", NOW + 50, now=NOW + 50)
    login(book, "PL", NOW + 10, now=NOW + 60)   # an older login of the same country, later
    assert book.evidence(SETTINGS, JAN, NOW + HOUR + 40)["countries"] == {
        "PL": "2023-11-14T22:14:10Z"}
    # A note older than the window when it arrives is not evidence any more.
    assert login(book, "DE", NOW, now=NOW + HOUR + 5) is None
    assert "DE" not in book.evidence(SETTINGS, JAN, NOW + HOUR + 5)["countries"]
    # A time in the future (another host's clock) counts as now.
    login(book, "DE", NOW + 10 * HOUR, now=NOW + 100)
    assert book.evidence(SETTINGS, JAN, NOW + 100)["countries"]["DE"] == "2023-11-14T22:15:00Z"


def test_spam_messages_in_the_window() -> None:
    book = EvidenceBook()
    assert spam(book, NOW) is None
    assert spam(book, NOW + 1000) is None
    assert spam(book, NOW + HOUR + 1) is None       # the first has left the window
    incident = spam(book, NOW + HOUR + 2)
    assert incident is not None and incident.signal == "spam"
    assert incident.reason == "compromise: 3 spam messages within 1h"
    assert [m["queue_id"] for m in incident.evidence["spam"]] == [
        f"q{NOW + 1000:g}", f"q{NOW + HOUR + 1:g}", f"q{NOW + HOUR + 2:g}"]
    # Only the last few are kept, however many arrive.
    for n in range(100):
        spam(book, NOW + 2 * HOUR + n)
    assert book.evidence(SETTINGS, JAN, NOW + 2 * HOUR + 100)["spam_messages"] == 3


def test_a_signal_set_to_zero_is_not_watched() -> None:
    only_spam = CompromiseSettings(HOUR, 0, 2, 60.0, "")
    book = EvidenceBook()
    for country in ("PL", "DE", "US", "CN"):
        assert login(book, country, NOW, settings=only_spam) is None
    assert len(book) == 0
    assert spam(book, NOW, settings=only_spam) is None
    assert spam(book, NOW + 1, settings=only_spam) is not None


def test_the_signals_continue_after_an_incident_until_forgotten() -> None:
    book = EvidenceBook()
    for n, country in enumerate(("PL", "DE", "US")):
        login(book, country, NOW + n)
    # Evidence is kept: a later login (once a suspension has lapsed) is an incident again.
    assert login(book, "PL", NOW + 600) is not None
    assert book.forget(JAN) and not book.forget(JAN)
    assert login(book, "PL", NOW + 601) is None


def test_sweep_drops_accounts_with_nothing_in_the_window_and_memory_is_bounded() -> None:
    book = EvidenceBook(max_accounts=3)
    for n in range(5):
        login(book, "PL", NOW + n, account=f"u{n}@x.pl")
    assert len(book) == 3                 # u0 and u1, noted first, went first
    assert book.evidence(SETTINGS, "u0@x.pl", NOW + 5)["countries"] == {}
    assert book.evidence(SETTINGS, "u4@x.pl", NOW + 5)["countries"] != {}
    login(book, "DE", NOW + 1000, account="u2@x.pl")  # u2 noted again: now the freshest
    assert book.sweep(SETTINGS, NOW + HOUR + 10) == 2
    assert len(book) == 1 and book.evidence(SETTINGS, "u2@x.pl", NOW + HOUR + 10)["countries"]
    assert book.sweep(None, NOW) == 1 and len(book) == 0  # detection turned off


@pytest.mark.parametrize("note", [
    "login", ["login", JAN, "PL", "sid"], ["hack", JAN, "PL", "sid", NOW],
    ["login", "", "PL", "sid", NOW], ["login", JAN, 7, "sid", NOW],
    ["spam", JAN, "q", "sid", "yesterday"], ["spam", JAN, "q", "sid", float("nan")],
    ["spam", JAN, "q", "sid", True],
])
def test_a_malformed_note_is_refused(note: object) -> None:
    with pytest.raises(BadNote):
        EvidenceBook().note(SETTINGS, note, NOW)
