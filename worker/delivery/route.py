"""Where mail for a destination goes: the ordered list of next hops to try.

In ``mx`` mode a destination is a recipient domain: its MX hosts in
preference order (equal preferences shuffled, RFC 5321 §5.1), each expanded
to its addresses, IPv4 first. In ``smarthost`` mode every message goes to
the one configured relay. A routing failure decides the fate of every
recipient of the destination at once, so it is raised as a :class:`Result`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
from dataclasses import dataclass

from cluster.hostport import split_host_port
from cluster.settings import DeliverySettings
from worker.delivery.result import BOUNCED, DEFERRED, Result, local
from worker.dns import DnsPermError, DnsTempError, DomainResolver

# Postfix tries at most 5 addresses per delivery (smtp_mx_address_limit); a
# few more here, since a dead IPv6 address fails fast on most hosts.
MAX_HOPS = 10


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to connect to, and the name it was found under."""

    host: str
    address: str
    port: int

    @property
    def label(self) -> str:
        """``mx.example.org[192.0.2.1]``, with ``:port`` when not 25, as Postfix logs it."""
        text = f"{self.host}[{self.address}]"
        return text if self.port == 25 else f"{text}:{self.port}"


class RouteError(Exception):
    """No hop to try; ``result`` applies to every recipient of the destination."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.detail)
        self.result = result


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Router:
    def __init__(self, resolver: DomainResolver | None) -> None:
        self._resolver = resolver

    async def hops(self, domain: str | None, settings: DeliverySettings) -> list[Hop]:
        """Next hops for ``domain`` (an A-label), or for the smarthost when None."""
        if domain is None:
            return await self._smarthost(settings)
        return await self._mx(domain, settings.port)

    async def _smarthost(self, settings: DeliverySettings) -> list[Hop]:
        try:
            host, port = split_host_port(settings.smarthost)
        except ValueError:
            # Mode switched by a reload while mail was queued for the relay:
            # the next attempt regroups it by domain.
            raise RouteError(local(DEFERRED, "no smarthost configured", "4.3.5")) from None
        if _is_ip(host):
            return [Hop(host, host, port)]
        try:
            addresses = await self._addresses(host)
        except (DnsPermError, DnsTempError) as exc:
            # A relay that does not resolve is a configuration problem,
            # never the recipients' fault: keep the mail queued.
            raise RouteError(local(DEFERRED, f"smarthost lookup failed: {exc}", "4.4.4")) from None
        return [Hop(host, address, port) for address in addresses][:MAX_HOPS]

    async def _mx(self, domain: str, port: int) -> list[Hop]:
        if self._resolver is None:
            raise RouteError(local(DEFERRED, "no DNS resolver for MX delivery", "4.3.5"))
        try:
            exchanges = await self._resolver.mx_hosts(domain)
        except DnsTempError as exc:
            raise RouteError(local(DEFERRED, f"Host or domain name lookup failed: {exc}",
                                   "4.4.3")) from None
        except DnsPermError:
            raise RouteError(local(BOUNCED, f"Host or domain name not found: {domain}",
                                   "5.1.2")) from None
        if not exchanges:
            raise RouteError(local(BOUNCED, f"{domain} does not accept mail (null MX)",
                                   "5.1.10"))
        ordered: list[str] = []
        for _, group in itertools.groupby(exchanges, key=lambda item: item[0]):
            names = [name for _, name in group]
            random.shuffle(names)
            ordered.extend(names)
        lookups = await asyncio.gather(*(self._addresses_or_error(name) for name in ordered))
        hops: list[Hop] = []
        temporary: Exception | None = None
        for name, found in zip(ordered, lookups, strict=True):
            if isinstance(found, DnsTempError):
                temporary = found
            elif isinstance(found, list):
                hops.extend(Hop(name, address, port) for address in found)
        if hops:
            return hops[:MAX_HOPS]
        if temporary is not None:
            raise RouteError(local(DEFERRED, f"MX host lookup failed: {temporary}", "4.4.3"))
        raise RouteError(local(BOUNCED, f"no address for the mail exchangers of {domain}: "
                               + ", ".join(ordered), "5.4.4"))

    async def _addresses(self, host: str) -> list[str]:
        if self._resolver is None:
            raise DnsTempError(f"{host}: no DNS resolver")
        return await self._resolver.addresses(host)

    async def _addresses_or_error(self, host: str) -> list[str] | Exception:
        if _is_ip(host):
            return [host]
        try:
            return await self._addresses(host)
        except (DnsTempError, DnsPermError) as exc:
            return exc
