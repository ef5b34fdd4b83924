"""Build small MaxMind-format databases for tests (needs the `test` extra)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPNetwork, IPSet


def _tree_prefixlen(cidr: str) -> int:
    # IPv4 networks live under ::/96 of the IPv6 tree, so a /8 there is a /104.
    net = IPNetwork(cidr)
    return net.prefixlen + (96 if net.version == 4 else 0)


def write_db(
    path: str | Path,
    records: Mapping[str, Any],
    database_type: str = "GeoIP2-Country",
) -> Path:
    """Write CIDR -> record (any mmdb value) to ``path``."""
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type=database_type,
        languages=["en"],
        description=f"sendguard test {database_type}",
    )
    # A network inserted later overwrites whatever it covers: supernets first.
    for cidr in sorted(records, key=_tree_prefixlen):
        writer.insert_network(IPSet([cidr]), records[cidr])
    path = Path(path)
    writer.to_db_file(str(path))
    return path


def write_country_db(path: str | Path, mapping: Mapping[str, str]) -> Path:
    """Write a GeoIP2-Country database from CIDR -> ISO country code."""
    records = {cidr: {"country": {"iso_code": iso}} for cidr, iso in mapping.items()}
    return write_db(path, records)


def country_db_bytes(mapping: Mapping[str, str]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write_country_db(Path(tmp) / "country.mmdb", mapping).read_bytes()
