"""``sendguard tenant allow-country``: one line changes, the operator's file stays theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.tenant_edit import EditError, edit_countries

TENANTS = """# Managed by hand. Keep the comments.
[domains."kowalski.pl"]   # the Kowalski family
aliases = ["kowalski.com.pl"]
countries = [
    "PL",  # home
    "DE",
]

[domains."zażółć.pl"]

[accounts."jan@kowalski.pl"]
password = "{PLAIN}secret"
"""
DEFAULT = frozenset({"PL"})


@pytest.fixture
def tenants(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    return path


def test_allow_rewrites_only_the_countries_of_that_domain(tenants: Path) -> None:
    result = edit_countries(tenants, "Kowalski.PL", "us", True, DEFAULT)
    assert (result.domain, result.countries, result.changed) == ("kowalski.pl",
                                                                 ("DE", "PL", "US"), True)
    assert tenants.read_text() == TENANTS.replace(
        'countries = [\n    "PL",  # home\n    "DE",\n]\n', 'countries = ["DE", "PL", "US"]\n')


def test_a_domain_on_the_default_gets_its_own_list_under_its_header(tenants: Path) -> None:
    result = edit_countries(tenants, "xn--za-6ja4f8n1l.pl", "DE", True, DEFAULT)
    assert result.countries == ("PL", "DE")
    assert '[domains."zażółć.pl"]\ncountries = ["PL", "DE"]\n' in tenants.read_text()
    edit_countries(tenants, "zażółć.pl", "PL", False, DEFAULT)
    assert '[domains."zażółć.pl"]\ncountries = ["DE"]\n' in tenants.read_text()


def test_nothing_to_do_leaves_the_file_alone(tenants: Path) -> None:
    before = tenants.stat()
    result = edit_countries(tenants, "kowalski.pl", "PL", True, DEFAULT)
    assert not result.changed and tenants.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize(("domain", "country", "problem"), [
    ("nowhere.pl", "PL", "no domain nowhere.pl"),
    ("kowalski.pl", "POL", "not a two-letter country code"),
    ("bad domain", "PL", "is not a domain name"),
])
def test_refusals_name_the_problem_and_change_nothing(tenants: Path, domain: str, country: str,
                                                      problem: str) -> None:
    with pytest.raises(EditError, match=problem):
        edit_countries(tenants, domain, country, True, DEFAULT)
    assert tenants.read_text() == TENANTS


def test_a_broken_file_is_not_edited(tenants: Path) -> None:
    tenants.write_text(TENANTS + "[accounts.\n")
    with pytest.raises(EditError, match="not valid now"):
        edit_countries(tenants, "kowalski.pl", "US", True, DEFAULT)


def test_a_domain_written_inline_is_left_to_a_person(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[domains]\n"nowak.pl" = {countries = ["PL"]}\n')
    with pytest.raises(EditError, match="by hand"):
        edit_countries(path, "nowak.pl", "DE", True, DEFAULT)
