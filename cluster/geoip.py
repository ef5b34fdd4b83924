"""Country lookups in a MaxMind-format (GeoIP2/GeoLite2) database, for every process.

``check-config`` and ``sendguard run`` open the file before anything starts
(:mod:`cluster.files`); the coordinator reads it, refuses a bad one and
ships the bytes to the workers in its snapshots; workers (and a worker run
without a coordinator) open those bytes for lookups. One reader and one
rule for all of them: geoip2's ``Reader``, on a Country, City or Enterprise
database. An ASN or ISP database would open fine and answer None for every
address, so it is refused when opened instead.

A :class:`CountryDatabase` is an immutable handle: a new database means a
new handle, swapped by reference with the configuration snapshot, and the
old one closed once nothing uses it.

Bytes read through ``io.BytesIO`` would force maxminddb's pure-Python
reader (~60-80 µs a lookup); putting them in an anonymous memory file and
opening it by its ``/proc`` path lets the libmaxminddb C reader mmap it.
``loadtest/bench_geoip.py`` measures a lookup both ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import geoip2.database
import geoip2.errors
import maxminddb

__all__ = ["CountryDatabase", "GeoDatabaseError"]

_VERSION_DIGEST_SIZE = 6  # 12 hex characters
# Opening reads only the metadata; decoding a few records finds a truncated file.
PROBE_ADDRESSES = ("1.1.1.1", "8.8.8.8", "127.0.0.1")
PROBE_ADDRESS_V6 = "2001:4860:4860::8888"

Lookup = Callable[[geoip2.database.Reader, "str | ipaddress.IPv4Address"], object]
# geoip2 reads a database with the method its type names (case as MaxMind and
# DB-IP write it): the most specific first, as "GeoIP2-Enterprise" records
# hold a city and a country too.
_LOOKUPS: tuple[tuple[str, Lookup], ...] = (
    ("Enterprise", geoip2.database.Reader.enterprise),
    ("City", geoip2.database.Reader.city),
    ("Country", geoip2.database.Reader.country),
)


class GeoDatabaseError(ValueError):
    """The file or blob is not a usable country database."""


def _content_version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_VERSION_DIGEST_SIZE).hexdigest()


def _file_version(path: Path) -> str:
    with path.open("rb") as fh:
        digest = hashlib.file_digest(
            fh, lambda: hashlib.blake2b(digest_size=_VERSION_DIGEST_SIZE)
        )
    return digest.hexdigest()


def _has_extension() -> bool:
    try:
        from maxminddb import extension
    except ImportError:
        return False
    return hasattr(extension, "Reader")


def _open_path(path: str | os.PathLike[str]) -> tuple[geoip2.database.Reader, bool]:
    """The reader and whether it is the C one."""
    native = _has_extension()
    mode = maxminddb.MODE_MMAP_EXT if native else maxminddb.MODE_MMAP
    return geoip2.database.Reader(path, mode=mode), native


def _open_blob(blob: bytes) -> tuple[geoip2.database.Reader, bool]:
    if not hasattr(os, "memfd_create"):
        return geoip2.database.Reader(io.BytesIO(blob), mode=maxminddb.MODE_FD), False
    fd = os.memfd_create("sendguard-geoip", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(blob)
        # Both mmap readers open the path, map it and close their descriptor;
        # the mapping keeps the memory alive after we close ours below.
        return _open_path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _lookup_for(database_type: str, source: str) -> Lookup:
    for word, lookup in _LOOKUPS:
        if word in database_type:
            return lookup
    raise GeoDatabaseError(f"{source}: database type {database_type!r} has no country data"
                           " (expected a GeoIP2/GeoLite2 Country or City database)")


class CountryDatabase:
    """Read-only handle answering ``country(ip)`` from a Country, City or Enterprise mmdb."""

    __slots__ = ("_reader", "_lookup", "_version", "_source", "_database_type",
                 "_build_epoch", "_ipv4_only", "_native")
    _reader: geoip2.database.Reader
    _lookup: Lookup
    _version: str
    _source: str
    _database_type: str
    _build_epoch: int
    _ipv4_only: bool
    _native: bool

    def __init__(self, reader: geoip2.database.Reader, version: str, source: str,
                 native: bool) -> None:
        meta = reader.metadata()
        database_type = str(meta.database_type)
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_lookup", _lookup_for(database_type, source))
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_database_type", database_type)
        object.__setattr__(self, "_build_epoch", int(meta.build_epoch))
        object.__setattr__(self, "_ipv4_only", meta.ip_version == 4)
        object.__setattr__(self, "_native", native)
        self._probe()

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> CountryDatabase:
        """Open a database file; ``version`` is a hash of its content."""
        path = Path(path)
        try:
            version = _file_version(path)
            reader, native = _open_path(path)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(f"{path}: not a readable MaxMind database: {exc}") from exc
        return cls._checked(reader, native, version, str(path))

    @classmethod
    def from_bytes(cls, blob: bytes, version: str = "") -> CountryDatabase:
        """Open a database held in memory, as the coordinator distributes it."""
        version = version or _content_version(blob)
        source = f"<GeoIP database {version}, {len(blob)} bytes>"
        try:
            reader, native = _open_blob(blob)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(f"{source}: not a readable MaxMind database: {exc}") from exc
        return cls._checked(reader, native, version, source)

    @classmethod
    def _checked(cls, reader: geoip2.database.Reader, native: bool, version: str,
                 source: str) -> CountryDatabase:
        try:
            return cls(reader, version, source, native)
        except BaseException:
            reader.close()
            raise

    def _probe(self) -> None:
        # Refused at load time rather than failing mid-session.
        probes = list(PROBE_ADDRESSES) + ([] if self._ipv4_only else [PROBE_ADDRESS_V6])
        try:
            for ip in probes:
                with contextlib.suppress(geoip2.errors.AddressNotFoundError, TypeError):
                    self._lookup(self._reader, ip)
        except (ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(f"{self._source}: corrupt database: {exc}") from exc

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return (
            f"<CountryDatabase {self._version} {self.database_type!r}"
            f" built {self.build_epoch}>"
        )

    @property
    def version(self) -> str:
        return self._version

    @property
    def database_type(self) -> str:
        return self._database_type

    @property
    def build_epoch(self) -> int:
        return self._build_epoch

    @property
    def native(self) -> bool:
        """True when lookups go through the libmaxminddb C reader."""
        return self._native

    def country(self, ip: str) -> str | None:
        """ISO 3166 alpha-2 code (upper-case) for ``ip``, or None if unknown.

        Raises ValueError for a string that is not an IP address.
        """
        key: str | ipaddress.IPv4Address = ip
        if ":" in ip:
            # The MaxMind tree keeps IPv4 under ::a.b.c.d; only some builds
            # alias ::ffff:0:0/96 to it, so look a mapped address up as IPv4.
            if ip[:7].lower() == "::ffff:" and "." in ip and ip.count(":") == 3:
                # How the kernel reports an IPv4 peer on a dual-stack socket;
                # slicing is ~10x cheaper than parsing.
                key = ip[7:]
            elif "ffff" in ip.lower():
                mapped = ipaddress.IPv6Address(ip).ipv4_mapped
                if mapped is not None:
                    key = mapped
            if self._ipv4_only and key is ip:
                return None
        try:
            found = self._lookup(self._reader, key)
        except (geoip2.errors.AddressNotFoundError, TypeError):
            return None  # TypeError: a record whose sections are not maps
        except maxminddb.InvalidDatabaseError as exc:
            raise GeoDatabaseError(f"{self._source}: corrupt record for {ip}: {exc}") from exc
        # registered_country covers addresses MaxMind places only by the
        # registry's record (anycast, some satellite and mobile ranges).
        for section in (found.country, found.registered_country):  # type: ignore[attr-defined]
            code = section.iso_code
            if isinstance(code, str) and code:
                return code.upper()
        return None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> CountryDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
