from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from dnsserver import TestDNSServer

from worker.dns import (
    DestinationStatus,
    DnsPermError,
    DnsTempError,
    DomainResolver,
    _RRset,
    _TTLCache,
)

OK = DestinationStatus.OK
INVALID = DestinationStatus.INVALID
TEMPFAIL = DestinationStatus.TEMPFAIL

# c-ares keeps its own cache (it cannot be turned off, see worker/dns.py) and
# forgets a 1 s entry within a second of real time. Tests that must tell our
# cache from that one let this much real time pass first.
CARES_CACHE_EXPIRY = 1.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def dns() -> Iterator[TestDNSServer]:
    """An empty zone, unlike conftest's; a 1 s SOA so c-ares forgets NXDOMAIN fast."""
    with TestDNSServer(negative_ttl=1) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_resolver(
    dns: TestDNSServer, clock: FakeClock
) -> AsyncIterator[Callable[..., DomainResolver]]:
    made: list[DomainResolver] = []

    def make(**kwargs: object) -> DomainResolver:
        kwargs.setdefault("nameservers", [dns.address])
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("clock", clock)
        resolver = DomainResolver(**kwargs)  # type: ignore[arg-type]
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


@pytest.fixture
async def resolver(make_resolver: Callable[..., DomainResolver]) -> DomainResolver:
    return make_resolver()


def queries_for(dns: TestDNSServer, domain: str) -> list[tuple[str, str]]:
    return [q for q in dns.queries if q[0] == domain]


# -- destination_status ------------------------------------------------------


