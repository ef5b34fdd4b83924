"""Password verification off the event loop, with a cache of successes.

A verification costs 100-300 ms of CPU and, for Argon2id, tens of MiB of
memory. Run on the event loop it would stall every session of the worker;
run without a cap, a flood of failed logins would spawn work until the
worker runs out of memory. So hashes are computed in a small thread pool
and an ``asyncio.Semaphore`` in front of it keeps the excess waiting as
cheap coroutines.

Busy clients (a desktop client opening a connection per message) would pay
the full hash cost every time, so successes are cached for a while. The
cache key is a keyed BLAKE2b of user, stored hash and password: the
password itself is never kept, the key is useless outside this process,
and a changed stored hash (a new password) can never hit an old entry.
Failures are not cached: a wrong guess must always cost the full hash.

A login of an unknown user is verified too, against a decoy hash of the
scheme and cost most accounts use (:meth:`PasswordVerifier.verify_decoy`),
so the reply and its timing do not tell which accounts exist.

The pool is sized per host (:func:`threads_per_worker`): every worker of a
host has its own, and hashing threads beyond the CPUs only add memory
(Argon2id takes tens of MiB per verification) and latency. Logins waiting
for a thread beyond ``max_waiting`` are turned away (:class:`VerifierBusy`)
instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from cluster.passwords import cost_of, decoy_hash, verify_password

__all__ = ["PasswordVerifier", "VerifierBusy", "threads_per_worker", "typical_hash"]

# Accounts looked at to find the usual scheme and cost of the directory.
_TYPICAL_SAMPLE = 1000


class VerifierBusy(Exception):
    """Too many verifications are already waiting for a hashing thread."""


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Hashing threads for one of ``workers`` workers, so the host has about one per CPU."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


def typical_hash(stored: Iterable[str]) -> str | None:
    """One of the hashes with the most common scheme and cost among the first few."""
    by_cost: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for hashed in itertools.islice(stored, _TYPICAL_SAMPLE):
        cost = cost_of(hashed)
        if cost:
            counts[cost] += 1
            by_cost.setdefault(cost, hashed)
    if not counts:
        return None
    return by_cost[counts.most_common(1)[0][0]]


class PasswordVerifier:
    """Verify Dovecot-style password hashes in a capped thread pool.

    Create it in the worker process (after fork) and use it from one event
    loop; the thread pool itself starts on the first verification.
    ``verify`` raises ``cluster.passwords.PasswordSchemeError`` for a stored
    hash it cannot read.
    """

    def __init__(
        self,
        max_concurrent: int = 4,
        *,
        cache_size: int = 10_000,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, got {cache_size}")
        if cache_ttl < 0:
            raise ValueError(f"cache_ttl must not be negative, got {cache_ttl}")
        self.max_concurrent = max_concurrent
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._key = secrets.token_bytes(hashlib.blake2b.MAX_KEY_SIZE)
        # cache key -> expiry time on ``clock``; order is least recently used first.
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._closed = False
        self.cache_hits = 0
        self.cache_misses = 0
        # Verifications waiting for a slot, and handed to the pool but not
        # yet finished: the depth of the login queue, for metrics.
        self.waiting = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        # cost_of(model) -> a decoy hash of that cost; made once, in a pool thread.
        self._decoys: dict[str, str] = {}

    async def verify(self, user: str, stored: str, password: str, *,
                     max_waiting: int | None = None) -> bool:
        """Return whether ``password`` matches ``stored`` for ``user``.

        Raises :class:`VerifierBusy` when the hash would have to wait for a
        thread behind ``max_waiting`` others (a cached success never waits).
        """
        if self._closed:
            raise RuntimeError("PasswordVerifier is closed")
        key = self._cache_key(user, stored, password)
        if self._cache_get(key):
            self.cache_hits += 1
            return True
        self.cache_misses += 1
        ok = await self._verify_in_pool(self._verify_blocking, stored, password, max_waiting)
        if ok:
            self._cache_put(key)
        return ok

    def known_good(self, user: str, stored: str, password: str) -> bool:
        """Whether this exact login succeeded lately (the cache): no hashing needed."""
        if self._cache_get(self._cache_key(user, stored, password)):
            self.cache_hits += 1
            return True
        return False

    async def verify_decoy(self, model: str, password: str, *,
                           max_waiting: int | None = None) -> bool:
        """The work of :meth:`verify` against a hash as costly as ``model``; always False."""
        if self._closed:
            raise RuntimeError("PasswordVerifier is closed")
        await self._verify_in_pool(self._verify_decoy_blocking, model, password, max_waiting)
        return False

    def close(self) -> None:
        """Stop the thread pool and forget cached successes. Idempotent."""
        self._closed = True
        self._cache.clear()
        if self._executor is not None:
            # Verifications still queued are dropped; running ones finish on
            # their own and their callers see the result or the cancellation.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _verify_blocking(self, stored: str, password: str) -> bool:
        """Runs in a pool thread; a subclass may wrap it to observe verifications."""
        return verify_password(stored, password)

    def _verify_decoy_blocking(self, model: str, password: str) -> bool:
        cost = cost_of(model)
        decoy = self._decoys.get(cost)
        if decoy is None:
            # Racing threads may both make one; either is as good.
            decoy = self._decoys.setdefault(cost, decoy_hash(model))
        self._verify_blocking(decoy, password)
        return False

    def _cache_key(self, user: str, stored: str, password: str) -> bytes:
        mac = hashlib.blake2b(key=self._key, digest_size=32)
        for field in (user, stored, password):
            data = field.encode("utf-8", "surrogatepass")
            # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            mac.update(len(data).to_bytes(8, "big"))
            mac.update(data)
        return mac.digest()

    def _cache_get(self, key: bytes) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _cache_put(self, key: bytes) -> None:
        if self.cache_size == 0 or self.cache_ttl == 0:
            return
        self._cache[key] = self._clock() + self.cache_ttl
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _start(self) -> tuple[asyncio.AbstractEventLoop, ThreadPoolExecutor, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            # Created here, in the running loop, so nothing exists before fork.
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
            self._executor = ThreadPoolExecutor(
                max_workers=self.max_concurrent, thread_name_prefix="sendguard-auth"
            )
        elif self._loop is not loop:
            raise RuntimeError("PasswordVerifier is bound to another event loop")
        assert self._executor is not None and self._semaphore is not None
        return loop, self._executor, self._semaphore

    async def _verify_in_pool(self, work: Callable[[str, str], bool], stored: str, password: str,
                              max_waiting: int | None) -> bool:
        loop, executor, semaphore = self._start()
        if max_waiting is not None and semaphore.locked() and self.waiting >= max_waiting:
            raise VerifierBusy(f"{self.waiting} verifications waiting")
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            if self._closed:
                raise RuntimeError("PasswordVerifier is closed")
            future = loop.run_in_executor(executor, work, stored, password)
        except BaseException:
            semaphore.release()
            raise
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        future.add_done_callback(self._finished)
        # A caller that goes away (client disconnected) must not free the
        # slot while its hash is still being computed in a thread, or
        # cancelled logins would let the pool's queue grow without bound.
        return await asyncio.shield(future)

    def _finished(self, _future: asyncio.Future[bool]) -> None:
        self.in_flight -= 1
        assert self._semaphore is not None
        self._semaphore.release()
