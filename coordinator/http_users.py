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

from cluster.admin_users import read_users
from cluster.logjson import log_event
from cluster.passwords import PasswordSchemeError
from cluster.validate import ConfigError
from worker.auth import PasswordVerifier


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
