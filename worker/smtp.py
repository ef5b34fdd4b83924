"""Every change sendguard makes to aiosmtpd's protocol class, in one place.

aiosmtpd 1.4.6 is pinned: these overrides rely on its behaviour, and each
has a test in ``tests/worker/test_smtp_overrides.py``.

- a session id per connection, in the banner and the replies, kept across
  STARTTLS (aiosmtpd recreates ``session`` there);
- STARTTLS through the event loop's own TLS (worker/starttls.py; its tests are in
  ``tests/worker/test_starttls.py``);
- SPEC's texts for MAIL before AUTH, for SIZE at MAIL (checked before AUTH,
  as SPEC orders it) and for too much data after DATA;
- AUTH PLAIN/LOGIN verified asynchronously (aiosmtpd's authenticator hook is
  synchronous, and a password hash must never run on the event loop);
- the per-class scan of ``smtp_*``/``auth_*`` methods done once per class
  instead of once per connection;
- graceful shutdown: 421 at once outside a transaction, after the reply to
  the end of DATA inside one;
- DATA read as SPEC §3 wants it (worker/smtp_data.py): lines of any length,
  a bare LF as a line end, the end only at CRLF.CRLF; a message over the
  size limit and a command line too long are logged, the latter answered
  with the session id;
- behind a load balancer, the client address from the PROXY header (read by
  worker/server.py before this object exists) instead of the peer's, for the
  policies and for aiosmtpd's ``session.peer``. aiosmtpd's own PROXY support
  is not used: on an implicit-TLS listener it would run after the handshake.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

from cluster.logjson import log_event
from cluster.names import client_key, plain_ip
from cluster.sessionid import new_session_id
from worker import replies, smtp_speedups, starttls
from worker.policies import Client, reject
from worker.smtp_data import TooMuchData, read_data, unstuff

smtp_speedups.install()

if TYPE_CHECKING:
    from worker.engine import PolicyEngine
    from worker.sessions import SessionRegistry

_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)", re.IGNORECASE)
_TOO_MUCH_DATA = "552 Error: Too much mail data"
# aiosmtpd's reply to a command line longer than its reader takes (or than
# the command's size limit), from _handle_client.
_COMMAND_TOO_LONG = "500 Command line too long"


def _continues(status: str | bytes) -> bool:
    """A line of a multi-line reply (``250-...``) other than the last."""
    marker = status[3:4]
    return marker in ("-", b"-")


def _capture_credentials(server: Any, session: Any, envelope: Any, mechanism: str,
                         auth_data: Any) -> AuthResult:
    # aiosmtpd decodes PLAIN/LOGIN and hands us the pair; the verdict comes later.
    return AuthResult(success=True, handled=False, auth_data=auth_data)


class GatewaySMTP(SMTP):
    def __init__(self, handler: Any, *, engine: PolicyEngine, sessions: SessionRegistry,
                 trusted: Any, peer: tuple[str, int] | None = None, proxy: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(handler, authenticator=_capture_credentials, **kwargs)
        self.engine = engine
        self.sessions = sessions
        self._is_trusted = trusted
        # With PROXY protocol: the client named by the header, and the balancer's address.
        self._peer = peer
        self._proxy = proxy
        self.client: Client | None = None
        self._draining = False
        self._closing = False

    # -- connection and session id -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client is None:
            peer = self._peer or transport.get_extra_info("peername")
            ip = plain_ip(peer[0]) if peer else "unknown"
            sid = new_session_id()
            self.client = Client(sid=sid, ip=ip, key=client_key(ip), trusted=self._is_trusted(ip),
                                 tls=transport.get_extra_info("sslcontext") is not None)
            self.__ident__ = replies.BANNER_IDENT.format(sid=sid)
            self.sessions.add(self)
            log_event("connect", sid=sid, client_ip=ip, tls=self.client.tls, proxy=self._proxy)
        super().connection_made(transport)
        if self._peer is not None and self.session is not None:
            self.session.peer = self._peer  # aiosmtpd just set it from the transport

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        # uvloop's TLS, not aiosmtpd's pure-Python one: see worker/starttls.py.
        assert self.client is not None
        if await starttls.upgrade(self, arg, sid=self.client.sid, client_ip=self.client.ip):
            self.client.tls = True
            if self._peer is not None and self.session is not None:
                self.session.peer = self._peer  # type: ignore[assignment]

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on a half-close but keeps the connection
        # until the idle timeout; nothing more can arrive, so end it now.
        super().eof_received()
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.discard(self)
        super().connection_lost(error)

    @property
    def sid(self) -> str:
        assert self.client is not None
        return self.client.sid

    # -- replies SPEC words differently -------------------------------------

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if self._auth_required and not self.session.authenticated:
            reply = replies.AUTH_REQUIRED.format(sid=self.sid)
            if caller_method == "MAIL":
                assert self.client is not None
                self.engine.log_decision(self.client, "MAIL", reject("auth", reply))
            await self.push(reply)
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        # SPEC orders a declared SIZE before authentication; aiosmtpd checks AUTH first.
        if arg and self.data_size_limit and self.session and self.session.host_name:
            match = _SIZE_PARAM.search(arg)
            if match and int(match.group(1)) > self.data_size_limit:
                self._log_refusal("MAIL", "size", replies.SIZE_EXCEEDED,
                                  f"declared {match.group(1)} > {self.data_size_limit}")
                await self.push(replies.SIZE_EXCEEDED)
                return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's own checks and texts, then our reader instead of its line loop.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw = await read_data(self._reader, self.data_size_limit)
        except TooMuchData:
            self._set_post_data_state()
            self._log_refusal("DATA", "size", replies.SIZE_EXCEEDED,
                              f"more than {self.data_size_limit} bytes")
            await self.push(replies.SIZE_EXCEEDED)
            return
        except asyncio.CancelledError:
            self._writer.close()  # the connection went away during DATA
            raise
        content = unstuff(raw)
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: Any) -> None:
        if status == _TOO_MUCH_DATA:
            status = replies.SIZE_EXCEEDED
        elif status == _COMMAND_TOO_LONG:
            status = replies.LINE_TOO_LONG.format(sid=self.sid)
            self._log_refusal("command", "line_length", status,
                              "a command line longer than the command may be")
        await super().push(status)
        if (self._draining and not self._closing and not self._in_transaction()
                and not _continues(status)):
            await self._say_goodbye()

    def _log_refusal(self, stage: str, policy: str, reply: str, detail: str) -> None:
        # Logged and kept like the engine's decisions (sendguard why, metrics).
        assert self.client is not None
        self.engine.log_decision(self.client, stage, reject(policy, reply, detail))

    # -- AUTH ------------------------------------------------------------------

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, captured: AuthResult) -> AuthResult:
        if not captured.success:
            return captured  # aiosmtpd already answered (bad base64, aborted)
        credentials: LoginPassword = captured.auth_data
        assert self.client is not None
        user = credentials.login.decode("utf-8", "replace")
        password = credentials.password.decode("utf-8", "replace")
        verdict = await self.engine.authenticate(self.client, user, password)
        if verdict.ok:
            return AuthResult(success=True, handled=False, message=verdict.reply,
                              auth_data=user)
        return AuthResult(success=False, handled=False, message=verdict.reply)

    # -- shutdown ----------------------------------------------------------------

    def _in_transaction(self) -> bool:
        return bool(self.envelope is not None and self.envelope.mail_from)

    def begin_drain(self) -> None:
        """Stop after the current transaction, or now when there is none."""
        self._draining = True
        if not self._in_transaction() and self.transport is not None:
            asyncio.ensure_future(self._say_goodbye())

    async def end_now(self) -> None:
        """The drain timeout ran out: goodbye even mid-transaction (nothing is acknowledged)."""
        await self._say_goodbye()

    def abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
        self.sessions.discard(self)

    async def _say_goodbye(self) -> None:
        if self._closing or self.transport is None:
            return
        self._closing = True
        try:
            await super().push(replies.SHUTTING_DOWN.format(sid=self.sid))
        except (ConnectionError, RuntimeError, AttributeError):
            pass
        if self.transport is not None:
            self.transport.close()
        # The session is over for us even while a TLS peer is slow to
        # acknowledge the close; the drain need not wait for it.
        self.sessions.finished(self)
