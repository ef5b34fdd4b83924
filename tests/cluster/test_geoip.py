from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from geoipdb import country_db_bytes, write_country_db, write_db

from cluster.geoip import CountryDatabase, GeoDatabaseError

MAPPING = {
    "127.0.0.0/8": "PL",
    "127.0.0.42/32": "DE",
    "127.0.0.66/32": "us",  # stored lower-case on purpose
    "10.0.0.0/8": "PL",
    "::1/128": "PL",
    "2001:db8::/32": "CZ",
    "2001:db8:1::/48": "SK",
}

EXPECTED = {
    "127.0.0.1": "PL",
    "127.255.255.254": "PL",
    "127.0.0.42": "DE",
    "127.0.0.66": "US",
    "10.20.30.40": "PL",
    "::1": "PL",
    "2001:db8::5": "CZ",
    "2001:db8:1::5": "SK",
    "2001:DB8:1:0::5": "SK",
    "::ffff:127.0.0.42": "DE",
    "::ffff:7f00:2a": "DE",
    "::FFFF:10.0.0.1": "PL",
    "0:0:0:0:0:ffff:127.0.0.42": "DE",
    "::ffff:0:127.0.0.42": None,  # IPv4-translated, not mapped
    "8.8.8.8": None,
    "2001:db9::1": None,
    "::ffff:8.8.8.8": None,
}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return write_country_db(tmp_path / "country.mmdb", MAPPING)


@pytest.fixture(params=["path", "bytes"])
def db(request: pytest.FixtureRequest, db_path: Path):
    if request.param == "path":
        handle = CountryDatabase.from_path(db_path)
    else:
        handle = CountryDatabase.from_bytes(db_path.read_bytes())
    yield handle
    handle.close()


@pytest.mark.parametrize(("ip", "iso"), EXPECTED.items())
def test_lookup(db: CountryDatabase, ip: str, iso: str | None) -> None:
    assert db.country(ip) == iso


def test_path_and_bytes_agree(db_path: Path) -> None:
    with (
        CountryDatabase.from_path(db_path) as by_path,
        CountryDatabase.from_bytes(db_path.read_bytes()) as by_bytes,
    ):
        for ip in EXPECTED:
            assert by_path.country(ip) == by_bytes.country(ip)
        assert by_path.version == by_bytes.version
        assert by_path.build_epoch == by_bytes.build_epoch
        assert by_path.database_type == by_bytes.database_type == "GeoIP2-Country"


def test_bytes_use_the_c_reader_and_leave_no_descriptor(db_path: Path) -> None:
    pytest.importorskip("maxminddb.extension")
    before = set(os.listdir("/proc/self/fd"))
    with CountryDatabase.from_bytes(db_path.read_bytes()) as db:
        assert db.native
        assert set(os.listdir("/proc/self/fd")) == before


def test_pure_python_fallbacks(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = db_path.read_bytes()
    monkeypatch.setattr("cluster.geoip._has_extension", lambda: False)
    with CountryDatabase.from_bytes(blob) as db:  # MODE_MMAP on the memfd
        assert not db.native
        assert db.country("::ffff:127.0.0.42") == "DE"
    monkeypatch.delattr(os, "memfd_create")
    with CountryDatabase.from_bytes(blob) as db:  # MODE_FD on a BytesIO
        assert not db.native
        assert db.country("127.0.0.66") == "US"


def test_version_is_a_content_hash_unless_given(db_path: Path) -> None:
    blob = db_path.read_bytes()
    with CountryDatabase.from_bytes(blob) as db:
        assert re.fullmatch(r"[0-9a-f]{12}", db.version)
        original = db.version
    with CountryDatabase.from_bytes(blob, version="2024-06-01") as db:
        assert db.version == "2024-06-01"
    with CountryDatabase.from_bytes(country_db_bytes({"127.0.0.0/8": "DE"})) as other:
        assert other.version != original


def test_metadata(db: CountryDatabase) -> None:
    assert db.database_type == "GeoIP2-Country"
    assert abs(db.build_epoch - time.time()) < 3600


def test_handle_is_immutable(db: CountryDatabase) -> None:
    with pytest.raises(AttributeError):
        db.version = "x"  # type: ignore[misc]


def test_not_an_address_raises(db: CountryDatabase) -> None:
    with pytest.raises(ValueError):
        db.country("mail.example.com")


def test_city_database(tmp_path: Path) -> None:
    records = {
        "127.0.0.0/8": {
            "city": {"geoname_id": 756135, "names": {"en": "Warsaw"}},
            "country": {"iso_code": "PL", "names": {"en": "Poland"}},
            "location": {"latitude": 52.2297, "longitude": 21.0122},
        },
        # No "country": only the registry's allocation is known.
        "127.0.0.7/32": {"registered_country": {"iso_code": "SE"}},
        "127.0.0.9/32": {"city": {"names": {"en": "Nowhere"}}},
    }
    path = write_db(tmp_path / "city.mmdb", records, database_type="GeoIP2-City")
    for db in (CountryDatabase.from_path(path), CountryDatabase.from_bytes(path.read_bytes())):
        with db:
            assert db.database_type == "GeoIP2-City"
            assert db.country("127.1.2.3") == "PL"
            assert db.country("::ffff:127.1.2.3") == "PL"
            assert db.country("127.0.0.7") == "SE"
            assert db.country("127.0.0.9") is None
            assert db.country("192.0.2.1") is None


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mmdb"
    path.write_bytes(b"this is not a MaxMind database\n" * 100)
    with pytest.raises(GeoDatabaseError, match=r"garbage\.mmdb: not a readable MaxMind"):
        CountryDatabase.from_path(path)
    with pytest.raises(GeoDatabaseError, match="not a readable MaxMind"):
        CountryDatabase.from_bytes(path.read_bytes())


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mmdb"
    empty.write_bytes(b"")
    for path in (empty, tmp_path / "missing.mmdb"):
        with pytest.raises(GeoDatabaseError, match=path.name):
            CountryDatabase.from_path(path)
    with pytest.raises(GeoDatabaseError):
        CountryDatabase.from_bytes(b"")


def test_truncated_database_is_refused(db_path: Path) -> None:
    blob = db_path.read_bytes()
    with pytest.raises(GeoDatabaseError):
        CountryDatabase.from_bytes(blob[: len(blob) // 2])


def test_database_without_countries_is_refused(tmp_path: Path) -> None:
    path = write_db(
        tmp_path / "asn.mmdb",
        {"127.0.0.0/8": {"autonomous_system_number": 64512}},
        database_type="GeoLite2-ASN",
    )
    with pytest.raises(GeoDatabaseError, match="'GeoLite2-ASN' has no country data"):
        CountryDatabase.from_path(path)
