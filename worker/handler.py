"""aiosmtpd handler hooks mapped onto the policy engine; no business rules here.

Besides aiosmtpd's ``handle_*`` hooks and the ``auth_PLAIN``/``auth_LOGIN``
mechanisms (which aiosmtpd prefers to its own), the protocol object
(worker/smtp.py) calls the methods below for the decisions it makes itself
(connection cap, syntax, sequence, limits, internal errors), so that every
decision reaches the engine and is logged there, once.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiosmtpd.smtp import AuthResult, Envelope, Session

from cluster.names import usable_text
from worker import sasl
from worker.client import Client
from worker.engine import PolicyEngine, Transaction
from worker.policies import Verdict
from worker.smtp import GatewaySMTP


def _client(server: GatewaySMTP) -> Client:
    assert server.client is not None
    return server.client


class GatewayHandler:
    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    # -- aiosmtpd's hooks ----------------------------------------------------------

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        _client(server).helo = usable_text(hostname)
        # Commands are read and answered one after another, in order, so
        # pipelined commands need nothing more than saying so.
        responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        _client(server).helo = usable_text(hostname)
        return f"250 {server.hostname}"

    async def auth_PLAIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        return await self._authenticate(server, sasl.read_plain(server, args))

    async def auth_LOGIN(self, server: GatewaySMTP, args: list[str]) -> AuthResult:
        return await self._authenticate(server, sasl.read_login(server, args))

    async def _authenticate(self, server: GatewaySMTP,
                            reading: Awaitable[sasl.Credentials | None]) -> AuthResult:
        try:
            credentials = await reading
        except sasl.SaslRefused as exc:
            await server.push(self.refused(server, "AUTH", "syntax", exc.reply, exc.detail))
            return AuthResult(success=False, handled=True)
        if credentials is None:
            return AuthResult(success=False, handled=True)  # aiosmtpd answered the abort
        verdict = await self.engine.authenticate(_client(server), credentials)
        if verdict.ok:
            return AuthResult(success=True, handled=False, message=verdict.reply,
                              auth_data=credentials.login)
        return AuthResult(success=False, handled=False, message=verdict.reply)

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        client = _client(server)
        sender = "" if address == "<>" else address
        verdict = await self.engine.mail(client, sender)
        if client.account is None:
            session.authenticated = False  # the login was withdrawn since AUTH
        if verdict.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return verdict.reply

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        verdict = await self.engine.rcpt(_client(server), address, len(envelope.rcpt_tos))
        if verdict.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return verdict.reply

    async def handle_DATA(self, server: GatewaySMTP, session: Session,
                          envelope: Envelope) -> str:
        content = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        transaction = Transaction(mail_from, tuple(envelope.rcpt_tos), content)
        acceptance = await self.engine.data(_client(server), transaction)
        return acceptance.verdict.reply

    # -- decisions the protocol object makes ---------------------------------------

    def connect(self, server: GatewaySMTP) -> Verdict:
        return self.engine.connect(_client(server))

    def disconnect(self, server: GatewaySMTP) -> None:
        self.engine.disconnect(_client(server))

    def refused(self, server: GatewaySMTP, stage: str, policy: str, reply: str,
                detail: str = "") -> str:
        return self.engine.refused(_client(server), stage, policy, reply, detail).reply

    def unauthenticated(self, server: GatewaySMTP, stage: str) -> str:
        return self.engine.unauthenticated(_client(server), stage).reply

    def bad_address(self, server: GatewaySMTP, stage: str, problem: str) -> str:
        return self.engine.bad_address(_client(server), stage, problem).reply

    def internal_error(self, server: GatewaySMTP, stage: str, error: BaseException) -> str:
        return self.engine.internal_error(_client(server), stage, error).reply

