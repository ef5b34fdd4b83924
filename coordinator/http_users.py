"""The people allowed into the HTTP admin API: ``admin.users_file``.

One ``name:{SCHEME}hash`` per line (the schemes of the tenant directory's
passwords, made with ``sendguard hash-password``); blank lines and lines
starting with ``#`` are skipped. The file is read at start (a bad one stops
the coordinator with the usual one-line error) and again whenever it
changes; a bad new version is logged and the old one stays.

Passwords are verified in a small thread pool with a cache of successes
(:class:`worker.auth.PasswordVerifier`, the same as SMTP AUTH): a console
page costs one hash per person every few minutes, not one per request.
An unknown name costs the same hash as a known one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cluster.logjson import log_event
from cluster.passwords import PasswordSchemeError, check_scheme
from cluster.validate import ConfigError
from worker.auth import PasswordVerifier

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


class AdminUsers:
    def __init__(self, config: Path, path: Path) -> None:
        self.config = config
        self.path = path
        self._users = read_users(config, path)
        self._stamp = self._current_stamp()
        self._verifier = PasswordVerifier(max_concurrent=2)

    async def check(self, name: str, password: str) -> bool:
        self._reload_if_changed()
        stored = self._users.get(name)
        if stored is None:
            # The same work as a known name, so timing tells nothing; the answer is no.
            decoy = next(iter(self._users.values()), None)
            if decoy is not None:
                await self._verifier.verify("", decoy, password)
            return False
        try:
            return await self._verifier.verify(name, stored, password)
        except PasswordSchemeError:
            return False

    def close(self) -> None:
        self._verifier.close()

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def _reload_if_changed(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._users = read_users(self.config, self.path)
        except ConfigError as exc:
            log_event("reload_refused", logging.ERROR, source="admin.users_file", error=str(exc))
            return
        log_event("admin_users_reloaded", users=len(self._users))
