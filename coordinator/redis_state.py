"""Suspensions, country exceptions and the audit log in Redis, shared by every host.

With ``[counters] backend = "redis"`` every host's coordinator keeps the
support state here (:class:`RedisStore`, the calls of
:class:`~coordinator.state_store.SupportStore`), so support sees and changes
the same thing from any host. Keys, all under one hash tag so that in a
Redis Cluster they are one slot and each script below is one atomic step on
one node (the state is small: a node holds it whole):

``sg:{support}:suspensions``   hash, account -> the suspension (JSON, the
    fields of ``suspensions.json``'s items)
``sg:{support}:exceptions``    hash, ``"DOMAIN CC"`` -> the country exception
``sg:{support}:version``       incremented by every change of either hash
``sg:{support}:audit:DOMAIN``  list, the audit entries of one tenant, appended
    (the lines of ``audit.jsonl``); DOMAIN is empty for an address's
``sg:{support}:imports``       set, digests of the state folders moved in

How another host's change arrives: the coordinator calls :meth:`RedisStore.refresh`
every tick (half a second): one ``GET`` of the version, and a full read (one
script, so both tables and the version are consistent) when it moved, and
every :data:`FULL_READ_EVERY` whatever it says. Polling rather than pub/sub:
no message can be missed, nothing has to be resubscribed after a failover or
a reconnection, and it costs two ``GET``s a second per host.

A lapse is removed and recorded by one script that removes the entry only
while it is still the one that lapsed: every host's coordinator tries, one
does it, so the lapse is recorded once and a new suspension made meanwhile
is kept.

Redis unreachable (or slower than the timeout): every call raises
:class:`~coordinator.state_store.StoreUnavailable` and the coordinator keeps
what it read last. That is also copied to ``{state_dir}/redis-copy.json``,
so a coordinator started while Redis is down starts from it, not from nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from cluster.logjson import log_event
from cluster.settings import Settings
from cluster.support_state import AuditEntry, CountryException, SupportState, Suspension
from coordinator.state_store import (
    AUDIT,
    EXCEPTIONS,
    SUSPENSIONS,
    FileStore,
    StoreUnavailable,
    entry_json,
    write_atomically,
)
from worker.counters.redis_store import redis_client

BASE = "sg:{support}:"
SUSPENSIONS_KEY = BASE + "suspensions"
EXCEPTIONS_KEY = BASE + "exceptions"
VERSION_KEY = BASE + "version"
IMPORTS_KEY = BASE + "imports"
COPY = "redis-copy.json"
IMPORTED = ".imported"       # what a file moved into Redis is renamed with
FULL_READ_EVERY = 30.0       # a full read whatever the version says (a hand-edited hash)
MIN_TIMEOUT = 2.0            # support commands are rare: more patience than a decision's

T = TypeVar("T")

_LOAD = """
return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3])}
"""

_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[2])
"""

_DROP = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('INCR', KEYS[2])
"""

# KEYS: table, version, audit list; ARGV: field, at, until, audit entry.
_EXPIRE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return 0 end
local item = cjson.decode(stored)
if item['at'] ~= tonumber(ARGV[2]) or item['until'] ~= tonumber(ARGV[3]) then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('RPUSH', KEYS[3], ARGV[4])
return 1
"""

# KEYS: suspensions, exceptions, version, imports, audit lists...; ARGV: digest,
# {"s": [[field, json]...], "e": [...], "a": [[index in KEYS, json]...]}.
_IMPORT = """
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return -1 end
local data = cjson.decode(ARGV[2])
local added = 0
for _, pair in ipairs(data['s']) do
  added = added + redis.call('HSETNX', KEYS[1], pair[1], pair[2])
end
for _, pair in ipairs(data['e']) do
  added = added + redis.call('HSETNX', KEYS[2], pair[1], pair[2])
end
for _, pair in ipairs(data['a']) do redis.call('RPUSH', KEYS[pair[1]], pair[2]) end
if added > 0 then redis.call('INCR', KEYS[3]) end
redis.call('SADD', KEYS[4], ARGV[1])
return added
"""


def audit_key(domain: str) -> str:
    return f"{BASE}audit:{domain}"


def exception_field(domain: str, country: str) -> str:
    return f"{domain} {country}"


