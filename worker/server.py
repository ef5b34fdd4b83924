"""One worker's SMTP face: its own SO_REUSEPORT sockets, TLS, and a clean drain.

Each worker binds its own listening sockets with SO_REUSEPORT after the fork,
so the kernel spreads connections over the workers of one port.

With ``server.proxy_protocol`` on, the worker accepts connections itself:
only peers in ``server.proxy_networks`` are let in, and their PROXY header
is read from the bare socket (worker/proxy.py) within ``server.proxy_timeout``
before the socket becomes a transport, TLS included on an implicit-TLS
listener. The session, its id and its banner start after the header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cluster.logjson import log_event
from cluster.names import plain_ip
from cluster.settings import Network, ServerSettings, Settings
from cluster.validate import ConfigError
from worker.engine import PolicyEngine
from worker.handler import GatewayHandler
from worker.proxy import ProxyError, read_header
from worker.sessions import SessionRegistry
from worker.smtp import GatewaySMTP
from worker.snapshot import Snapshot

# After a failed accept (out of file descriptors, say), as asyncio's own servers do.
_ACCEPT_RETRY_DELAY = 1.0


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
        # PROXY protocol listeners: their sockets, accept loops and unfinished headers.
        self._proxy_sockets: list[socket.socket] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        # The TLS context in use, and the files it was loaded from (a reload may change them).
        self._tls: ssl.SSLContext | None = None
        self._tls_files: tuple[object, ...] = ()

    def _trusted(self, ip: str) -> bool:
        return _in_networks(ip, self.snapshot().settings.server.trusted_networks)

    def _server_settings(self) -> ServerSettings:
        return self.snapshot().settings.server

    def _factory(self, context: ssl.SSLContext | None,
                 implicit_tls: bool) -> Callable[..., GatewaySMTP]:
        handler = GatewayHandler(self.engine)
        loop = asyncio.get_running_loop()

        def make(peer: tuple[str, int] | None = None, proxy: str | None = None) -> GatewaySMTP:
            # Read for every connection, so a reload (SIGHUP) applies to every
            # new session: host name, SIZE, AUTH over plain text, timeouts.
            settings = self.snapshot().settings.server
            return GatewaySMTP(
                handler,
                sessions=self.sessions,
                server_settings=self._server_settings,
                trusted=self._trusted,
                peer=peer,
                proxy=proxy,
                hostname=settings.hostname,
                data_size_limit=settings.max_message_size,
                enable_SMTPUTF8=True,
                tls_context=None if implicit_tls else context,
                auth_required=True,
                auth_require_tls=settings.require_tls_for_auth and not implicit_tls,
                auth_exclude_mechanism=[],
                loop=loop,
            )

        return make

    async def start(self, sockets: list[tuple[socket.socket, bool]] | None = None) -> None:
        settings = self.snapshot().settings.server
        context = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            context = tls_context(settings.tls_cert, settings.tls_key)
            self._tls, self._tls_files = context, _files(settings.tls_cert, settings.tls_key)
        if sockets is None:
            sockets = [(listening_socket(h, p), False) for h, p in settings.listen]
            sockets += [(listening_socket(h, p), True) for h, p in settings.listen_tls]
        loop = asyncio.get_running_loop()
        for sock, implicit in sockets:
            factory = self._factory(context, implicit)
            tls = context if implicit else None
            if settings.proxy_protocol:
                self._proxy_sockets.append(sock)
                self._acceptors.append(asyncio.create_task(self._accept(sock, factory, tls)))
            else:
                self._servers.append(await loop.create_server(factory, sock=sock, ssl=tls,
                                                              backlog=1024))
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port, implicit))
            log_event("listening", address=f"{host}:{port}", implicit_tls=implicit,
                      proxy_protocol=settings.proxy_protocol)

    def refresh_tls(self, settings: Settings) -> None:
        """New certificate or key files (a reload, a renewal): new handshakes use them.

        The context in use is loaded again in place, so every listener and
        STARTTLS pick the new pair up; a pair that does not load, or whose key
        is not the certificate's, is refused and the old one stays. Turning
        TLS on or off needs a restart.
        """
        cert, key = settings.server.tls_cert, settings.server.tls_key
        if self._tls is None or cert is None or key is None:
            return
        files = _files(cert, key)
        if files == self._tls_files:
            return
        self._tls_files = files
        from cluster.files import check_tls  # only on a reload: it imports cryptography

        try:
            check_tls(settings)  # the live context is touched only when the pair is good
            self._tls.load_cert_chain(cert, key)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log_event("reload_refused", logging.ERROR, source="tls", error=str(exc))
            return
        log_event("tls_reloaded", cert=str(cert), key=str(key))

    # -- PROXY protocol -----------------------------------------------------------

    async def _accept(self, sock: socket.socket, factory: Callable[..., GatewaySMTP],
                      context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:
                log_event("accept_failed", logging.ERROR, error=str(exc))
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            task = asyncio.create_task(self._open_proxied(conn, address, factory, context))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _open_proxied(self, conn: socket.socket, address: Any,
                            factory: Callable[..., GatewaySMTP],
                            context: ssl.SSLContext | None) -> None:
        """Check the balancer, read its header, then hand the socket to a new session."""
        settings = self.snapshot().settings.server
        balancer = plain_ip(address[0])
        handed_over = False
        try:
            conn.setblocking(False)
            if not _in_networks(balancer, settings.proxy_networks):
                log_event("proxy_refused", logging.WARNING, client_ip=balancer,
                          reason="not in server.proxy_networks")
                return
            try:
                async with asyncio.timeout(settings.proxy_timeout):
                    header = await read_header(conn)
            except TimeoutError:
                log_event("proxy_refused", logging.WARNING, client_ip=balancer,
                          reason=f"no PROXY header within {settings.proxy_timeout:g}s")
                return
            except (ProxyError, OSError) as exc:
                log_event("proxy_refused", logging.WARNING, client_ip=balancer,
                          reason=f"bad PROXY header: {exc}")
                return
            peer = header.source or (balancer, address[1])
            handed_over = True
            try:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: factory(peer=peer, proxy=balancer), conn, ssl=context)
            except OSError as exc:
                # The TLS handshake of an implicit-TLS listener failed; nothing was said yet.
                log_event("tls_failed", client_ip=peer[0], proxy=balancer, error=str(exc))
                conn.close()
        finally:
            if not handed_over:
                conn.close()

    async def _stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock in self._proxy_sockets:
            sock.close()
        # Connections still sending their header have no session yet: nothing to drain.
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let open transactions finish within ``timeout``, end the rest."""
        await self._stop_accepting()
        cut = await self.sessions.drain(timeout)
        log_event("drained", cut_sessions=cut)
        for server in self._servers:
            await server.wait_closed()


def _files(*paths: Path) -> tuple[object, ...]:
    """The paths and what is at them now (a file replaced in place counts as new)."""
    stamps: list[object] = []
    for path in paths:
        try:
            info = path.stat()
            stamps.append((str(path), info.st_mtime_ns, info.st_size, info.st_ino))
        except OSError:
            stamps.append((str(path), None))
    return tuple(stamps)


def _in_networks(ip: str, networks: Iterable[Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)
