"""Recipient-domain and delivery lookups over aiodns, with our own TTL cache.

:meth:`DomainResolver.destination_status` answers SPEC §3.5 for RCPT: a
domain takes mail when it has an MX with a real exchange or, failing any MX,
an A or AAAA record. :meth:`~DomainResolver.mx_hosts` and
:meth:`~DomainResolver.addresses` serve delivery from the same cache.

Caching is per (name, record type), for the smallest TTL of the answer;
negative answers (NXDOMAIN, no data) for ``negative_ttl``; temporary failures
never. RFC 2308 would have negative answers kept for the SOA minimum, but
pycares hands back only an error code for them, never the authority section,
so the SOA cannot be read.

c-ares keeps a query cache of its own in every channel (up to 3600 s) that
pycares gives no way to turn off: ``ares_options.qcache_max_ttl`` exists but
``pycares.Channel`` never sets ``ARES_OPT_QUERY_CACHE``. It honours TTLs, so
it only ever returns answers that are still valid, with TTLs counted down,
except one case: c-ares 1.34 keeps a no-data answer for its full 3600 s
whatever the SOA says. Our cache stays the one that decides; the c-ares one
can at worst make a re-query after our expiry come back without a packet.

A resolver owns a c-ares channel and its event thread: build it inside the
worker's running loop, after the fork, never before.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiodns
import pycares
from aiodns import error as ares_error

__all__ = [
    "DestinationStatus",
    "DnsError",
    "DnsPermError",
    "DnsTempError",
    "DomainResolver",
]

_QTYPES = {"A": pycares.QUERY_TYPE_A, "AAAA": pycares.QUERY_TYPE_AAAA, "MX": pycares.QUERY_TYPE_MX}

# Answers that say something final about the name. EBADNAME is c-ares refusing
# a name that cannot exist in DNS (a label over 63 octets and the like).
_NXDOMAIN_CODES = frozenset({ares_error.ARES_ENOTFOUND, ares_error.ARES_EBADNAME})
_NODATA_CODES = frozenset({ares_error.ARES_ENODATA})

# c-ares doubles the per-try timeout each round; with three tries on one server
# the tries take 1 + 2 + 4 = 7 units, so a unit of timeout/7 lets all three
# happen inside the overall budget instead of the first one eating it.
_TRIES = 3
_TRY_UNITS = 7

# Upper bound on any positive TTL, whatever a zone publishes.
_MAX_TTL = 86400.0


class DestinationStatus(enum.Enum):
    OK = "ok"
    INVALID = "invalid"
    TEMPFAIL = "tempfail"


class DnsError(Exception):
    """A lookup gave no usable answer."""


class DnsTempError(DnsError):
    """Timeout, SERVFAIL, refused or another failure worth retrying later."""


class DnsPermError(DnsError):
    """The name does not exist or has no record of the kind needed."""


@dataclass(frozen=True, slots=True)
class _RRset:
    # MX: (preference, exchange) pairs; A/AAAA: address strings.
    records: tuple[Any, ...]
    nxdomain: bool = False


class _TTLCache:
    """Bounded LRU of (name, type) -> _RRset, each entry with its own expiry."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self._entries: OrderedDict[tuple[str, str], tuple[float, _RRset]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: tuple[str, str]) -> _RRset | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires_at, rrset = item
        if self._clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return rrset

    def put(self, key: tuple[str, str], rrset: _RRset, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, rrset)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _parse_nameserver(text: str) -> str:
    """``"ip"``, ``"ip:port"``, ``"[v6]:port"`` -> c-ares' ``ip:port`` form."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid nameserver {text!r}: expected IP or IP:PORT")
        port = rest[1:] or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        address = ipaddress.ip_address(host)
        port_number = int(port)
    except ValueError:
        raise ValueError(f"invalid nameserver {text!r}: expected IP or IP:PORT") from None
    if not 0 < port_number < 65536:
        raise ValueError(f"invalid nameserver {text!r}: port out of range")
    if address.version == 6:
        return f"[{address}]:{port_number}"
    return f"{address}:{port_number}"


class DomainResolver:
    """MX/A/AAAA lookups for one worker; see the module docstring."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        *,
        negative_ttl: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive (got {timeout!r})")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 (got {max_entries!r})")
        # Fails outside a running loop, which is the point: see module docstring.
        asyncio.get_running_loop()
        self._negative_ttl = negative_ttl
        self._cache = _TTLCache(max_entries, clock)
        self._inflight: dict[tuple[str, str], asyncio.Task[_RRset]] = {}
        self._closed = False
        self._config: tuple[tuple[str, ...], float] = (tuple(nameservers), timeout)
        # Channels replaced by reconfigure(), closed once their lookups had their time.
        self._retired: set[aiodns.DNSResolver] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._timeout = timeout
        self._resolver = self._channel(nameservers, timeout)

    @staticmethod
    def _channel(nameservers: Sequence[str], timeout: float) -> aiodns.DNSResolver:
        servers = [_parse_nameserver(s) for s in nameservers]
        # An empty list leaves c-ares on /etc/resolv.conf.
        return aiodns.DNSResolver(
            nameservers=servers or None,
            loop=asyncio.get_running_loop(),
            timeout=timeout / _TRY_UNITS,
            tries=_TRIES,
        )

    def reconfigure(self, nameservers: Sequence[str], timeout: float) -> bool:
        """Other resolvers or another timeout (a reload): True when anything changed.

        Later lookups go to a new channel and the cache starts empty (the
        new resolvers may answer differently); the old channel is closed once
        the lookups already on it had their time.
        """
        if (tuple(nameservers), timeout) == self._config or self._closed:
            return False
        if timeout <= 0:
            raise ValueError(f"timeout must be positive (got {timeout!r})")
        old, old_timeout = self._resolver, self._timeout
        self._resolver = self._channel(nameservers, timeout)
        self._config = (tuple(nameservers), timeout)
        self._timeout = timeout
        self._cache.clear()
        self._retired.add(old)
        asyncio.get_running_loop().call_later(old_timeout + 1.0, self._retire, old)
        return True

    def _retire(self, channel: aiodns.DNSResolver) -> None:
        if channel in self._retired:
            self._retired.discard(channel)
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def destination_status(self, domain: str) -> DestinationStatus:
        """Whether ``domain`` (A-label, lowercase) can receive mail."""
        try:
            async with asyncio.timeout(self._timeout):
                mx = await self._lookup(domain, "MX")
                if mx.nxdomain:
                    return DestinationStatus.INVALID
                if mx.records:
                    if any(exchange for _, exchange in mx.records):
                        return DestinationStatus.OK
                    return DestinationStatus.INVALID  # null MX, RFC 7505
                return await self._has_address(domain)
        except (DnsTempError, TimeoutError):
            return DestinationStatus.TEMPFAIL

    async def mx_hosts(self, domain: str) -> list[tuple[int, str]]:
        """Exchanges by preference; [] for a null MX.

        A domain without MX records gets its implicit MX, ``[(0, domain)]``
        (RFC 5321 §5.1); whether that name has addresses is for
        :meth:`addresses` to say. Equal preferences keep the server's order:
        shuffling them is the caller's choice.
        """
        try:
            async with asyncio.timeout(self._timeout):
                mx = await self._lookup(domain, "MX")
        except TimeoutError:
            raise DnsTempError(f"{domain} MX: timed out after {self._timeout:g}s") from None
        if mx.nxdomain:
            raise DnsPermError(f"{domain}: no such domain")
        if not mx.records:
            return [(0, domain)]
        hosts = [(pref, exchange) for pref, exchange in mx.records if exchange]
        return sorted(hosts, key=lambda item: item[0])

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``.

        One family answering is enough: a server that drops AAAA queries does
        not hide the A records it did return before the deadline.
        """
        lookups = [self._spawn(host, "A"), self._spawn(host, "AAAA")]
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.wait(lookups)
        except TimeoutError:
            pass
        found: list[str] = []
        temporary: str | None = None
        for task in lookups:
            if not task.done():
                task.cancel()
                temporary = f"{host}: timed out after {self._timeout:g}s"
            elif (exc := task.exception()) is not None:
                temporary = str(exc)
            else:
                found.extend(task.result().records)
        if found:
            return found
        if temporary is not None:
            raise DnsTempError(temporary)
        raise DnsPermError(f"{host}: no A or AAAA record")

    async def close(self) -> None:
        """Stop the channel; lookups not answered from the cache then tempfail."""
        if self._closed:
            return
        self._closed = True
        # Closing the channel fails every query still on the wire with
        # ECANCELLED, so their waiters get a temporary error, not a
        # CancelledError they did not ask for.
        await self._resolver.close()
        for channel in list(self._retired):
            self._retired.discard(channel)
            await channel.close()
        if self._closing:
            await asyncio.wait(list(self._closing))
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()))

    # -- internals -------------------------------------------------------

    async def _has_address(self, domain: str) -> DestinationStatus:
        # The first family with records settles it; only when neither has
        # any does a failure of one of them make the answer temporary.
        pending = {self._spawn(domain, "A"), self._spawn(domain, "AAAA")}
        found = temporary = False
        try:
            while pending and not found:
                done, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.exception() is not None:
                        temporary = True
                    elif task.result().records:
                        found = True
        finally:
            for task in pending:
                task.cancel()
        if found:
            return DestinationStatus.OK
        return DestinationStatus.TEMPFAIL if temporary else DestinationStatus.INVALID

    def _spawn(self, name: str, rrtype: str) -> asyncio.Task[_RRset]:
        return asyncio.ensure_future(self._lookup(name, rrtype))

    async def _lookup(self, name: str, rrtype: str) -> _RRset:
        """Cached answer, or join the query already on the wire for it."""
        key = (name, rrtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        query = self._inflight.get(key)
        if query is None:
            if self._closed:
                raise DnsTempError("resolver is closed")
            query = asyncio.ensure_future(self._query(name, rrtype))
            self._inflight[key] = query
            query.add_done_callback(lambda done: self._query_done(key, done))
        # One caller giving up (its deadline) must not cancel the query
        # other callers wait on.
        return await asyncio.shield(query)

    def _query_done(self, key: tuple[str, str], query: asyncio.Task[_RRset]) -> None:
        if self._inflight.get(key) is query:
            del self._inflight[key]
        if not query.cancelled():
            query.exception()  # retrieved: every waiter may have timed out

    async def _query(self, name: str, rrtype: str) -> _RRset:
        if self._closed:
            raise DnsTempError("resolver is closed")
        try:
            result = await self._resolver.query_dns(name, rrtype)
        except ares_error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code in _NXDOMAIN_CODES:
                rrset = _RRset((), nxdomain=True)
            elif code in _NODATA_CODES:
                rrset = _RRset(())
            else:
                reason = exc.args[1] if len(exc.args) > 1 else repr(exc)
                raise DnsTempError(f"{name} {rrtype}: {reason}") from exc
            self._cache.put((name, rrtype), rrset, self._negative_ttl)
            return rrset
        wanted = _QTYPES[rrtype]
        records = [rr for rr in result.answer if rr.type == wanted]
        if not records:
            # A CNAME chain ending nowhere of this type: no data.
            rrset = _RRset(())
            ttl = self._negative_ttl
        else:
            rrset = _RRset(tuple(_rdata(rr) for rr in records))
            # The whole answer, CNAMEs included: the chain is only as fresh
            # as its shortest-lived link.
            ttl = min(float(min(rr.ttl for rr in result.answer)), _MAX_TTL)
        self._cache.put((name, rrtype), rrset, ttl)
        return rrset


def _rdata(rr: pycares.DNSRecord) -> Any:
    data = rr.data
    if rr.type == pycares.QUERY_TYPE_MX:
        # The null MX's "." arrives as "" from c-ares; keep it empty.
        return (data.priority, data.exchange.rstrip(".").lower())
    return data.addr