class RedisStore:
    """``connect`` makes a ``redis.asyncio`` client; one is made on first use, in the
    event loop that uses it (start-up and the coordinator's loop are two)."""

    def __init__(self, connect: Callable[[], Any], timeout: float, folder: Path) -> None:
        self._connect = connect
        self._client: Any = None
        self.timeout = timeout
        self.folder = folder
        self._seen: bytes | None = None   # the version of the last full read
        self._read_at = -math.inf
        self._copied: SupportState | None = None
        self._copy_failed = False
        self._pending: _Import | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> RedisStore:
        counters = settings.counters
        timeout = max(MIN_TIMEOUT, settings.cluster.request_timeout)
        return cls(lambda: redis_client(counters.redis_url, counters.redis_cluster, timeout),
                   timeout, settings.cluster.state_dir)

    # -- start -----------------------------------------------------------------------

    async def start(self) -> SupportState:
        """The state to start from.

        What the state folder still holds from the file store is moved into
        Redis first (once per host: entries already in Redis win, the files
        are renamed ``*.imported``). Redis unreachable: the files still to
        be moved, else the copy of the last read, and :meth:`refresh` tries
        again. Raises StoreError when a file to move cannot be read."""
        try:
            self._pending = _read_import(self.folder)
            try:
                return await self.load()
            except StoreUnavailable as exc:
                state = self._pending.state if self._pending else self._read_copy()
                log_event("state_store_failed", logging.ERROR, error=str(exc),
                          suspensions=len(state.suspensions),
                          note="starting from the last state read; trying again")
                return state
        finally:
            await self.close()

    # -- the interface ---------------------------------------------------------------

    async def load(self) -> SupportState:
        if self._pending is not None:
            await self._import(self._pending)
            self._pending = None
        version, suspensions, exceptions = await self._call(
            lambda r: r.eval(_LOAD, 3, VERSION_KEY, SUSPENSIONS_KEY, EXCEPTIONS_KEY))
        state = _state_of(suspensions, exceptions)
        self._seen, self._read_at = _bytes(version), time.monotonic()
        self._keep_copy(state)
        return state

    async def refresh(self) -> SupportState | None:
        if self._pending is None and time.monotonic() - self._read_at < FULL_READ_EVERY:
            version = await self._call(lambda r: r.get(VERSION_KEY))
            if _bytes(version or b"0") == self._seen:
                return None
        return await self.load()

    async def put_suspension(self, item: Suspension) -> None:
        await self._call(lambda r: r.eval(_PUT, 2, SUSPENSIONS_KEY, VERSION_KEY, item.account,
                                          _json(item.to_wire())))

    async def drop_suspension(self, account: str) -> None:
        await self._call(lambda r: r.eval(_DROP, 2, SUSPENSIONS_KEY, VERSION_KEY, account))

    async def put_exception(self, item: CountryException) -> None:
        await self._call(lambda r: r.eval(_PUT, 2, EXCEPTIONS_KEY, VERSION_KEY,
                                          exception_field(item.domain, item.country),
                                          _json(item.to_wire())))

    async def drop_exception(self, domain: str, country: str) -> None:
        await self._call(lambda r: r.eval(_DROP, 2, EXCEPTIONS_KEY, VERSION_KEY,
                                          exception_field(domain, country)))

    async def expire_suspension(self, item: Suspension, entry: AuditEntry) -> bool:
        return await self._expire(SUSPENSIONS_KEY, item.account, item.at, item.until, entry)

    async def expire_exception(self, item: CountryException, entry: AuditEntry) -> bool:
        return await self._expire(EXCEPTIONS_KEY, exception_field(item.domain, item.country),
                                  item.at, item.until, entry)

    async def record(self, entry: AuditEntry) -> None:
        await self._call(lambda r: r.rpush(audit_key(entry.domain), entry_json(entry)))

    async def history(self, domain: str) -> list[AuditEntry]:
        raw = await self._call(lambda r: r.lrange(audit_key(domain), 0, -1))
        entries = []
        for number, item in enumerate(raw, 1):
            try:
                entries.append(AuditEntry.from_wire(json.loads(item)))
            except ValueError as exc:
                log_event("audit_line_skipped", logging.WARNING, key=audit_key(domain),
                          line=number, error=str(exc))
        # Appended in the order the changes were made; entries moved in from a
        # host's file come after, so order by time (sorted() keeps ties in order).
        return sorted(entries, key=lambda entry: entry.ts)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- plumbing --------------------------------------------------------------------

    async def _expire(self, table: str, field: str, at: float, until: float | None,
                      entry: AuditEntry) -> bool:
        done = await self._call(lambda r: r.eval(
            _EXPIRE, 3, table, VERSION_KEY, audit_key(entry.domain), field, repr(at),
            repr(until), entry_json(entry)))
        return int(done) == 1

    async def _call(self, work: Callable[[Any], Awaitable[T]]) -> T:
        if self._client is None:
            self._client = self._connect()
        try:
            return await asyncio.wait_for(work(self._client), self.timeout)
        except StoreUnavailable:
            raise
        except TimeoutError:
            raise StoreUnavailable(f"redis did not answer within {self.timeout:g} s") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            first = (str(exc) or type(exc).__name__).splitlines()[0]
            raise StoreUnavailable(f"redis: {first}") from None

    async def _import(self, found: _Import) -> None:
        lists = sorted({audit_key(entry.domain) for entry in found.audit})
        keys = [SUSPENSIONS_KEY, EXCEPTIONS_KEY, VERSION_KEY, IMPORTS_KEY, *lists]
        position = {key: index for index, key in enumerate(keys, 1)}  # Lua counts from 1
        payload: dict[str, list[list[Any]]] = {
            "s": [[item.account, _json(item.to_wire())]
                  for item in found.state.suspensions.values()],
            "e": [[exception_field(item.domain, item.country), _json(item.to_wire())]
                  for per in found.state.exceptions.values() for item in per.values()],
            "a": [[position[audit_key(entry.domain)], entry_json(entry)]
                  for entry in found.audit],
        }
        added = await self._call(lambda r: r.eval(_IMPORT, len(keys), *keys, found.digest,
                                                  _json(payload)))
        log_event("state_imported", folder=str(self.folder), added=int(added),
                  suspensions=len(payload["s"]), exceptions=len(payload["e"]),
                  audit_entries=len(payload["a"]), already=int(added) < 0)
        for path in found.files:
            try:
                path.rename(path.with_name(path.name + IMPORTED))
            except OSError as exc:
                # Harmless: its digest is in Redis, so it is not moved in twice.
                log_event("state_file_not_renamed", logging.WARNING, file=str(path),
                          error=exc.strerror)

    def _keep_copy(self, state: SupportState) -> None:
        if state == self._copied:
            return
        data = _json({"version": 1, "copied_at": time.time(), "state": state.to_wire()})
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self.folder / COPY, data.encode("utf-8") + b"\n")
        except OSError as exc:
            if not self._copy_failed:
                log_event("state_copy_failed", logging.WARNING, file=str(self.folder / COPY),
                          error=exc.strerror)
            self._copy_failed = True
            return
        self._copied, self._copy_failed = state, False

    def _read_copy(self) -> SupportState:
        path = self.folder / COPY
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not a map")
            return SupportState.from_wire(data.get("state"))
        except FileNotFoundError:
            return SupportState()
        except (OSError, ValueError) as exc:
            log_event("state_copy_unusable", logging.WARNING, file=str(path), error=str(exc))
            return SupportState()