async def test_mx_is_ok(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_mx("example.com", "mx.example.com", 10)
    assert await resolver.destination_status("example.com") is OK
    assert queries_for(dns, "example.com") == [("example.com", "MX")]


async def test_no_mx_but_a_is_ok(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_a("a-only.example", "192.0.2.10")
    assert await resolver.destination_status("a-only.example") is OK


async def test_only_aaaa_is_ok(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_aaaa("v6-only.example", "2001:db8::25")
    assert await resolver.destination_status("v6-only.example") is OK


async def test_nxdomain_is_invalid(dns: TestDNSServer, resolver: DomainResolver) -> None:
    assert await resolver.destination_status("no-such-domain.example") is INVALID
    # NXDOMAIN on MX settles it: no A/AAAA queries follow.
    assert queries_for(dns, "no-such-domain.example") == [("no-such-domain.example", "MX")]


async def test_no_mx_and_no_address_is_invalid(
    dns: TestDNSServer, resolver: DomainResolver
) -> None:
    dns.add_txt("parked.example", "v=spf1 -all")
    assert await resolver.destination_status("parked.example") is INVALID
    assert sorted(queries_for(dns, "parked.example")) == [
        ("parked.example", "A"),
        ("parked.example", "AAAA"),
        ("parked.example", "MX"),
    ]


async def test_null_mx_is_invalid_even_with_an_address(
    dns: TestDNSServer, resolver: DomainResolver
) -> None:
    dns.add_null_mx("nomail.example")
    dns.add_a("nomail.example", "192.0.2.20")
    assert await resolver.destination_status("nomail.example") is INVALID


async def test_servfail_is_tempfail(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.set_servfail("broken.example")
    assert await resolver.destination_status("broken.example") is TEMPFAIL


async def test_refused_is_tempfail(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.set_refused("refused.example")
    assert await resolver.destination_status("refused.example") is TEMPFAIL


async def test_no_answer_is_tempfail_within_timeout(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver]
) -> None:
    dns.set_timeout("silent.example")
    resolver = make_resolver(timeout=1.0)
    started = time.monotonic()
    assert await resolver.destination_status("silent.example") is TEMPFAIL
    elapsed = time.monotonic() - started
    assert elapsed < 2.5  # 3 tries of 1 s each would take 3 s and more
    # c-ares retried inside the budget rather than spending it on one try.
    assert len(queries_for(dns, "silent.example")) >= 2


async def test_address_found_despite_the_other_family_failing(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver]
) -> None:
    dns.add_a("half.example", "192.0.2.30")
    dns.set_servfail("half.example", "AAAA")
    # The A answer comes well after the AAAA failure, so the resolver has
    # seen the failure first and must still wait for the other family. The
    # delay stays inside c-ares's first try (5 s / 7) so A is asked once.
    dns.set_delay("half.example", "A", 0.3)
    resolver = make_resolver(timeout=5.0)
    assert await resolver.destination_status("half.example") is OK
    assert ("half.example", "AAAA") in queries_for(dns, "half.example")


async def test_concurrent_lookups_share_one_query(
    dns: TestDNSServer, resolver: DomainResolver
) -> None:
    dns.add_mx("popular.example", "mx.popular.example", 10)
    results = await asyncio.gather(
        *(resolver.destination_status("popular.example") for _ in range(20))
    )
    assert set(results) == {OK}
    assert queries_for(dns, "popular.example") == [("popular.example", "MX")]


# -- cache -------------------------------------------------------------------


async def test_positive_answer_cached_for_its_ttl(
    dns: TestDNSServer, resolver: DomainResolver, clock: FakeClock
) -> None:
    dns.add_mx("cached.example", "mx.cached.example", 10, ttl=1)
    assert await resolver.destination_status("cached.example") is OK
    assert len(queries_for(dns, "cached.example")) == 1

    await asyncio.sleep(CARES_CACHE_EXPIRY)
    clock.advance(0.9)
    assert await resolver.destination_status("cached.example") is OK
    assert len(queries_for(dns, "cached.example")) == 1

    clock.advance(0.2)
    assert await resolver.destination_status("cached.example") is OK
    assert len(queries_for(dns, "cached.example")) == 2


async def test_ttl_is_the_smallest_in_the_answer(
    dns: TestDNSServer, resolver: DomainResolver, clock: FakeClock
) -> None:
    dns.add_mx("two.example", "mx1.two.example", 10, ttl=3600)
    dns.add_mx("two.example", "mx2.two.example", 20, ttl=1)
    assert await resolver.destination_status("two.example") is OK
    await asyncio.sleep(CARES_CACHE_EXPIRY)
    clock.advance(1.1)
    assert await resolver.destination_status("two.example") is OK
    assert len(queries_for(dns, "two.example")) == 2


async def test_negative_answer_cached(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver], clock: FakeClock
) -> None:
    resolver = make_resolver(negative_ttl=300)
    assert await resolver.destination_status("typo.example") is INVALID
    assert len(queries_for(dns, "typo.example")) == 1

    await asyncio.sleep(CARES_CACHE_EXPIRY)
    clock.advance(299)
    assert await resolver.destination_status("typo.example") is INVALID
    assert len(queries_for(dns, "typo.example")) == 1

    dns.add_mx("typo.example", "mx.typo.example", 10)
    clock.advance(2)
    assert await resolver.destination_status("typo.example") is OK
    assert len(queries_for(dns, "typo.example")) == 2


async def test_no_data_answer_cached(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_a("a-only.example", "192.0.2.10")
    assert await resolver.destination_status("a-only.example") is OK
    assert await resolver.destination_status("a-only.example") is OK
    # The AAAA query may still be on its way when A answers: count the others.
    asked = queries_for(dns, "a-only.example")
    assert asked.count(("a-only.example", "MX")) == 1
    assert asked.count(("a-only.example", "A")) == 1


async def test_tempfail_not_cached(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.set_servfail("flaky.example")
    assert await resolver.destination_status("flaky.example") is TEMPFAIL
    first = len(queries_for(dns, "flaky.example"))
    assert await resolver.destination_status("flaky.example") is TEMPFAIL
    assert len(queries_for(dns, "flaky.example")) == 2 * first

    dns.remove("flaky.example")
    dns.add_mx("flaky.example", "mx.flaky.example", 10)
    assert await resolver.destination_status("flaky.example") is OK


async def test_timeout_not_cached(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver]
) -> None:
    resolver = make_resolver(timeout=0.5)
    dns.set_timeout("slow.example")
    assert await resolver.destination_status("slow.example") is TEMPFAIL
    dns.remove("slow.example")
    dns.add_a("slow.example", "192.0.2.40")
    # The first query may still be on the wire, and on a busy machine one more
    # lookup may time out too: ask again until the answer comes. A cached
    # timeout would keep answering TEMPFAIL far longer than this deadline.
    deadline = asyncio.get_running_loop().time() + 15
    status = TEMPFAIL
    while status is not OK and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        status = await resolver.destination_status("slow.example")
    assert status is OK


def test_cache_is_bounded_and_evicts_least_recently_used() -> None:
    clock = FakeClock()
    cache = _TTLCache(max_entries=2, clock=clock)
    a, b, c = _RRset(("192.0.2.1",)), _RRset(("192.0.2.2",)), _RRset(("192.0.2.3",))
    cache.put(("a.example", "A"), a, 60)
    cache.put(("b.example", "A"), b, 60)
    assert cache.get(("a.example", "A")) == a  # now b is the oldest
    cache.put(("c.example", "A"), c, 60)
    assert len(cache) == 2
    assert cache.get(("b.example", "A")) is None
    assert cache.get(("a.example", "A")) == a
    assert cache.get(("c.example", "A")) == c


def test_cache_expiry_and_zero_ttl() -> None:
    clock = FakeClock()
    cache = _TTLCache(max_entries=10, clock=clock)
    rrset = _RRset(("192.0.2.1",))
    cache.put(("a.example", "A"), rrset, 60)
    clock.advance(59.9)
    assert cache.get(("a.example", "A")) == rrset
    clock.advance(0.1)
    assert cache.get(("a.example", "A")) is None
    cache.put(("z.example", "A"), rrset, 0)
    assert cache.get(("z.example", "A")) is None
    assert len(cache) == 0


# -- mx_hosts / addresses ------------------------------------------------------


async def test_mx_hosts_sorted_by_preference(
    dns: TestDNSServer, resolver: DomainResolver
) -> None:
    dns.add_mx("multi.example", "backup.multi.example", 20)
    dns.add_mx("multi.example", "MX1.Multi.Example", 5)
    dns.add_mx("multi.example", "mx2.multi.example", 10)
    assert await resolver.mx_hosts("multi.example") == [
        (5, "mx1.multi.example"),
        (10, "mx2.multi.example"),
        (20, "backup.multi.example"),
    ]


async def test_mx_hosts_null_mx_is_empty(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_null_mx("nomail.example")
    assert await resolver.mx_hosts("nomail.example") == []


async def test_mx_hosts_implicit_mx(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_a("a-only.example", "192.0.2.10")
    assert await resolver.mx_hosts("a-only.example") == [(0, "a-only.example")]


async def test_mx_hosts_errors(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.set_servfail("broken.example")
    with pytest.raises(DnsPermError):
        await resolver.mx_hosts("no-such-domain.example")
    with pytest.raises(DnsTempError):
        await resolver.mx_hosts("broken.example")


async def test_addresses_a_then_aaaa(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_aaaa("mx.example.com", "2001:db8::1")
    dns.add_a("mx.example.com", "192.0.2.1")
    dns.add_a("mx.example.com", "192.0.2.2")
    assert await resolver.addresses("mx.example.com") == [
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8::1",
    ]


async def test_addresses_errors(dns: TestDNSServer, resolver: DomainResolver) -> None:
    dns.add_txt("noaddr.example", "hello")
    dns.set_servfail("broken.example")
    with pytest.raises(DnsPermError):
        await resolver.addresses("no-such-host.example")
    with pytest.raises(DnsPermError):
        await resolver.addresses("noaddr.example")
    with pytest.raises(DnsTempError):
        await resolver.addresses("broken.example")


async def test_addresses_time_out(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver]
) -> None:
    dns.set_timeout("silent.example")
    resolver = make_resolver(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        await resolver.addresses("silent.example")
    assert time.monotonic() - started < 2.0  # 3 tries of 0.5 s would take 1.5 s and more


# -- construction and lifecycle -----------------------------------------------


async def test_nameserver_with_port(dns: TestDNSServer) -> None:
    assert dns.address == f"127.0.0.1:{dns.port}"
    dns.add_mx("example.com", "mx.example.com", 10)
    resolver = DomainResolver(nameservers=[dns.address], timeout=2.0)
    try:
        assert await resolver.destination_status("example.com") is OK
    finally:
        await resolver.close()
    assert dns.queries == [("example.com", "MX")]


@pytest.mark.parametrize(
    "nameserver", ["example.com", "127.0.0.1:0", "127.0.0.1:70000", "[::1", "1.2.3.4:x"]
)
async def test_bad_nameserver_refused(nameserver: str) -> None:
    with pytest.raises(ValueError, match="invalid nameserver"):
        DomainResolver(nameservers=[nameserver])


def test_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        DomainResolver(nameservers=["127.0.0.1"])


async def test_close_fails_pending_lookups_as_tempfail(
    dns: TestDNSServer, make_resolver: Callable[..., DomainResolver]
) -> None:
    dns.set_timeout("silent.example")
    resolver = make_resolver(timeout=5.0)
    lookup = asyncio.ensure_future(resolver.destination_status("silent.example"))
    while not dns.queries:
        await asyncio.sleep(0.01)
    await resolver.close()
    assert await asyncio.wait_for(lookup, 1.0) is TEMPFAIL
    assert await resolver.destination_status("silent.example") is TEMPFAIL
    await resolver.close()
