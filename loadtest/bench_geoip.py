"""Country lookups per second: the gateway's reader against the bare C reader under it.

    .venv/bin/python -m loadtest.bench_geoip [--database FILE] [--lookups N] [--runs R]

Looks the same mix of addresses up (IPv4, IPv6, an IPv4-mapped peer, a
known and an unknown address) through :class:`cluster.geoip.CountryDatabase`
opened from the file and from bytes (as workers open the coordinator's
copy), and through maxminddb's C reader directly, which is what the
gateway read before it went through geoip2. Prints lookups per second and
microseconds per lookup, the best of ``--runs`` runs of each. The default
database is the bundled example; a real GeoLite2 Country or City file
(``--database``) has a deeper tree and answers a little slower.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import maxminddb

from cluster.geoip import CountryDatabase

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "GeoLite2-Country-example.mmdb"
MIX = ["127.0.0.1", "127.0.0.42", "8.8.8.8", "::1", "::ffff:127.0.0.66"]


def rate(lookup: Callable[[str], object], addresses: list[str], runs: int) -> float:
    """Lookups per second, the best of ``runs``."""
    best = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        for ip in addresses:
            lookup(ip)
        best = max(best, len(addresses) / (time.perf_counter() - start))
    return best


def bare_key(ip: str) -> str:
    # The mapped form as the gateway looks it up (IPv4 lives under ::a.b.c.d).
    return ip[7:] if ip.startswith("::ffff:") else ip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_geoip")
    parser.add_argument("--database", type=Path, default=EXAMPLE)
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    addresses = (MIX * (args.lookups // len(MIX) + 1))[: args.lookups]
    rates: dict[str, float] = {}
    with maxminddb.open_database(str(args.database), maxminddb.MODE_MMAP_EXT) as bare:
        keys = [bare_key(ip) for ip in addresses]
        rates["maxminddb C reader, get()"] = rate(bare.get, keys, args.runs)
    with CountryDatabase.from_path(args.database) as by_path:
        rates["geoip2, from_path"] = rate(by_path.country, addresses, args.runs)
    with CountryDatabase.from_bytes(args.database.read_bytes()) as by_bytes:
        native = by_bytes.native
        rates["geoip2, from_bytes"] = rate(by_bytes.country, addresses, args.runs)
    print(f"{args.database.name}: {len(addresses):,} lookups, best of {args.runs}"
          f" (from_bytes on the C reader: {native})")
    for name, per_second in rates.items():
        print(f"  {name:28} {per_second:>12,.0f}/s  {1e6 / per_second:6.2f} µs")


if __name__ == "__main__":
    main()
