"""Counters kept in Redis (``[counters] backend = "redis"``), shared by every host.

:class:`RedisCounters` has the methods of the ring's counter client, so the
policy engine and the delivery agent use either without knowing which. Every
operation is one atomic script per subject (:mod:`worker.counters.redis_scripts`):
a decision that touches a client address and an account is two script calls
in one pipeline, and a reservation across them is made as across ring owners:
reserve on each subject under one request id; when one part is refused or
fails, the parts that may have counted are released. A failure can
therefore only under-admit (a part whose release is lost keeps its count),
never over-admit, and a reserve retried with the same id never counts twice.

Calls issued in the same event-loop iteration, and those that arrive while a
pipeline is in flight, go to Redis together in the next pipeline (one
connection, one round trip per batch), which keeps the per-message cost
close to one script execution.

Redis unreachable, or slower than ``cluster.request_timeout``: the call
raises :class:`~worker.counters.client.CounterUnavailable`, which the engine
turns into ``451 4.3.0``. Times come from the Redis server's clock, one clock
for every host, unless a clock is injected (tests).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from cluster import keys as keynames
from cluster.counting import Op, Outcome
from cluster.settings import Settings
from worker.counters import redis_scripts as scripts
from worker.counters.client import RESERVATION_TTL, CounterUnavailable

PREFIX = "sg:"
# Keys of one client address share its tag: a MAIL check or an end-of-DATA
# reservation touches them together (rate, bounce, spam grace).
_ADDRESS_KINDS = tuple(f("") for f in (keynames.ip_key, keynames.auth_failure_key,
                                       keynames.bounce_key, keynames.spam_key))


def subject_tag(key: str) -> str:
    """The hash tag of a counter key: its client address, or the key itself (an account)."""
    for kind in _ADDRESS_KINDS:
        if key.startswith(kind):
            return "{ip:" + key[len(kind):] + "}"
    return "{" + key + "}"


def counter_name(tag: str, key: str, series: str, window: float) -> str:
    # The tag already holds the subject: the key's kind is all the name needs.
    return f"{PREFIX}{tag}:{key.partition(':')[0]}|{series}|{float(window)!r}"


def _key_prefix(key: str) -> str:
    """What the name of every counter of ``key`` starts with."""
    return f"{PREFIX}{subject_tag(key)}:{key.partition(':')[0]}|"


class _Script:
    __slots__ = ("name", "text", "sha")

    def __init__(self, name: str, text: str) -> None:
        import hashlib

        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


_CHECK = _Script("check", scripts.CHECK)
_ADD = _Script("add", scripts.ADD)
_RESERVE = _Script("reserve", scripts.RESERVE)
_RELEASE = _Script("release", scripts.RELEASE)
_MARK = _Script("mark", scripts.MARK)
_INSPECT = _Script("inspect", scripts.INSPECT)
_RESET = _Script("reset", scripts.RESET)

_Call = tuple[_Script, list[str], list[str], "asyncio.Future[Any]"]


class RedisCounters:
    """``redis``: a ``redis.asyncio.Redis`` or ``RedisCluster`` client (see :func:`connect`)."""

    def __init__(self, redis: Any, timeout: float,
                 clock: Callable[[], float] | None = None,
                 observe: Callable[[float, bool], None] | None = None) -> None:
        self.redis = redis
        self.timeout = timeout
        self._clock = clock
        self._observe = observe
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # rid -> (forget after, [(tag, counter names)]): what release() must name.
        self._reserved: OrderedDict[str, tuple[float, list[tuple[str, list[str]]]]] = \
            OrderedDict()

    # -- decisions -------------------------------------------------------------

    async def check(self, ops: Sequence[Op]) -> Outcome:
        if not ops:
            return Outcome(True, (), None)
        groups = _by_subject(ops)
        now = self._now()
        calls = [(_CHECK, [_name(tag, ops[i]) for i in idx], [now, _op_args(ops, idx)])
                 for tag, idx in groups]
        return _merge(ops, groups, _raise_first(await self._run(calls)))

    async def reserve(self, rid: str, ops: Sequence[Op]) -> Outcome:
        """Count every op if all fit, else nothing; a repeated ``rid`` counts once."""
        _no_negative(ops)
        if not ops:
            return Outcome(True, (), None)
        groups = _by_subject(ops)
        now = self._now()
        ttl = repr(RESERVATION_TTL)
        parts: list[tuple[str, list[str]]] = []
        calls = []
        for tag, idx in groups:
            names = [_name(tag, ops[i]) for i in idx]
            parts.append((tag, names))
            calls.append((_RESERVE, [_rsv(tag, rid), _rsvs(tag), _index(tag), *names],
                          [now, _op_args(ops, idx), rid, ttl]))
        self._remember(rid, parts)
        results = await self._run(calls)
        failed = [r for r in results if isinstance(r, BaseException)]
        refused = any(not isinstance(r, BaseException) and not int(r[0]) for r in results)
        if failed or refused:
            # Undo the parts that may have counted: those that fit, and those
            # whose answer was lost (a release that overtakes its reserve voids it).
            undo = [part for part, r in zip(parts, results, strict=True)
                    if isinstance(r, BaseException) or int(r[0])]
            self._reserved.pop(rid, None)
            if failed:
                self._in_background(self._release_parts(rid, undo))
                raise failed[0]
            await self._release_parts(rid, undo)
        return _merge(ops, groups, results)  # type: ignore[arg-type]

    async def release(self, rid: str) -> bool:
        """Take back what ``reserve(rid)`` counted; False when there is nothing to release."""
        entry = self._reserved.get(rid)  # kept: a repeated release answers True again
        if entry is None:
            return False
        return await self._release_parts(rid, entry[1])

    async def add(self, ops: Sequence[Op]) -> Outcome:
        """Count unconditionally; the Outcome is as ``check`` saw it before."""
        _no_negative(ops)
        if not ops:
            return Outcome(True, (), None)
        groups = _by_subject(ops)
        now = self._now()
        calls = [(_ADD, [_index(tag), *(_name(tag, ops[i]) for i in idx)],
                  [now, _op_args(ops, idx)]) for tag, idx in groups]
        return _merge(ops, groups, _raise_first(await self._run(calls)))

    async def mark(self, ops: Sequence[Op]) -> None:
        """Add each amount (possibly negative) to the bucket of ``op.at`` (default now)."""
        ops = [op for op in ops if op.amount]
        if not ops:
            return
        groups = _by_subject(ops)
        now = self._now()
        calls = []
        for tag, idx in groups:
            calls.append((_MARK, [_index(tag), *(_name(tag, ops[i]) for i in idx)],
                          [now, _mark_args(ops, idx)]))
        _raise_first(await self._run(calls))

    # -- support -----------------------------------------------------------------

    async def reset(self, keys: Iterable[str]) -> int:
        """Clear every counter of ``keys`` and their part of open reservations;
        the number of counters that held a count."""
        calls = [(_RESET, [_index(tag), _rsvs(tag)], [self._now(), *prefixes])
                 for tag, prefixes in _prefixes_by_subject(keys).items()]
        return sum(int(r) for r in _raise_first(await self._run(calls)))

    async def inspect(self, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Per key, its counters as :meth:`CounterShard.snapshot` gives them: series,
        window, count, clears_at (epoch seconds) and buckets ([ends at, count], oldest first)."""
        keys = list(dict.fromkeys(keys))
        by_subject = _prefixes_by_subject(keys)
        calls = [(_INSPECT, [_index(tag)], [self._now(), *prefixes])
                 for tag, prefixes in by_subject.items()]
        out: dict[str, list[dict[str, Any]]] = {key: [] for key in keys}
        prefix_of = {_key_prefix(key): key for key in keys}
        for rows in _raise_first(await self._run(calls)):
            for name, flat in rows:
                name = _text(name)
                prefix = next(p for p in prefix_of if name.startswith(p))
                series, _, window_text = name[len(prefix):].rpartition("|")
                window = float(window_text)
                width = window / scripts.SLOTS
                live = sorted((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))
                out[prefix_of[prefix]].append({
                    "series": series, "window": window, "count": sum(n for _, n in live),
                    # When the oldest counted bucket stops counting, and every bucket's end.
                    "clears_at": (live[0][0] + scripts.SLOTS + 1) * width,
                    "buckets": [[(index + scripts.SLOTS + 1) * width, n] for index, n in live]})
        for rows in out.values():
            rows.sort(key=lambda row: (row["series"], row["window"]))
        return out

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        close = getattr(self.redis, "aclose", None)
        if close is not None:
            await close()

    # -- the pipeline ------------------------------------------------------------

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    async def _run(self, calls: list[tuple[_Script, list[str], list[str]]]) -> list[Any]:
        """Each call's reply, or the CounterUnavailable that stands for it."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for script, keys, args in calls:
            future = loop.create_future()
            self._queue.append((script, keys, args, future))
            futures.append(future)
        if self._sender is None:
            self._sender = loop.create_task(self._send_all())
        started = time.perf_counter()
        await asyncio.wait(futures, timeout=self.timeout)
        if self._observe is not None:
            self._observe(time.perf_counter() - started, True)
        results: list[Any] = []
        for future in futures:
            if not future.done():
                future.cancel()
                results.append(CounterUnavailable(
                    f"redis did not answer within {self.timeout:g} s"))
            else:
                results.append(future.exception() or future.result())
        return results

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await asyncio.wait_for(self._pipeline(batch, use_sha=True), self.timeout)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # A restarted or new Redis node: EVAL once there caches the script again.
                again = await asyncio.wait_for(
                    self._pipeline([batch[i] for i in missing], use_sha=False), self.timeout)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            problem = CounterUnavailable(f"redis: {_describe(exc)}")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(problem)
            return
        for (script, *_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(CounterUnavailable(f"redis {script.name}: {reply}"))
            else:
                future.set_result(reply)

    async def _pipeline(self, batch: list[_Call], use_sha: bool) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            if use_sha:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            else:
                pipe.eval(script.text, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    # -- reservations ---------------------------------------------------------------

    def _remember(self, rid: str, parts: list[tuple[str, list[str]]]) -> None:
        now = time.monotonic()
        reserved = self._reserved
        while reserved:
            first = next(iter(reserved))
            if reserved[first][0] > now:
                break
            del reserved[first]
        reserved[rid] = (now + RESERVATION_TTL, parts)

    async def _release_parts(self, rid: str, parts: list[tuple[str, list[str]]]) -> bool:
        if not parts:
            return False
        now, ttl = self._now(), repr(RESERVATION_TTL)
        calls = [(_RELEASE, [_rsv(tag, rid), *names], [now, ttl, rid]) for tag, names in parts]
        return all(int(r) == 1 for r in _raise_first(await self._run(calls)))

    def _in_background(self, work: Any) -> None:
        async def quietly() -> None:
            try:
                await work
            except CounterUnavailable:
                pass  # the reservation keeps its count: an under-admission, never an over one

        task = asyncio.get_running_loop().create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def counters_for(settings: Settings, ring: Any,
                 observe: Callable[[float, bool], None] | None = None) -> Any:
    """The counter client ``[counters] backend`` asks for: this host's ``ring``
    client, or Redis shared by every host. Changing it takes a restart."""
    counters = settings.counters
    if counters.backend != "redis":
        return ring
    return connect(counters.redis_url, counters.redis_cluster, settings.cluster.request_timeout,
                   observe)


def connect(redis_url: str, cluster_nodes: Sequence[tuple[str, int]], timeout: float,
            observe: Callable[[float, bool], None] | None = None) -> RedisCounters:
    """A client for one server (``redis_url``) or a Redis Cluster (seed nodes).

    Nothing is connected yet: the first call connects, so a worker starts
    while Redis is down and answers 451 until it is back."""
    return RedisCounters(redis_client(redis_url, cluster_nodes, timeout), timeout,
                         observe=observe)


def redis_client(redis_url: str, cluster_nodes: Sequence[tuple[str, int]],
                 timeout: float) -> Any:
    """A ``redis.asyncio`` client of ``[counters]``, not connected yet; every socket
    operation bounded by ``timeout``."""
    if cluster_nodes:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        # The cluster client keeps its own retries: after a failover it must
        # reload the slot map and try the new master.
        client: Any = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes],
            socket_timeout=timeout, socket_connect_timeout=timeout)
    else:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside the client: a dead server must give 451 within the
        # timeout, and only reserve and release are safe to send twice.
        client = Redis.from_url(redis_url, socket_timeout=timeout,
                                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    return client


# -- helpers --------------------------------------------------------------------------

def _by_subject(ops: Sequence[Op]) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        groups.setdefault(subject_tag(op.key), []).append(i)
    return list(groups.items())


def _name(tag: str, op: Op) -> str:
    return counter_name(tag, op.key, op.series, op.window)


def _index(tag: str) -> str:
    return f"{PREFIX}{tag}:counters"


def _rsv(tag: str, rid: str) -> str:
    return f"{PREFIX}{tag}:rsv:{rid}"


def _rsvs(tag: str) -> str:
    return f"{PREFIX}{tag}:rsvs"


def _mark_args(ops: Sequence[Op], idx: list[int]) -> str:
    parts = []
    for i in idx:
        at = ops[i].at
        parts.append(f"{float(ops[i].window)!r},{'' if at is None else repr(float(at))},"
                     f"{ops[i].amount}")
    return ";".join(parts)


def _op_args(ops: Sequence[Op], idx: list[int]) -> str:
    return ";".join(f"{float(ops[i].window)!r},{'' if ops[i].max is None else ops[i].max},"
                    f"{ops[i].amount}" for i in idx)


def _no_negative(ops: Sequence[Op]) -> None:
    for op in ops:
        if op.amount < 0:
            raise ValueError(f"negative amount outside mark(): {op!r}")


def _merge(ops: Sequence[Op], groups: list[tuple[str, list[int]]],
           replies: list[Any]) -> Outcome:
    counts = [0] * len(ops)
    denied: int | None = None
    for (_, idx), reply in zip(groups, replies, strict=True):
        values = [int(v) for v in reply]
        for j, i in enumerate(idx):
            counts[i] = values[2 + j] if 2 + j < len(values) else 0
        if values[1]:
            first = idx[values[1] - 1]
            denied = first if denied is None else min(denied, first)
    return Outcome(denied is None, tuple(counts), denied)


def _raise_first(results: list[Any]) -> list[Any]:
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _prefixes_by_subject(keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in keys:
        tag = subject_tag(key)
        out.setdefault(tag, []).append(_key_prefix(key))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
