"""One SMTP client session to a next hop, reused for several messages.

:meth:`Connection.open` tries the hops in order until one greets us, says
EHLO (or HELO) and, when it offers STARTTLS, upgrades the session.
``delivery.tls`` (:func:`tls_policy`) says how much TLS is required:
``may`` is opportunistic, as between MTAs on port 25: certificates are not
verified (RFC 7435), and a failed handshake is retried once in plain text,
since refusing to deliver over plain text would only keep the mail queued;
``encrypt`` delivers only over TLS (a hop without STARTTLS, or whose
handshake fails, is a temporary failure, never a plain-text retry);
``verify`` also requires a certificate valid for the hop's host name, from
the system's authorities or ``delivery.tls_ca``.

:meth:`Connection.send` runs one transaction and returns one
:class:`~worker.delivery.result.Result` per recipient; it never raises for
anything the server or the network does. Commands are sent through
``execute_command`` rather than aiosmtplib's ``mail``/``rcpt``, which
re-parse addresses with ``email.utils`` and would alter quoted local parts.
When the server offers PIPELINING, transactions go through
:mod:`worker.delivery.pipeline` instead (MAIL, RCPT and DATA in one write).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from aiosmtplib import SMTP
from aiosmtplib.errors import (
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from cluster.names import BadDomain, to_alabel
from worker.delivery.lines import for_delivery
from worker.delivery.pipeline import ReplyReader, command, data_block
from worker.delivery.result import BOUNCED, DEFERRED, Result, local, remote
from worker.delivery.route import Hop
from worker.headers import header_section

# Errors after which the connection is gone; anything the server *says* is
# an SMTPResponseException and handled per command.
_LOST = (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError, OSError, ssl.SSLError)


class ConnectError(Exception):
    """No hop took the session; ``result`` is the last hop's failure."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.detail)
        self.result = result


