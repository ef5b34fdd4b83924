"""Every change sendguard makes to aiosmtpd's protocol class, in one place.

aiosmtpd is held to the releases these overrides were tested on
(pyproject.toml): they rely on its internals, and each has a test in
``tests/worker/test_smtp_overrides.py``.

- a session id per connection, in the banner and the replies, kept across
  STARTTLS (aiosmtpd recreates ``session`` there);
- STARTTLS through the event loop's own TLS (worker/starttls.py; its tests are in
  ``tests/worker/test_starttls.py``);
- the connection cap per client address, decided before the banner;
- SPEC's texts for MAIL before AUTH, for SIZE at MAIL (checked before AUTH,
  as SPEC orders it) and for too much data after DATA; addresses with
  control characters, bytes that are not UTF-8 or no ``local@domain``
  refused with ``501 5.1.3`` before aiosmtpd parses the rest of MAIL/RCPT;
- every refusal is a decision line: what this object refuses goes through
  the handler to the engine (:meth:`GatewaySMTP.refuse`), as the hooks'
  decisions do, and comes back as a :class:`~worker.replies.Decided`
  reply; only what aiosmtpd refuses by itself (its syntax and sequence
  replies, 538) is handed to the engine in :meth:`GatewaySMTP.push`, so
  nothing is refused unlogged;
- session limits: ``server.command_timeout`` (idle time between commands;
  bytes arriving inside DATA count as activity), ``server.max_session_time``
  and ``server.max_errors`` (refused commands since the last accepted
  message), each ending the session with its 421; all read from the current
  snapshot, so a reload applies them to the next command;
- every command passes through :meth:`GatewaySMTP._run` (aiosmtpd looks
  commands up in ``_smtp_methods``, which is replaced by a table that
  returns it), so the session knows which command a reply answers and can
  end the session before running one; unknown commands are answered here
  and count as errors, instead of aiosmtpd's separate budget of five;
- an internal error answers ``451 4.3.0 {sid} temporary failure`` with a
  decision line, never ``500`` with Python's text;
- the per-class scan of ``smtp_*``/``auth_*`` methods done once per class
  instead of once per connection, and the common address form parsed
  without the email package (worker/smtp_speedups.py, installed by the
  worker's builder, not by importing this module);
- graceful shutdown: 421 at once outside a transaction, after the reply to
  the end of DATA inside one, a decision (policy ``shutdown``) as any refusal;
- DATA read as SPEC §3 wants it (worker/smtp_data.py): lines of any length,
  a bare LF as a line end, the end only at CRLF.CRLF; a message over the
  size limit and a command line too long are logged, the latter answered
  with the session id;
- behind a load balancer, the client address from the PROXY header (read by
  worker/server.py before this object exists) instead of the peer's, for the
  policies and for aiosmtpd's ``session.peer``. aiosmtpd's own PROXY support
  is not used: on an implicit-TLS listener it would run after the handshake.

AUTH PLAIN/LOGIN are the handler's ``auth_*`` methods (worker/handler.py),
which aiosmtpd prefers over its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, syntax

from cluster.logjson import log_event
from cluster.names import address_problem, client_key, has_unusable_characters, plain_ip
from cluster.sessionid import new_session_id
from cluster.settings import ServerSettings
from worker import replies, starttls
from worker.client import Client
from worker.policies import Verdict
from worker.sessions import SessionRegistry
from worker.smtp_data import TooMuchData, read_data, unstuff

_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)", re.IGNORECASE)
# aiosmtpd's reply to a command line longer than its reader takes (or than
# the command's size limit), from _handle_client.
_COMMAND_TOO_LONG = "500 Command line too long"

# aiosmtpd's per-command budgets (``command_call_limit``): commands that move
# no mail are bounded per session; MAIL, RCPT, DATA, RSET and QUIT are not
# (a client may send thousands of messages in one session).
COMMAND_CALL_LIMIT = {
    "EHLO": 10, "HELO": 10, "STARTTLS": 3, "AUTH": 10, "NOOP": 100,
    "VRFY": 10, "EXPN": 10, "HELP": 10, "*": 1 << 30,
}


def _path_broken(path: str, rest: str | None) -> bool:
    """A ``<...>`` path aiosmtpd's parser reads only part of: one that never closes, or
    one with a space inside, which it cuts there and takes the remainder (``ski.pl>``)
    for parameters. A parameter's value may hold ``>`` (``AUTH=<>``), a parameter's
    name never does."""
    if not path.lstrip().startswith("<"):
        return False
    if ">" not in path:
        return True
    first = rest.split(None, 1)[0] if rest else ""
    return ">" in first and "=" not in first


def _continues(status: str | bytes) -> bool:
    """A line of a multi-line reply (``250-...``) other than the last."""
    marker = status[3:4]
    return marker in ("-", b"-")


def _is_refusal(status: str | bytes) -> bool:
    return status[:1] in ("4", "5", b"4", b"5")


def _policy_of(status: str) -> str:
    """A name for a refusal aiosmtpd made by itself, for the decision line and metrics."""
    code = status[:3]
    if code == "538" or code == "530":
        return "tls_required"
    if code == "503":
        return "sequence"
    if code == "421" and "too many times" in status:
        return "call_limit"
    if code in ("500", "501", "502", "504", "555"):
        return "syntax"
    return "protocol"


def _never(*_: Any) -> AuthResult:
    # Never called: the handler's auth_PLAIN/auth_LOGIN replace aiosmtpd's.
    return AuthResult(success=False, handled=False)


class ProtocolDecisions(Protocol):
    """What the protocol object asks its handler (worker/handler.py) besides aiosmtpd's hooks:
    the decisions it makes itself, each logged by the engine; the replies are
    :class:`~worker.replies.Decided`."""

    def connect(self, server: GatewaySMTP) -> Verdict: ...
    def disconnect(self, server: GatewaySMTP) -> None: ...
    def refused(self, server: GatewaySMTP, stage: str, policy: str, reply: str,
                detail: str = "") -> str: ...
    def unauthenticated(self, server: GatewaySMTP, stage: str) -> str: ...
    def bad_address(self, server: GatewaySMTP, stage: str, problem: str) -> str: ...
    def internal_error(self, server: GatewaySMTP, stage: str, error: BaseException) -> str: ...


class _CommandTable:
    """Stands in for aiosmtpd's ``_smtp_methods``: every command it looks up runs through
    :meth:`GatewaySMTP._run`. Lookups made while a command runs (HELP) see the plain table."""

    __slots__ = ("_protocol", "methods")

    def __init__(self, protocol: GatewaySMTP, methods: dict[str, Any]) -> None:
        self._protocol = protocol
        self.methods = methods

    def get(self, command: str, default: Any = None) -> Any:
        if self._protocol._running:
            return self.methods.get(command, default)
        return functools.partial(self._protocol._run, command)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.methods.items())


class GatewaySMTP(SMTP):
    def __init__(self, handler: ProtocolDecisions, *, sessions: SessionRegistry,
                 server_settings: Callable[[], ServerSettings], trusted: Any,
                 peer: tuple[str, int] | None = None, proxy: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("timeout", server_settings().command_timeout)
        kwargs.setdefault("command_call_limit", COMMAND_CALL_LIMIT)
        super().__init__(handler, authenticator=_never, **kwargs)
        self.event_handler: ProtocolDecisions = handler
        self.sessions = sessions
        self._server_settings = server_settings
        self._is_trusted = trusted
        # With PROXY protocol: the client named by the header, and the balancer's address.
        self._peer = peer
        self._proxy = proxy
        self.client: Client | None = None
        self._smtp_methods = _CommandTable(self, self._smtp_methods)  # type: ignore[assignment]
        self._command = ""         # the command being answered
        self._running = False
        self._admitted = False     # counted against the connection cap
        self._refused = False      # turned away before the banner
        self._errors = 0           # refused commands since the last accepted message
        self._in_data = False      # between 354 and the reply to the end of DATA
        self._last_data = 0.0
        self._session_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._closing = False
        # The lines of a multi-line reply before its last (see push).
        self._continued: list[bytes] = []

    # -- connection and session id -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client is None:
            peer = self._peer or transport.get_extra_info("peername")
            ip = plain_ip(peer[0]) if peer else "unknown"
            sid = new_session_id()
            self.client = Client(sid=sid, ip=ip, key=client_key(ip), trusted=self._is_trusted(ip),
                                 tls=transport.get_extra_info("sslcontext") is not None)
            verdict = self.event_handler.connect(self)
            if not verdict.ok:
                # Before the banner, and before aiosmtpd starts a session at all.
                self._refused = True
                writer = cast(asyncio.WriteTransport, transport)
                writer.write(verdict.reply.encode("ascii") + b"\r\n")
                writer.close()
                return
            self._admitted = True
            self.__ident__ = replies.BANNER_IDENT.format(sid=sid)
            self.sessions.add(self)
            log_event("connect", sid=sid, client_ip=ip, tls=self.client.tls, proxy=self._proxy)
            self._session_timer = self.loop.call_later(
                self._server_settings().max_session_time, self._session_expired)
            super().connection_made(transport)
            assert self._handler_coroutine is not None
            self._handler_coroutine.add_done_callback(_retrieve)
        else:
            super().connection_made(transport)
        if self._peer is not None and self.session is not None:
            self.session.peer = self._peer  # type: ignore[assignment]  # aiosmtpd set it

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_data:
            self._last_data = self.loop.time()
        super().data_received(data)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        # uvloop's TLS, not aiosmtpd's pure-Python one: see worker/starttls.py.
        assert self.client is not None
        if arg:
            await self.refuse("STARTTLS", "syntax", "501 Syntax: STARTTLS", "an argument")
            return
        if not self.tls_context:
            await self.refuse("STARTTLS", "protocol", "454 TLS not available", "no certificate")
            return
        if await starttls.upgrade(self, sid=self.client.sid, client_ip=self.client.ip):
            self.client.tls = True
            if self._peer is not None and self.session is not None:
                self.session.peer = self._peer  # type: ignore[assignment]

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        # aiosmtpd cancels the session on a half-close but keeps the connection
        # until the idle timeout; nothing more can arrive, so end it now.
        super().eof_received()
        if self.transport is not None:
            self.transport.close()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._admitted:
            self._admitted = False
            self.event_handler.disconnect(self)
        self.sessions.discard(self)
        super().connection_lost(error)

    @property
    def sid(self) -> str:
        assert self.client is not None
        return self.client.sid

    # -- commands, errors and timeouts ----------------------------------------

    async def _run(self, command: str, arg: str | None) -> None:
        """Every command line the client sends, recognised or not."""
        # The stage of its decision lines: a verb, not whatever bytes came first.
        self._command = command if command.isalnum() and len(command) <= 16 else "UNKNOWN"
        await self._answer(command, arg)
        # What aiosmtpd refuses before the next command runs (an empty or
        # overlong line) and a timeout between commands answer no command.
        # (A command that raised keeps its name for handle_exception.)
        self._command = ""

    async def _answer(self, command: str, arg: str | None) -> None:
        limits = self._server_settings()
        if limits.command_timeout != self._timeout_duration:
            # A reload changed it: aiosmtpd re-arms its idle timer with this from now on.
            self._timeout_duration = limits.command_timeout
            self._reset_timeout()
        if limits.max_errors and self._errors >= limits.max_errors:
            await self._end(replies.TOO_MANY_ERRORS, "max_errors",
                            f"{self._errors} refused commands")
            return
        method = self._smtp_methods.methods.get(command)  # type: ignore[attr-defined]
        if method is None:
            await self.refuse(self._command, "syntax", replies.UNKNOWN_COMMAND.format(sid=self.sid),
                              f"unknown command {replies.printable(command, 40)}")
            return
        self._running = True
        try:
            await method(arg)
        finally:
            self._running = False

    def _out_of_errors(self) -> bool:
        limit = self._server_settings().max_errors
        return bool(limit) and self._errors >= limit

    def _timeout_cb(self) -> None:
        timeout = self._server_settings().command_timeout
        idle = self.loop.time() - self._last_data
        if self._in_data and idle < timeout:
            # The message is still arriving: only silence counts.
            self._timeout_handle = self.loop.call_later(timeout - idle, self._timeout_cb)
            return
        self._end_now(replies.TIMEOUT, "command_timeout", f"no command for {timeout:g}s")

    def _session_expired(self) -> None:
        limit = self._server_settings().max_session_time
        self._end_now(replies.TIMEOUT, "max_session_time", f"session older than {limit:g}s")

    def _end_now(self, template: str, policy: str, detail: str) -> None:
        """From a timer: say why, close, and let the session's task be cancelled."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        reply = self.event_handler.refused(self, self._command, policy,
                                           template.format(sid=self.sid), detail)
        writer = cast(asyncio.WriteTransport, self.transport)
        writer.write(reply.encode("ascii") + b"\r\n")
        writer.close()
        self.sessions.finished(self)

    async def _end(self, template: str, policy: str, detail: str) -> None:
        """From a command: the same, as its reply."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        reply = self.event_handler.refused(self, self._command, policy,
                                           template.format(sid=self.sid), detail)
        try:
            await super().push(reply)
        except (ConnectionError, RuntimeError):
            pass
        if self.transport is not None:
            self.transport.close()
        self.sessions.finished(self)

    async def refuse(self, stage: str, policy: str, reply: str, detail: str = "") -> None:
        """A refusal this object decides: logged by the engine, then sent."""
        await self.push(self.event_handler.refused(self, stage, policy, reply, detail))

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer "500 Error: (TypeError) ..." and log a traceback.
        stage, self._command = self._command, ""
        return self.event_handler.internal_error(self, stage, error)

    # -- replies SPEC words differently -------------------------------------

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if self._auth_required and not self.session.authenticated:
            await self.push(self.event_handler.unauthenticated(self, caller_method))
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        # SPEC orders a declared SIZE before authentication; aiosmtpd checks AUTH first.
        if arg and self.data_size_limit:
            match = _SIZE_PARAM.search(arg)
            if match and int(match.group(1)) > self.data_size_limit:
                await self.refuse("MAIL", "size", replies.SIZE_EXCEEDED,
                                  f"declared {match.group(1)}, max {self.data_size_limit}")
                return
        if await self.check_auth_needed("MAIL"):
            return
        if await self._refuse_bad_address("MAIL", arg, "FROM:"):
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
            await self.refuse("DATA", "sequence", "503 Error: need RCPT command", "no recipient")
            return
        if arg:
            await self.refuse("DATA", "syntax", "501 Syntax: DATA", "an argument")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw = await read_data(self._reader, self.data_size_limit)
        except TooMuchData:
            self._set_post_data_state()
            await self.refuse("DATA", "size", replies.SIZE_EXCEEDED,
                              f"more than {self.data_size_limit} bytes")
            return
        except asyncio.CancelledError:
            self._writer.close()  # the connection went away during DATA
            raise
        content = unstuff(raw)
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        if self.envelope is not None and self.envelope.mail_from:
            if await self._refuse_bad_address("RCPT", arg, "TO:"):
                return
        await super().smtp_RCPT(arg)

    async def _refuse_bad_address(self, stage: str, arg: str | None, keyword: str) -> bool:
        """501 5.1.3 for an address no policy should ever see; aiosmtpd checks the rest."""
        path = self._strip_command_keyword(keyword, arg) if arg else None
        if not path:
            return False  # aiosmtpd's own syntax reply
        if has_unusable_characters(path):
            problem: str | None = "control character or bytes that are not UTF-8"
        else:
            try:
                address, rest = self._getaddr(path)
            except Exception:  # the email package's parser on hostile input
                address, rest = None, None
            if address is None or _path_broken(path, rest):
                problem = "does not parse"
            elif stage == "MAIL" and address == "<>":
                problem = None
            else:
                problem = address_problem(address) if address else None
        if problem is None:
            return False
        await self.push(self.event_handler.bad_address(self, stage, problem))
        return True

    async def push(self, status: Any) -> None:
        final = not _continues(status)
        if final and _is_refusal(status):
            if self._out_of_errors() and not self._closing:
                # A refusal aiosmtpd makes before any command runs (an empty
                # or overlong line) is the next command too: it is answered
                # (and logged) as the one too many, not as itself.
                await self._end(replies.TOO_MANY_ERRORS, "max_errors",
                                f"{self._errors} refused commands")
                return
            if status == _COMMAND_TOO_LONG:
                status = self.event_handler.refused(
                    self, "SESSION", "line_length", replies.LINE_TOO_LONG.format(sid=self.sid),
                    "a command line longer than the command may be")
            self._errors += 1
            if isinstance(status, str) and not isinstance(status, replies.Decided):
                policy = _policy_of(status)
                # A command over its budget is refused before it runs: its name is in the reply.
                stage = status.split()[2] if policy == "call_limit" else self._command
                self.event_handler.refused(self, stage, policy, status)
        elif final and self._in_data and status[:3] in ("250", b"250"):
            self._errors = 0  # a message was accepted
        if final:
            self._in_data = status[:3] in ("354", b"354")
            if self._in_data:
                self._last_data = self.loop.time()
        if isinstance(status, str) and not status.isascii():
            # Never fail on a client's bytes echoed back (VRFY does).
            status = status.encode("utf-8", "replace").decode("utf-8")
        if not final or self._continued:
            # A multi-line reply (EHLO's) goes out in one write with its last
            # line: one TLS record and one TCP segment instead of one per line,
            # and no drain between its lines.
            if isinstance(status, str):
                status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
            self._continued.append(status)
            if not final:
                return
            status, self._continued = b"\r\n".join(self._continued), []
        await super().push(status)
        if (self._draining and not self._closing and not self._in_transaction()
                and final):
            await self._say_goodbye()

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
        await self._say_goodbye("server.drain_timeout ran out")

    def abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
        self.sessions.discard(self)

    async def _say_goodbye(self, detail: str = "the worker is stopping") -> None:
        if self._closing or self.transport is None:
            return
        self._closing = True
        reply = self.event_handler.refused(self, "SESSION", "shutdown",
                                           replies.SHUTTING_DOWN.format(sid=self.sid), detail)
        try:
            await super().push(reply)
        except (ConnectionError, RuntimeError, AttributeError):
            pass
        if self.transport is not None:
            self.transport.close()
        # The session is over for us even while a TLS peer is slow to
        # acknowledge the close; the drain need not wait for it.
        self.sessions.finished(self)


def _retrieve(task: asyncio.Task[None]) -> None:
    """The session's task ended: a connection lost mid-reply is no news worth a traceback."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, ConnectionError):
        log_event("session_task_failed", logging.ERROR, error=f"{type(error).__name__}: {error}")
