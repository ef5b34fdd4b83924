"""Typed readers for TOML values that raise errors naming the file, key and value.

Every configuration error reaches the operator as one line,
``FILE: KEY: what is wrong (got VALUE)``, so the readers below carry the
file and the dotted key with them instead of raising bare ``TypeError``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.hostport import split_host_port

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

class ConfigError(Exception):
    """A configuration value is missing or wrong; str() is the operator's line."""

    def __init__(self, file: str | Path, key: str, problem: str, value: object = None,
                 *, show_value: bool = True) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        self.value = value
        got = f" (got {_show(value)})" if show_value else ""
        super().__init__(f"{self.file}: {key}: {problem}{got}")

def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value).replace("'", '"') if not value.isprintable() else f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)

def parse_duration(text: str) -> float:
    """``"500ms"`` → 0.5; raises ValueError for anything but one number and one unit."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]

class Section:
    """One TOML table being read; remembers which keys were used to catch typos."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        self.file = file
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(file, prefix or "(top level)", "must be a table", data)
        self.data: Mapping[str, Any] = data
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str, value: object = None, **kw: Any) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem, value, **kw)

    def raw(self, name: str, default: Any = None) -> Any:
        self._used.add(name)
        return self.data.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.data

    def string(self, name: str, default: str | None = None) -> str:
        value = self.raw(name, default)
        if value is None:
            raise self.error(name, "is required", show_value=False)
        if not isinstance(value, str):
            raise self.error(name, "must be a string", value)
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise self.error(name, "must be one of " + ", ".join(choices), value)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false", value)
        return value

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self.raw(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "must be a whole number", value)
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}", value)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(name, "must be a number", value)
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}", value)
        return float(value)

    def duration(self, name: str, default: str, *, allow_zero: bool = False) -> float:
        value = self.raw(name, default)
        return read_duration(self, name, value, allow_zero=allow_zero)

    def strings(self, name: str, default: list[str]) -> tuple[str, ...]:
        value = self.raw(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings", value)
        return tuple(value)

    def networks(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        result = []
        for item in self.strings(name, []):
            try:
                result.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise self.error(name, "is not a network like 10.0.0.0/8", item) from None
        return tuple(result)

    def endpoints(self, name: str, default: list[str]) -> tuple[tuple[str, int], ...]:
        return tuple(read_endpoint(self, name, item) for item in self.strings(name, default))

    def path(self, name: str, default: str, base: Path) -> Path | None:
        value = self.string(name, default)
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else base / path

    def unknown_keys(self) -> list[str]:
        return [k for k in self.data if k not in self._used]

    def reject_unknown(self) -> None:
        for name in self.unknown_keys():
            raise self.error(name, "is not a known setting", self.data[name])

def read_duration(section: Section, name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise section.error(
            name, 'must be a duration like "500ms", "2s", "1m", "12h" or "5d"', value
        ) from None
    if seconds <= 0 and not allow_zero:
        raise section.error(name, "must be longer than zero", value)
    return seconds

def read_endpoint(section: Section, name: str, item: str) -> tuple[str, int]:
    try:
        host, number = split_host_port(item, allow_zero=True)
        ipaddress.ip_address(host)
    except ValueError:
        raise section.error(name, 'must be "ADDRESS:PORT" like "0.0.0.0:587"', item) from None
    return host, number


def read_toml(path: Path) -> tuple[bytes, dict[str, Any]]:
    """A TOML file's bytes and data; ConfigError (key ``(file)``) when it cannot be read
    or is not UTF-8 TOML."""
    try:
        blob = path.read_bytes()
        return blob, tomllib.loads(blob.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "cannot be read: no such file",
                          show_value=False) from None
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot be read: {exc.strerror}",
                          show_value=False) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, "(file)", f"is not valid TOML: {exc}", show_value=False) from None