def opportunistic_tls() -> ssl.SSLContext:
    """A client context that encrypts without authenticating the server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """``delivery.tls``: the context for STARTTLS and whether delivery needs it."""

    mode: str
    context: ssl.SSLContext
    required: bool


@lru_cache(maxsize=8)
def tls_policy(mode: str, ca: Path | None = None) -> TlsPolicy:
    """One policy per setting (contexts are costly to build and safe to share)."""
    if mode == "verify":
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        return TlsPolicy(mode, context, True)
    return TlsPolicy(mode, opportunistic_tls(), mode == "encrypt")


def _tls_required(hop: Hop, why: str) -> ConnectError:
    # As Postfix's smtp_tls_security_level: the mail waits for a hop that can.
    return ConnectError(local(DEFERRED, f"TLS is required, but {why} ({hop.label})", "4.7.5"))


def wire_address(address: str, smtputf8: bool) -> str | None:
    """The address as it may go on the wire to this server, or None if it cannot.

    Without SMTPUTF8 a U-label domain still goes as its A-label; a non-ASCII
    local part cannot go at all (RFC 6531 §3.2).
    """
    if address.isascii() or smtputf8:
        return address
    local_part, at, domain = address.rpartition("@")
    if not at or not local_part.isascii():
        return None
    try:
        return f"{local_part}@{to_alabel(domain)}"
    except BadDomain:
        return None


class Connection:
    def __init__(self, smtp: SMTP, hop: Hop, tls: bool) -> None:
        self.smtp = smtp
        self.hop = hop
        self.tls = tls
        self.usable = True
        # The last send() found the connection gone (or closing, 421) at its
        # MAIL FROM: the server saw nothing of that message.
        self.lost_before_mail = False
        # Set when the server offers PIPELINING: every command after the
        # handshake goes through it, none through aiosmtplib.
        self.pipe: ReplyReader | None = None

    @property
    def connected(self) -> bool:
        return self.pipe.connected if self.pipe is not None else self.smtp.is_connected

    @classmethod
    async def open(cls, hops: Sequence[Hop], *, helo: str, tls: TlsPolicy | None,
                   connect_timeout: float, timeout: float) -> Connection:
        """The first hop that takes a session; ConnectError when none does."""
        last = local(DEFERRED, "no mail exchanger to connect to", "4.4.1")
        for hop in hops:
            try:
                conn = await cls._open(hop, helo, tls, connect_timeout, timeout)
            except ConnectError as exc:
                last = exc.result
                continue
            if conn.smtp.supports_extension("pipelining") and conn.smtp.transport is not None:
                conn.pipe = ReplyReader(conn.smtp.transport)  # type: ignore[arg-type]
            return conn
        raise ConnectError(last)

    @classmethod
    async def _open(cls, hop: Hop, helo: str, tls: TlsPolicy | None,
                    connect_timeout: float, timeout: float) -> Connection:
        smtp = SMTP(hostname=hop.address, port=hop.port, local_hostname=helo,
                    timeout=timeout, use_tls=False, start_tls=False)
        stage = "initial greeting"
        try:
            await smtp.connect(timeout=connect_timeout)
            stage = "EHLO"
            await cls._hello(smtp)
            if tls is None:
                return cls(smtp, hop, False)
            if not smtp.supports_extension("starttls"):
                if tls.required:
                    smtp.close()
                    raise _tls_required(hop, "STARTTLS was not offered")
                return cls(smtp, hop, False)
            stage = "STARTTLS"
            try:
                await smtp.starttls(tls_context=tls.context, server_hostname=hop.host,
                                    timeout=timeout)
            except SMTPResponseException as exc:
                if tls.required:
                    smtp.close()
                    raise _tls_required(hop, f"STARTTLS was refused: {exc.code} "
                                        f"{exc.message}") from None
                # Refused with a reply: the session goes on in plain text.
                return cls(smtp, hop, False)
            except _LOST as exc:
                smtp.close()
                if tls.required:
                    # Never a plain-text retry: that is what an attacker on the path wants.
                    raise _tls_required(hop, f"the TLS handshake failed: {exc}") from None
                return await cls._open(hop, helo, None, connect_timeout, timeout)
            stage = "EHLO after STARTTLS"
            await cls._hello(smtp)
            return cls(smtp, hop, True)
        except SMTPResponseException as exc:
            smtp.close()
            # Whatever the code, another hop may still take the mail: a
            # refusal to talk at all is never final for the recipients.
            result = remote(exc.code, exc.message, hop.label, stage)
            raise ConnectError(Result(DEFERRED, result.detail, result.code, result.reply,
                                      result.host, stage, None)) from None
        except (SMTPException, *_LOST) as exc:
            smtp.close()
            detail = (f"connect to {hop.label}: {exc}" if stage == "initial greeting"
                      else f"lost connection with {hop.label} during {stage}: {exc}")
            raise ConnectError(local(DEFERRED, detail, "4.4.1")) from None

    @staticmethod
    async def _hello(smtp: SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()

    async def send(self, sender: str, recipients: Sequence[str], message: bytes) -> list[Result]:
        """One transaction; one result per recipient, in order."""
        message = for_delivery(message)  # CRLF only, no line over 998 octets
        smtp, label = self.smtp, self.hop.label
        results: list[Result | None] = [None] * len(recipients)
        utf8_offered = smtp.supports_extension("smtputf8")
        wire_from = wire_address(sender, utf8_offered)
        if wire_from is None:
            return [local(BOUNCED, f"SMTPUTF8 is required, but was not offered by host {label}",
                          "5.6.7")] * len(recipients)
        limit = smtp.esmtp_extensions.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(message):
            return [local(BOUNCED, f"message size {len(message)} exceeds size limit {limit} "
                          f"of server {label}", "5.3.4")] * len(recipients)
        wire_to = [wire_address(rcpt, utf8_offered) for rcpt in recipients]
        options: list[bytes] = []
        if "size" in smtp.esmtp_extensions:
            options.append(b"SIZE=%d" % len(message))
        if not message.isascii() and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        needs_utf8 = not wire_from.isascii() or any(w and not w.isascii() for w in wire_to)
        if utf8_offered and (needs_utf8 or not header_section(message).isascii()):
            options.append(b"SMTPUTF8")
        self.lost_before_mail = False
        if self.pipe is not None:
            return await self._send_pipelined(self.pipe, wire_from, wire_to, options, message)
        stage = "MAIL FROM"
        try:
            try:
                reply = await smtp.execute_command(b"MAIL", b"FROM:<%s>" % wire_from.encode(),
                                                   *options)
            except ValueError:
                return [_unsendable(stage)] * len(recipients)
            if reply.code == 421:
                self.lost_before_mail = True
            if reply.code != 250:
                await self._reset()
                return [remote(reply.code, reply.message, label, stage)] * len(recipients)
            stage = "RCPT TO"
            accepted: list[int] = []
            for index, address in enumerate(wire_to):
                if address is None:
                    results[index] = _no_smtputf8(label)
                    continue
                try:
                    reply = await smtp.execute_command(b"RCPT", b"TO:<%s>" % address.encode())
                except ValueError:
                    results[index] = _unsendable(stage)
                    continue
                if reply.code in (250, 251):
                    accepted.append(index)
                    continue
                results[index] = remote(reply.code, reply.message, label, stage)
                if not smtp.is_connected:  # 421: the server is closing
                    raise SMTPServerDisconnected(reply.message)
            if not accepted:
                await self._reset()
                return _fill(results, self._lost(stage))
            stage = "DATA"
            try:
                reply = await smtp.data(message)
                code, text = reply.code, reply.message
            except SMTPDataError as exc:
                code, text = exc.code, exc.message
            for index in accepted:
                results[index] = remote(code, text, label, stage)
            if code == 421 or not smtp.is_connected:
                self.usable = False
        except (SMTPException, *_LOST):
            self.usable = False
            self.lost_before_mail = stage == "MAIL FROM"
            smtp.close()
        return _fill(results, self._lost(stage))

    async def _send_pipelined(self, pipe: ReplyReader, wire_from: str,
                              wire_to: list[str | None], options: list[bytes],
                              message: bytes) -> list[Result]:
        label, timeout = self.hop.label, self.smtp.timeout
        results: list[Result | None] = [None] * len(wire_to)
        stage = "MAIL FROM"
        try:
            mail = command(b"MAIL", b"FROM:<%s>" % wire_from.encode(), *options)
        except ValueError:
            return [_unsendable(stage)] * len(wire_to)
        sent: list[int] = []  # indexes of the recipients whose RCPT goes out
        commands = [mail]
        for index, address in enumerate(wire_to):
            if address is None:
                results[index] = _no_smtputf8(label)
                continue
            try:
                commands.append(command(b"RCPT", b"TO:<%s>" % address.encode()))
            except ValueError:
                results[index] = _unsendable("RCPT TO")
                continue
            sent.append(index)
        if not sent:
            return _fill(results, self._lost(stage))
        try:
            pipe.write(b"".join(commands) + b"DATA\r\n")
            reply = await pipe.reply(timeout)
            if reply.code == 421:
                self.lost_before_mail = True
            refused = None if reply.code == 250 else remote(reply.code, reply.message, label,
                                                             stage)
            stage = "RCPT TO"
            accepted: list[int] = []
            for index in sent:
                reply = await pipe.reply(timeout)
                if refused is not None:
                    results[index] = refused
                elif reply.code in (250, 251):
                    accepted.append(index)
                else:
                    results[index] = remote(reply.code, reply.message, label, stage)
            stage = "DATA"
            reply = await pipe.reply(timeout)
            ended = reply.code == 354
            if ended:
                # With no recipient accepted, RFC 2920 §3.1: end the data at once.
                pipe.write(data_block(message) if accepted else b".\r\n")
                final = await pipe.reply(timeout)
                reply = final if accepted else reply
            for index in accepted:
                results[index] = remote(reply.code, reply.message, label, stage)
            if reply.code == 421:
                self.usable = False
            elif not ended:
                await self._reset()
        except (SMTPException, *_LOST):
            self.usable = False
            self.lost_before_mail = self.lost_before_mail or stage == "MAIL FROM"
            pipe.close()
        return _fill(results, self._lost(stage))

    def _lost(self, stage: str) -> Result:
        return local(DEFERRED, f"lost connection with {self.hop.label} while sending {stage}",
                     "4.4.2")

    async def _reset(self) -> None:
        try:
            if self.pipe is not None:
                self.pipe.write(b"RSET\r\n")
                reply = await self.pipe.reply(self.smtp.timeout)
            else:
                reply = await self.smtp.execute_command(b"RSET")
            self.usable = reply.code == 250
        except (SMTPException, *_LOST):
            self.usable = False

    async def close(self) -> None:
        """QUIT politely; a server that does not answer is simply dropped."""
        if self.connected and self.usable:
            with contextlib.suppress(SMTPException, *_LOST):
                if self.pipe is not None:
                    self.pipe.write(b"QUIT\r\n")
                    await self.pipe.reply(5.0)
                else:
                    await self.smtp.quit(timeout=5.0)
        if self.pipe is not None:
            self.pipe.close()
        self.smtp.close()


def _no_smtputf8(label: str) -> Result:
    """A recipient whose address needs SMTPUTF8 at a host that does not offer it."""
    return local(BOUNCED, f"SMTPUTF8 is required, but was not offered by host {label}", "5.6.7")


def _unsendable(stage: str) -> Result:
    # aiosmtplib refuses control characters in a command, and an address that
    # is not valid Unicode cannot be encoded: retrying would not help. Nothing
    # was sent, so the session is still in step.
    return local(BOUNCED, f"address cannot be sent in {stage}", "5.1.3")


def _fill(results: list[Result | None], default: Result) -> list[Result]:
    return [default if r is None else r for r in results]
