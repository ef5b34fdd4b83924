"""Where the coordinator keeps what support changed: suspensions, country exceptions, audit.

:class:`SupportStore` is what :mod:`coordinator.support` needs of a store;
the coordinator's logic knows nothing of files. :class:`FileStore` keeps it
under ``cluster.state_dir`` (one host, the ring backend); with ``[counters]
backend = "redis"`` :class:`coordinator.redis_state.RedisStore` keeps it in
Redis, shared by every host, behind the same calls (the coordinator's
start picks one, ``coordinator/__main__.py``).

Files (JSON, so an operator can read them; every one validated when read):

- ``suspensions.json`` and ``country-exceptions.json``:
  ``{"version": 1, "items": [...]}``, the whole table, replaced atomically
  (temp file, fsync, rename, fsync of the folder) on every change;
- ``audit.jsonl``: one JSON object per line, appended and fsynced before
  the change is reported done. A line torn by a crash is skipped on read.

Blocking file work runs in a thread; calls are serialized by a lock, so
the tables on disk change in the order the coordinator made the changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cluster.durable import fsync_folder, write_atomically
from cluster.logjson import log_event
from cluster.support_state import (
    EXCEPTIONS_FILE,
    SUSPENSIONS_FILE,
    TABLE_VERSION,
    AuditEntry,
    CountryException,
    SupportState,
    Suspension,
    TableError,
    read_table,
)

FORMAT_VERSION = TABLE_VERSION
SUSPENSIONS = SUSPENSIONS_FILE
EXCEPTIONS = EXCEPTIONS_FILE
AUDIT = "audit.jsonl"

T = TypeVar("T")


class StoreError(Exception):
    """The state cannot be read or written; str() names the file and what is wrong."""


class StoreUnavailable(OSError):
    """A shared store did not answer (in time); str() is one line saying why.

    An OSError, as a failed disk write is: the support desk treats both alike."""


class SupportStore(Protocol):
    async def load(self) -> SupportState: ...

    async def refresh(self) -> SupportState | None:
        """What the store holds when someone else (another host) may have changed it
        since this process last looked; None when nothing can have changed."""
        ...

    async def put_suspension(self, item: Suspension) -> None: ...
    async def drop_suspension(self, account: str) -> None: ...
    async def put_exception(self, item: CountryException) -> None: ...
    async def drop_exception(self, domain: str, country: str) -> None: ...

    async def expire_suspension(self, item: Suspension, entry: AuditEntry) -> bool:
        """Remove ``item`` if it is still the one stored and record ``entry``, as one
        change; False (nothing done) when another host did it first, or it was replaced."""
        ...

    async def expire_exception(self, item: CountryException, entry: AuditEntry) -> bool: ...
    async def record(self, entry: AuditEntry) -> None: ...
    async def history(self, domain: str) -> list[AuditEntry]: ...
    async def close(self) -> None: ...


class FileStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = asyncio.Lock()
        self._state = SupportState()

    # -- the interface -----------------------------------------------------------

    async def load(self) -> SupportState:
        async with self._lock:
            return await asyncio.to_thread(self.load_now)

    async def put_suspension(self, item: Suspension) -> None:
        await self._change(self._state.with_suspension(item), SUSPENSIONS)

    async def drop_suspension(self, account: str) -> None:
        await self._change(self._state.without_suspension(account), SUSPENSIONS)

    async def put_exception(self, item: CountryException) -> None:
        await self._change(self._state.with_exception(item), EXCEPTIONS)

    async def drop_exception(self, domain: str, country: str) -> None:
        await self._change(self._state.without_exception(domain, country), EXCEPTIONS)

    async def refresh(self) -> SupportState | None:
        return None  # this coordinator is the files' only writer

    async def expire_suspension(self, item: Suspension, entry: AuditEntry) -> bool:
        async with self._lock:
            if self._state.suspensions.get(item.account) != item:
                return False
            await self._write_and_record(self._state.without_suspension(item.account),
                                         SUSPENSIONS, entry)
        return True

    async def expire_exception(self, item: CountryException, entry: AuditEntry) -> bool:
        async with self._lock:
            if self._state.exceptions.get(item.domain, {}).get(item.country) != item:
                return False
            await self._write_and_record(
                self._state.without_exception(item.domain, item.country), EXCEPTIONS, entry)
        return True

    async def record(self, entry: AuditEntry) -> None:
        await self._locked(self._append, audit_line(entry))

    async def history(self, domain: str) -> list[AuditEntry]:
        return await self._locked(self._read_audit, domain)

    async def close(self) -> None:
        pass

    # -- blocking work -------------------------------------------------------------

    def load_now(self) -> SupportState:
        """Read both tables (blocking); raises StoreError naming a bad file."""
        self._ensure_folder()
        state = SupportState()
        for item in self._read_table(SUSPENSIONS, Suspension.from_wire):
            state = state.with_suspension(item)
        for grant in self._read_table(EXCEPTIONS, CountryException.from_wire):
            state = state.with_exception(grant)
        self._state = state
        return state

    def _ensure_folder(self) -> None:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.folder}: cannot be created: {exc.strerror}") from None

    def _read_table(self, name: str, parse: Callable[[Any], T]) -> list[T]:
        try:
            return read_table(self.folder / name, parse)
        except TableError as exc:
            raise StoreError(str(exc)) from None

    def _write_table(self, state: SupportState, name: str) -> None:
        wire = state.to_wire()
        items = wire["suspensions"] if name == SUSPENSIONS else wire["exceptions"]
        data = json.dumps({"version": FORMAT_VERSION, "items": items}, ensure_ascii=False,
                          indent=1, sort_keys=True).encode("utf-8") + b"\n"
        write_atomically(self.folder / name, data)

    def _append(self, data: bytes) -> None:
        fd = os.open(self.folder / AUDIT, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            size = os.fstat(fd).st_size
            created = size == 0
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # after a torn line: keep this entry on a line of its own
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_folder(self.folder)

    def read_audit_now(self) -> list[AuditEntry]:
        """Every entry of the audit log, oldest first (blocking)."""
        return self._read_audit(None)

    def _read_audit(self, domain: str | None) -> list[AuditEntry]:
        path = self.folder / AUDIT
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = AuditEntry.from_wire(json.loads(line))
            except ValueError as exc:
                log_event("audit_line_skipped", logging.WARNING, file=str(path), line=number,
                          error=str(exc))
                continue
            if domain is None or entry.domain == domain:
                entries.append(entry)
        return entries

    # -- plumbing --------------------------------------------------------------------

    async def _change(self, state: SupportState, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._write_table, state, name)
            self._state = state

    async def _locked(self, work: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(work, *args)

    async def _write_and_record(self, state: SupportState, name: str,
                                entry: AuditEntry) -> None:
        await asyncio.to_thread(self._write_table, state, name)
        self._state = state
        await asyncio.to_thread(self._append, audit_line(entry))


def entry_json(entry: AuditEntry) -> str:
    """An audit entry as JSON: a line of ``audit.jsonl``, an item of the Redis store's lists."""
    return json.dumps(entry.to_wire(), ensure_ascii=False, sort_keys=True)


def audit_line(entry: AuditEntry) -> bytes:
    return (entry_json(entry) + "\n").encode("utf-8")
