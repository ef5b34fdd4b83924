from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from cluster.passwords import PasswordSchemeError, hash_password
from worker.auth import PasswordVerifier, threads_per_worker

FAST_ARGON2 = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
GATE_TIMEOUT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingVerifier(PasswordVerifier):
    """Counts the hash computations that actually reach the thread pool."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.computed = 0
        self._lock = threading.Lock()

    def _verify_blocking(self, stored: str, password: str) -> bool:
        with self._lock:
            self.computed += 1
        return super()._verify_blocking(stored, password)


class GatedVerifier(CountingVerifier):
    """Holds every verification in its thread until the test opens the gate."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _verify_blocking(self, stored: str, password: str) -> bool:
        self.gate.wait(GATE_TIMEOUT)
        return super()._verify_blocking(stored, password)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password("s3cret", "ARGON2ID", **FAST_ARGON2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def verifier(clock: FakeClock) -> AsyncIterator[CountingVerifier]:
    v = CountingVerifier(clock=clock)
    yield v
    v.close()


@pytest.fixture
async def make_gated() -> AsyncIterator[Callable[[int], GatedVerifier]]:
    made: list[GatedVerifier] = []

    def make(max_concurrent: int) -> GatedVerifier:
        v = GatedVerifier(max_concurrent)
        made.append(v)
        return v

    yield make
    for v in made:
        v.gate.set()
        v.close()


@pytest.mark.parametrize(
    ("scheme", "options"),
    [
        ("ARGON2ID", FAST_ARGON2),
        ("ARGON2I", FAST_ARGON2),
        ("BLF-CRYPT", {"cost": 4}),
        ("SHA512-CRYPT", {}),
        ("PLAIN", {}),
    ],
)
async def test_verifies_real_hashes(
    verifier: CountingVerifier, scheme: str, options: dict[str, int]
) -> None:
    stored = hash_password("s3cret", scheme, **options)
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cre7") is False


async def test_second_success_is_served_from_cache(verifier: CountingVerifier, stored: str) -> None:
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert verifier.computed == 1
    assert verifier.cache_hits == 1
    assert verifier.cache_misses == 1


async def test_changed_stored_hash_misses(verifier: CountingVerifier, stored: str) -> None:
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    # The operator sets a new password: the old one must stop working at once.
    changed = hash_password("n3w-secret", "ARGON2ID", **FAST_ARGON2)
    assert await verifier.verify("jan@kowalski.pl", changed, "s3cret") is False
    assert verifier.cache_hits == 0
    # Even a new hash of the same password is a different key.
    rehashed = hash_password("s3cret", "ARGON2ID", **FAST_ARGON2)
    assert await verifier.verify("jan@kowalski.pl", rehashed, "s3cret") is True
    assert verifier.cache_hits == 0
    assert verifier.computed == 3


async def test_failures_are_never_cached(verifier: CountingVerifier, stored: str) -> None:
    for _ in range(3):
        assert await verifier.verify("jan@kowalski.pl", stored, "guess") is False
    assert verifier.computed == 3
    assert verifier.cache_hits == 0


async def test_cache_key_covers_user_and_password(verifier: CountingVerifier, stored: str) -> None:
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert await verifier.verify("ola@kowalski.pl", stored, "s3cret") is True
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret2") is False
    assert verifier.computed == 3
    assert verifier.cache_hits == 0


async def test_cache_holds_no_password(verifier: CountingVerifier) -> None:
    stored = hash_password("s3cret-in-the-clear", "PLAIN")
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret-in-the-clear") is True
    keys = list(verifier._cache)
    assert len(keys) == 1
    assert len(keys[0]) == 32
    assert b"s3cret" not in keys[0]


async def test_entries_expire_after_ttl(
    verifier: CountingVerifier, clock: FakeClock, stored: str
) -> None:
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    clock.now += 299.9
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert verifier.cache_hits == 1
    clock.now += 0.1
    assert await verifier.verify("jan@kowalski.pl", stored, "s3cret") is True
    assert verifier.cache_hits == 1
    assert verifier.computed == 2


async def test_cache_is_bounded_lru(clock: FakeClock) -> None:
    stored = hash_password("pw", "PLAIN")
    v = CountingVerifier(cache_size=2, clock=clock)
    try:

        async def verify(user: str) -> bool:
            return await v.verify(user, stored, "pw")

        await verify("a")
        await verify("b")
        await verify("a")  # hit: "b" is now the least recently used
        await verify("c")  # evicts "b"
        assert v.cache_hits == 1
        await verify("a")
        await verify("c")
        assert v.cache_hits == 3
        await verify("b")
        assert v.cache_hits == 3
        assert v.computed == 4
        assert len(v._cache) == 2
    finally:
        v.close()


async def test_zero_size_disables_cache(clock: FakeClock) -> None:
    stored = hash_password("pw", "PLAIN")
    v = CountingVerifier(cache_size=0, clock=clock)
    try:
        await v.verify("a", stored, "pw")
        await v.verify("a", stored, "pw")
        assert v.cache_hits == 0
        assert v.computed == 2
    finally:
        v.close()


async def test_concurrency_is_capped(make_gated: Callable[[int], GatedVerifier]) -> None:
    v = make_gated(2)
    stored = hash_password("pw", "PLAIN")
    tasks = [asyncio.create_task(v.verify(f"user{i}", stored, "pw")) for i in range(20)]
    await wait_until(lambda: v.in_flight == 2)
    # The other 18 wait on the semaphore, not in the executor's queue.
    for _ in range(20):
        await asyncio.sleep(0)
    assert v.in_flight == 2
    assert v.waiting == 18
    v.gate.set()
    assert await asyncio.gather(*tasks) == [True] * 20
    assert v.peak_in_flight == 2
    assert v.in_flight == 0
    assert v.waiting == 0
    assert v.computed == 20


async def test_event_loop_keeps_running_during_verification(
    make_gated: Callable[[int], GatedVerifier],
) -> None:
    v = make_gated(1)
    task = asyncio.create_task(v.verify("a", hash_password("pw", "PLAIN"), "pw"))
    await wait_until(lambda: v.in_flight == 1)
    ticks = 0
    for _ in range(10):
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 10 and not task.done()
    v.gate.set()
    assert await task is True


async def test_cancelled_caller_keeps_its_slot_until_the_hash_finishes(
    make_gated: Callable[[int], GatedVerifier],
) -> None:
    v = make_gated(1)
    stored = hash_password("pw", "PLAIN")
    first = asyncio.create_task(v.verify("a", stored, "pw"))
    await wait_until(lambda: v.in_flight == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # The thread is still hashing: a new verification must wait for it.
    second = asyncio.create_task(v.verify("b", stored, "pw"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert v.in_flight == 1
    assert v.waiting == 1
    assert v.computed == 0
    v.gate.set()
    assert await second is True
    assert v.peak_in_flight == 1
    assert v.in_flight == 0
    assert v.cache_hits == 0
    # The cancelled success was not cached either.
    assert v.computed == 2


async def test_hit_does_not_queue_behind_slow_verifications(
    make_gated: Callable[[int], GatedVerifier],
) -> None:
    v = make_gated(1)
    stored = hash_password("pw", "PLAIN")
    v.gate.set()
    assert await v.verify("a", stored, "pw") is True
    v.gate.clear()
    busy = asyncio.create_task(v.verify("b", stored, "wrong"))
    await wait_until(lambda: v.in_flight == 1)
    assert await v.verify("a", stored, "pw") is True
    assert v.cache_hits == 1
    v.gate.set()
    assert await busy is False


async def test_scheme_error_propagates_and_frees_the_slot(
    verifier: CountingVerifier,
) -> None:
    with pytest.raises(PasswordSchemeError, match="unknown password scheme"):
        await verifier.verify("a", "{MD5}$1$abc$def", "pw")
    assert verifier.in_flight == 0
    assert verifier.cache_hits == 0
    stored = hash_password("pw", "PLAIN")
    assert await verifier.verify("a", stored, "pw") is True


def test_construction_needs_no_event_loop_and_starts_no_threads() -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("sendguard-auth")}
    v = PasswordVerifier()
    after = {t for t in threading.enumerate() if t.name.startswith("sendguard-auth")}
    assert after <= before
    v.close()


async def test_close_is_final_and_idempotent(stored: str) -> None:
    v = PasswordVerifier()
    assert await v.verify("a", stored, "s3cret") is True
    v.close()
    v.close()
    with pytest.raises(RuntimeError, match="PasswordVerifier is closed"):
        await v.verify("a", stored, "s3cret")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_concurrent": 0}, "max_concurrent must be at least 1, got 0"),
        ({"cache_size": -1}, "cache_size must not be negative, got -1"),
        ({"cache_ttl": -1.0}, "cache_ttl must not be negative, got -1.0"),
    ],
)
def test_bad_arguments(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        PasswordVerifier(**options)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_hashing_threads_are_shared_out_per_host() -> None:
    # Every worker of a host has a pool: together about one thread per CPU, never none.
    assert threads_per_worker(1, cpus=8) == 8
    assert threads_per_worker(4, cpus=8) == 2
    assert threads_per_worker(8, cpus=2) == 1
    assert threads_per_worker(0, cpus=2) == 2
