"""Loopback stand-ins for the outside world of a benchmark: DNS and a discarding SMTP sink.

Every address here is on 127.0.0.0/8; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult
from dnslib import MX, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _AnyDomainResolver(BaseResolver):
    """Every domain has an MX ``mx.<domain>`` whose address is 127.0.0.1."""

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        if qtype == "MX":
            reply.add_answer(RR(name, QTYPE.MX, ttl=3600, rdata=MX("mx." + name)))
        elif qtype == "A":
            reply.add_answer(RR(name, QTYPE.A, ttl=3600, rdata=A("127.0.0.1")))
        return reply


class LoopbackDNS:
    def __init__(self) -> None:
        self.port = free_port()
        self._server = DNSServer(_AnyDomainResolver(), port=self.port, address="127.0.0.1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoopbackDNS:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()


class _Discard:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 2.0.0 Ok: discarded"


def _accept_any(server: Any, session: Any, envelope: Any, mechanism: str,
                data: Any) -> AuthResult:
    return AuthResult(success=True, auth_data=data)


def serve_sink(port: int, cert: Path | None = None, key: Path | None = None,
               require_auth: bool = False, ready: threading.Event | None = None,
               stock: bool = False) -> None:
    """A bare uvloop + aiosmtpd server that accepts any AUTH and discards (blocks).

    ``stock``: aiosmtpd exactly as released; otherwise with the gateway's
    per-connection saving (worker/smtp_speedups.py), as the gateway runs it.
    """
    import uvloop

    if not stock:
        from worker import smtp_speedups

        smtp_speedups.install()

    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)

    async def main() -> None:
        context = None
        if cert is not None and key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
        handler = _Discard()
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return SMTP(handler, hostname="sink.test", tls_context=context, loop=loop,
                        authenticator=_accept_any, auth_required=require_auth,
                        auth_require_tls=context is not None, enable_SMTPUTF8=True)

        server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024,
                                          reuse_address=True)
        if ready is not None:
            ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="bare aiosmtpd sink on loopback")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth", action="store_true")
    parser.add_argument("--stock", action="store_true", help="aiosmtpd without our speedups")
    args = parser.parse_args()
    serve_sink(args.port, Path(args.cert) if args.cert else None,
               Path(args.key) if args.key else None, args.auth, stock=args.stock)
