"""``sendguard tenant allow-country|disallow-country``: one line of the tenant file changed.

The file is the operator's: comments, order and layout stay as they were.
Only the ``countries`` line of the domain's own ``[domains."NAME"]`` table is
rewritten (or added after its header). The result is parsed and validated
with :mod:`cluster.tenants` before it replaces the file, atomically (temp
file, fsync, rename, fsync of the folder); the coordinator's normal watch
then puts it in force.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cluster.durable import write_atomically
from cluster.names import BadDomain, to_alabel
from cluster.settings import is_country_code
from cluster.tenants import parse_tenants
from cluster.validate import ConfigError

_HEADER = re.compile(r"^\s*\[(?!\[)(.+?)\]\s*(#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")
_COUNTRIES = re.compile(r"""^(\s*)(countries|"countries"|'countries')\s*=""")


class EditError(Exception):
    """The change cannot be made; str() says why, for the operator."""


@dataclass(frozen=True, slots=True)
class EditResult:
    domain: str
    countries: tuple[str, ...]
    changed: bool


def _header_path(text: str) -> list[str] | None:
    try:
        data = tomllib.loads(f"[{text}]\n")
    except tomllib.TOMLDecodeError:
        return None
    path = []
    while isinstance(data, dict) and len(data) == 1:
        key, data = next(iter(data.items()))
        path.append(key)
    return path


def _domain_section(lines: list[str], domain: str) -> tuple[int, int] | None:
    """(header line, end line) of ``[domains."DOMAIN"]``, compared in A-label form."""
    start = None
    for index, line in enumerate(lines):
        is_header = _ARRAY_HEADER.match(line) or _HEADER.match(line)
        if not is_header:
            continue
        if start is not None:
            return start, index
        match = _HEADER.match(line)
        path = _header_path(match.group(1)) if match else None
        if path and len(path) == 2 and path[0] == "domains":
            try:
                if to_alabel(path[1]) == domain:
                    start = index
            except BadDomain:
                continue
    return (start, len(lines)) if start is not None else None


def _value_end(lines: list[str], first: int, end: int) -> int:
    """The line after the last one of the (maybe multi-line) value starting at ``first``."""
    for stop in range(first + 1, end + 1):
        try:
            tomllib.loads("".join(lines[first:stop]))
            return stop
        except tomllib.TOMLDecodeError:
            continue
    raise EditError("the countries value of the domain cannot be parsed")


def _format(countries: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{code}"' for code in countries) + "]"


def new_countries(current: tuple[str, ...], country: str, allow: bool) -> tuple[str, ...]:
    if allow:
        return current if country in current else (*current, country)
    return tuple(code for code in current if code != country)


def edit_countries(path: Path, domain: str, country: str, allow: bool,
                   default_countries: frozenset[str]) -> EditResult:
    """Allow or disallow ``country`` for ``domain`` in the tenant file at ``path``."""
    country = country.upper()
    if not is_country_code(country):
        raise EditError(f'{country!r} is not a two-letter country code like "PL"')
    try:
        name = to_alabel(domain)
    except BadDomain:
        raise EditError(f"{domain!r} is not a domain name") from None
    before = path.stat()
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    try:
        directory = parse_tenants(path, tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise EditError(f"the tenant file is not valid now, fix it first: {exc}") from None
    hosted = directory.domain(name)
    if hosted is None:
        raise EditError(f"{path}: no domain {domain} in the tenant directory")
    current = tuple(sorted(hosted.countries if hosted.countries is not None
                           else default_countries))
    wanted = new_countries(current, country, allow)
    if wanted == current:
        return EditResult(name, current, False)

    lines = text.splitlines(keepends=True)
    section = _domain_section(lines, name)
    if section is None:
        raise EditError(f'{path}: domain {domain} is not written as its own [domains."{domain}"] '
                        "table; change its countries by hand")
    header, end = section
    newline = "\r\n" if lines[header].endswith("\r\n") else "\n"
    replacement = f"countries = {_format(wanted)}{newline}"
    for index in range(header + 1, end):
        match = _COUNTRIES.match(lines[index])
        if match:
            stop = _value_end(lines, index, end)
            lines[index:stop] = [match.group(1) + replacement]
            break
    else:
        if not lines[header].endswith(("\n", "\r")):
            lines[header] += newline
        lines.insert(header + 1, replacement)
    updated = "".join(lines)

    try:
        check = parse_tenants(path, tomllib.loads(updated)).domain(name)
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise EditError(f"the edited file would not be valid, nothing changed: {exc}") from None
    if check is None or check.countries != frozenset(wanted):
        raise EditError("the edited file would not say what was asked, nothing changed")
    replace_atomically(path, updated.encode("utf-8"), before)
    return EditResult(name, wanted, True)


def replace_atomically(path: Path, data: bytes, expected: os.stat_result) -> None:
    """Written as :func:`~cluster.durable.write_atomically` does, keeping the file's mode;
    refused if ``path`` moved on since ``expected`` was taken of it."""

    def unchanged() -> None:
        now = path.stat()
        if (now.st_mtime_ns, now.st_size, now.st_ino) != (
                expected.st_mtime_ns, expected.st_size, expected.st_ino):
            raise EditError(f"{path} changed while it was being edited; try again")

    write_atomically(path, data, mode=expected.st_mode & 0o7777, check=unchanged)

