"""A real DNS server on loopback for tests, with zone data set at runtime.

Answers over UDP and TCP on one ephemeral port of 127.0.0.1::

    with TestDNSServer() as dns:
        dns.add_mx("example.com", "mx.example.com", 10, ttl=60)
        resolver = DomainResolver(nameservers=[dns.address])

Zone data: ``add_mx``, ``add_null_mx``, ``add_a``, ``add_aaaa``, ``add_txt``;
failures: ``set_servfail``, ``set_refused``, ``set_timeout`` (never answers);
``remove`` forgets a name. A name with records of other types gets NOERROR and
no data, a name never mentioned gets NXDOMAIN; both carry an SOA in the
authority section whose TTL and MINIMUM are ``negative_ttl`` (RFC 2308).
``queries`` lists every (name, type) received, in order, so a test can assert
that a cached answer sent nothing.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSLabel, DNSRecord
from dnslib.server import DNSLogger, DNSServer

__all__ = ["TestDNSServer"]


class _NoAnswer(DNSError):
    """Raised by the resolver to drop a query: dnslib's handler swallows DNSError
    and sends nothing, which is exactly an unresponsive server."""


def _norm(name: str | DNSLabel) -> str:
    return str(name).rstrip(".").lower()


class _ZoneResolver:
    def __init__(self, server: TestDNSServer) -> None:
        self._server = server

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = _norm(request.q.qname)
        qtype = QTYPE.get(request.q.qtype)
        return self._server._answer(request, qname, qtype)


class TestDNSServer:
    """Authoritative-looking server for any name; see the module docstring."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, negative_ttl: int = 60) -> None:
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}
        self._servfail: set[tuple[str, str | None]] = set()  # (name, type or None: every type)
        self._refused: set[str] = set()
        self._silent: set[str] = set()
        self._delays: dict[tuple[str, str], float] = {}  # (name, type) -> seconds
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0

    # -- zone data -------------------------------------------------------

    def add_mx(self, domain: str, exchange: str, pref: int = 10, ttl: int = 300) -> None:
        self._add(domain, RR(domain, QTYPE.MX, ttl=ttl, rdata=MX(exchange, pref)))

    def add_null_mx(self, domain: str, ttl: int = 300) -> None:
        """RFC 7505: ``MX 0 .``, the domain accepts no mail."""
        self._add(domain, RR(domain, QTYPE.MX, ttl=ttl, rdata=MX(".", 0)))

    def add_a(self, domain: str, address: str, ttl: int = 300) -> None:
        self._add(domain, RR(domain, QTYPE.A, ttl=ttl, rdata=A(address)))

    def add_aaaa(self, domain: str, address: str, ttl: int = 300) -> None:
        self._add(domain, RR(domain, QTYPE.AAAA, ttl=ttl, rdata=AAAA(address)))

    def add_txt(self, domain: str, text: str, ttl: int = 300) -> None:
        """Makes ``domain`` exist without MX, A or AAAA (no data for those)."""
        self._add(domain, RR(domain, QTYPE.TXT, ttl=ttl, rdata=TXT(text)))

    def set_servfail(self, domain: str, qtype: str | None = None) -> None:
        """SERVFAIL every query for ``domain``, or only those of ``qtype`` (e.g. "AAAA")."""
        with self._lock:
            self._servfail.add((_norm(domain), qtype))

    def set_delay(self, domain: str, qtype: str, seconds: float) -> None:
        """Answer ``qtype`` queries for ``domain`` only after ``seconds``.

        The server handles each query on its own thread, so other queries
        (the other address family, say) are answered meanwhile.
        """
        with self._lock:
            self._delays[(_norm(domain), qtype)] = seconds

    def set_refused(self, domain: str) -> None:
        with self._lock:
            self._refused.add(_norm(domain))

    def set_timeout(self, domain: str) -> None:
        """Never answer any query for ``domain``."""
        with self._lock:
            self._silent.add(_norm(domain))

    def remove(self, domain: str) -> None:
        """Forget everything about ``domain``: it becomes NXDOMAIN."""
        name = _norm(domain)
        with self._lock:
            self._records.pop(name, None)
            self._servfail -= {entry for entry in self._servfail if entry[0] == name}
            self._refused.discard(name)
            self._silent.discard(name)

    def _add(self, domain: str, rr: RR) -> None:
        with self._lock:
            self._records.setdefault(_norm(domain), []).append(rr)

    # -- answering (runs in the server's threads) ------------------------

    def _soa(self, qname: str) -> RR:
        # The last two labels stand in for the zone; the root has no others.
        zone = ".".join(qname.split(".")[-2:]) if qname else "."
        times = (1, 3600, 600, 86400, self.negative_ttl)
        rdata = SOA("ns.test.", "hostmaster.test.", times)
        return RR(zone, QTYPE.SOA, ttl=self.negative_ttl, rdata=rdata)

    def _answer(self, request: DNSRecord, qname: str, qtype: str) -> DNSRecord:
        with self._lock:
            self.queries.append((qname, qtype))
            delay = self._delays.get((qname, qtype), 0.0)
        if delay:
            time.sleep(delay)
        with self._lock:
            if qname in self._silent:
                raise _NoAnswer(f"dropping {qname} {qtype}")
            reply = request.reply()
            if (qname, None) in self._servfail or (qname, qtype) in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if qname in self._refused:
                reply.header.rcode = RCODE.REFUSED
                return reply
            records = self._records.get(qname)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(qname))
                return reply
            matching = [rr for rr in records if QTYPE.get(rr.rtype) == qtype]
            if matching:
                reply.add_answer(*matching)
            else:
                reply.add_auth(self._soa(qname))
            return reply

    # -- lifecycle -------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        logger = DNSLogger("-request,-reply,-truncated,-error", prefix=False)
        resolver = _ZoneResolver(self)
        # UDP picks a free port; TCP must then get the same one, which can
        # (rarely) be taken already, so try a few ports.
        for _ in range(20):
            udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=logger)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True,
                                logger=logger)
            except OSError:
                udp.server.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for UDP and TCP together")
        self.port = port
        self._servers = [udp, tcp]
        self._threads = [
            # A short poll interval: stop() waits up to one interval per server.
            threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"test-dns-{port}",
                daemon=True,
            )
            for server in self._servers
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers = []
        self._threads = []

    def __enter__(self) -> TestDNSServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

