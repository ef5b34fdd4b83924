"""Country lookups against a MaxMind-format (GeoIP2/GeoLite2) database.

A :class:`CountryDatabase` is an immutable handle: a new database means a new
handle, swapped by reference with the configuration snapshot, and the old one
closed once nothing uses it.

The coordinator ships the database to workers as bytes. Reading bytes through
``io.BytesIO`` would force maxminddb's pure-Python reader (~60-80 µs a lookup);
putting them in an anonymous memory file and opening it by its ``/proc`` path
lets the libmaxminddb C reader mmap it (~3-5 µs).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
from pathlib import Path
from typing import Any

import maxminddb

from cluster.countrydb import check_country_reader

__all__ = ["CountryDatabase", "GeoDatabaseError"]

_VERSION_DIGEST_SIZE = 6  # 12 hex characters


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


def _open_path(path: str | os.PathLike[str]) -> maxminddb.Reader:
    mode = maxminddb.MODE_MMAP_EXT if _has_extension() else maxminddb.MODE_MMAP
    return maxminddb.open_database(path, mode)


def _open_blob(blob: bytes) -> maxminddb.Reader:
    if not hasattr(os, "memfd_create"):
        return maxminddb.open_database(io.BytesIO(blob), maxminddb.MODE_FD)
    fd = os.memfd_create("sendguard-geoip", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(blob)
        # Both mmap readers open the path, map it and close their descriptor;
        # the mapping keeps the memory alive after we close ours below.
        return _open_path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class CountryDatabase:
    """Read-only handle answering ``country(ip)`` from a Country or City mmdb."""

    __slots__ = (
        "_reader", "_version", "_source", "_database_type", "_build_epoch", "_ipv4_only", "_native"
    )
    _reader: maxminddb.Reader
    _version: str
    _source: str
    _database_type: str
    _build_epoch: int
    _ipv4_only: bool
    _native: bool

    def __init__(self, reader: maxminddb.Reader, version: str, source: str) -> None:
        meta = reader.metadata()
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_database_type", str(meta.database_type))
        object.__setattr__(self, "_build_epoch", int(meta.build_epoch))
        object.__setattr__(self, "_ipv4_only", meta.ip_version == 4)
        object.__setattr__(self, "_native", type(reader).__module__ == "maxminddb.extension")
        self._validate()

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> CountryDatabase:
        """Open a database file; ``version`` is a hash of its content."""
        path = Path(path)
        try:
            version = _file_version(path)
            reader = _open_path(path)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(f"{path}: not a readable MaxMind database: {exc}") from exc
        return cls._checked(reader, version, str(path))

    @classmethod
    def from_bytes(cls, blob: bytes, version: str = "") -> CountryDatabase:
        """Open a database held in memory, as the coordinator distributes it."""
        version = version or _content_version(blob)
        source = f"<GeoIP database {version}, {len(blob)} bytes>"
        try:
            reader = _open_blob(blob)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoDatabaseError(f"{source}: not a readable MaxMind database: {exc}") from exc
        return cls._checked(reader, version, source)

    @classmethod
    def _checked(cls, reader: maxminddb.Reader, version: str, source: str) -> CountryDatabase:
        try:
            return cls(reader, version, source)
        except BaseException:
            reader.close()
            raise

    def _validate(self) -> None:
        # Refused at load time rather than failing mid-session.
        try:
            check_country_reader(self._reader, self._source)
        except ValueError as exc:
            raise GeoDatabaseError(str(exc)) from exc

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
            record = self._reader.get(key)
        except maxminddb.InvalidDatabaseError as exc:
            raise GeoDatabaseError(f"{self._source}: corrupt record for {ip}: {exc}") from exc
        return _iso_code(record)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> CountryDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _iso_code(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    # registered_country covers addresses MaxMind places only by the
    # registry's record (anycast, some satellite and mobile ranges).
    for key in ("country", "registered_country"):
        section = record.get(key)
        if isinstance(section, dict):
            code = section.get("iso_code")
            if isinstance(code, str) and code:
                return code.upper()
    return None
