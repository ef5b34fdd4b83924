"""One worker's SMTP face: its own SO_REUSEPORT sockets, TLS, and a clean drain.

Each worker binds its own listening sockets with SO_REUSEPORT after the fork,
so the kernel spreads connections over the workers of one port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from cluster.logjson import log_event
from cluster.settings import ServerSettings
from worker.engine import PolicyEngine
from worker.handler import GatewayHandler
from worker.sessions import SessionRegistry
from worker.smtp import GatewaySMTP
from worker.snapshot import Snapshot


class BootError(Exception):
    """The worker cannot start (certificate, port); retrying will not help."""


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise BootError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return context


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BootError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class SmtpServer:
    """The listeners of one worker and the sessions they accepted."""

    def __init__(self, engine: PolicyEngine, snapshot: Callable[[], Snapshot]) -> None:
        self.engine = engine
        self.snapshot = snapshot
        self.sessions = SessionRegistry()
        self._servers: list[asyncio.base_events.Server] = []
        self.addresses: list[tuple[str, int, bool]] = []

    def _trusted(self, ip: str) -> bool:
        networks = self.snapshot().settings.server.trusted_networks
        if not networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in networks)

    def _factory(self, settings: ServerSettings, context: ssl.SSLContext | None,
                 implicit_tls: bool) -> Callable[[], GatewaySMTP]:
        handler = GatewayHandler(self.engine, settings.max_recipients)
        loop = asyncio.get_running_loop()

        def make() -> GatewaySMTP:
            return GatewaySMTP(
                handler,
                engine=self.engine,
                sessions=self.sessions,
                trusted=self._trusted,
                hostname=settings.hostname,
                data_size_limit=settings.max_message_size,
                enable_SMTPUTF8=True,
                tls_context=None if implicit_tls else context,
                auth_required=True,
                auth_require_tls=settings.require_tls_for_auth and not implicit_tls,
                auth_exclude_mechanism=[],
                timeout=300,
                loop=loop,
            )

        return make

    async def start(self, sockets: list[tuple[socket.socket, bool]] | None = None) -> None:
        settings = self.snapshot().settings.server
        context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            context = tls_context(settings.tls_cert, settings.tls_key)
        if sockets is None:
            sockets = [(listening_socket(h, p), False) for h, p in settings.listen]
            sockets += [(listening_socket(h, p), True) for h, p in settings.listen_tls]
        loop = asyncio.get_running_loop()
        for sock, implicit in sockets:
            server = await loop.create_server(
                self._factory(settings, context, implicit), sock=sock,
                ssl=context if implicit else None, backlog=1024,
            )
            self._servers.append(server)
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port, implicit))
            log_event("listening", address=f"{host}:{port}", implicit_tls=implicit)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let open transactions finish within ``timeout``, end the rest."""
        for server in self._servers:
            server.close()
        cut = await self.sessions.drain(timeout)
        log_event("drained", cut_sessions=cut)
        for server in self._servers:
            await server.wait_closed()