@dataclass(frozen=True, slots=True)
class _Import:
    """A file store's folder, to be moved into Redis."""

    state: SupportState
    audit: list[AuditEntry]
    digest: str
    files: list[Path]


def _read_import(folder: Path) -> _Import | None:
    files = [folder / name for name in (SUSPENSIONS, EXCEPTIONS, AUDIT)
             if (folder / name).is_file()]
    if not files:
        return None
    store = FileStore(folder)
    state = store.load_now()  # StoreError: a table that cannot be read stops the start
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return _Import(state, store.read_audit_now(), digest.hexdigest(), files)


def _state_of(suspensions: list[Any], exceptions: list[Any]) -> SupportState:
    state = SupportState()
    for key, flat in ((SUSPENSIONS_KEY, suspensions), (EXCEPTIONS_KEY, exceptions)):
        for i in range(0, len(flat), 2):
            try:
                data = json.loads(flat[i + 1])
                if key == SUSPENSIONS_KEY:
                    state = state.with_suspension(Suspension.from_wire(data))
                else:
                    state = state.with_exception(CountryException.from_wire(data))
            except ValueError as exc:
                # Not "forget it": the coordinator keeps the state it had.
                raise StoreUnavailable(f"redis: {key} {_bytes(flat[i]).decode()!r}: "
                                       f"{exc}") from None
    return state


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
