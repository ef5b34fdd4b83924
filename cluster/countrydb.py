"""What makes a MaxMind-format file a country database, for every process that opens one.

The supervisor and ``check-config`` check the file before anything starts
(cluster/files.py); the coordinator and workers open it for lookups
(worker/geo.py). One rule for all of them.
"""

from __future__ import annotations

import maxminddb

# A database whose records carry a "country" map: MaxMind Country, City and
# Enterprise, DB-IP's Country/City lookalikes. An ASN or ISP database would
# open fine and answer None for every address, so it is refused instead.
COUNTRY_BEARING_TYPES = ("country", "city", "enterprise")
# Opening reads only the metadata; decoding a few records finds a truncated file.
PROBE_ADDRESSES = ("1.1.1.1", "8.8.8.8", "127.0.0.1")
PROBE_ADDRESS_V6 = "2001:4860:4860::8888"


def check_country_reader(reader: maxminddb.Reader, source: str) -> None:
    """Raises ValueError when ``reader`` is not a usable country database."""
    meta = reader.metadata()
    db_type = str(meta.database_type)
    if not any(word in db_type.lower() for word in COUNTRY_BEARING_TYPES):
        raise ValueError(f"{source}: database type {db_type!r} has no country data"
                         " (expected a GeoIP2/GeoLite2 Country or City database)")
    probes = list(PROBE_ADDRESSES) + ([] if meta.ip_version == 4 else [PROBE_ADDRESS_V6])
    try:
        for ip in probes:
            reader.get(ip)
    except (ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ValueError(f"{source}: corrupt database: {exc}") from exc
