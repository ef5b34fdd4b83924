"""The lines of ``admin.users_file``: one ``name:{SCHEME}hash`` each.

Read by the coordinator (:mod:`coordinator.http_users`) at start and on
change, and by ``sendguard check-config`` before any start, with the same
one-line error naming the line that is wrong.
"""

from __future__ import annotations

from pathlib import Path

from cluster.passwords import PasswordSchemeError, check_scheme
from cluster.validate import ConfigError

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@+-")


def read_users(config: Path, path: Path) -> dict[str, str]:
    """name -> stored hash; raises ConfigError naming the line that is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(config, "admin.users_file", f"cannot be read: {exc.strerror}",
                          str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(config, "admin.users_file", "is not UTF-8 text", str(path)) from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        where = f"{path} line {number}"
        if not colon or not name or not set(name) <= _NAME_CHARS:
            raise ConfigError(config, "admin.users_file",
                              f'{where}: must be "name:{{SCHEME}}hash"', str(path))
        try:
            check_scheme(stored)
        except PasswordSchemeError as exc:
            raise ConfigError(config, "admin.users_file", f"{where}: {exc}", str(path)) from None
        if name in users:
            raise ConfigError(config, "admin.users_file", f"{where}: {name} is listed twice",
                              str(path))
        users[name] = stored
    return users
