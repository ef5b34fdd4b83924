"""Write examples/GeoLite2-Country-example.mmdb, a tiny loopback-only database.

Needs mmdb-writer and netaddr, which come with the `test` extra:

    pip install -e '.[test]'
    python examples/make_geoip.py

127.0.0.0/8 is Poland except 127.0.0.42 (Germany) and 127.0.0.66 (United
States), so one host can play clients from several countries by binding a
different loopback source address. 10.0.0.0/8 and ::1 are Poland.
"""

from __future__ import annotations

from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet

OUTPUT = Path(__file__).with_name("GeoLite2-Country-example.mmdb")

NAMES = {"PL": "Poland", "DE": "Germany", "US": "United States"}

# Supernets before subnets: a later insert overwrites what it covers.
NETWORKS = [
    ("127.0.0.0/8", "PL"),
    ("10.0.0.0/8", "PL"),
    ("127.0.0.42/32", "DE"),
    ("127.0.0.66/32", "US"),
    ("::1/128", "PL"),
]


def main() -> None:
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoIP2-Country",
        languages=["en"],
        description="sendguard example: loopback and 10/8 only, not real data",
    )
    for cidr, iso in NETWORKS:
        record = {"country": {"iso_code": iso, "names": {"en": NAMES[iso]}}}
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(OUTPUT))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
