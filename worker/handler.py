"""aiosmtpd handler hooks mapped onto the policy engine; no business rules here."""

from __future__ import annotations

from typing import Any

from aiosmtpd.smtp import MISSING, Envelope, Session

from worker import replies
from worker.engine import PolicyEngine, Transaction
from worker.smtp import GatewaySMTP


class GatewayHandler:
    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        assert server.client is not None
        server.client.helo = hostname
        # Commands are read and answered one after another, in order, so
        # pipelined commands need nothing more than saying so.
        responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        assert server.client is not None
        server.client.helo = hostname
        return f"250 {server.hostname}"

    async def handle_AUTH(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> Any:
        assert server.client is not None
        verdict = await self.engine.auth_allowed(server.client)
        return MISSING if verdict.ok else verdict.reply

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        assert server.client is not None
        sender = "" if address == "<>" else address
        verdict = await self.engine.mail(server.client, sender)
        if verdict.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return verdict.reply

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        assert server.client is not None
        if len(envelope.rcpt_tos) >= self.engine.snapshot().settings.server.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        verdict = await self.engine.rcpt(server.client, address)
        if verdict.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return verdict.reply

    async def handle_DATA(self, server: GatewaySMTP, session: Session,
                          envelope: Envelope) -> str:
        assert server.client is not None
        content = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        transaction = Transaction(mail_from, tuple(envelope.rcpt_tos), content)
        acceptance = await self.engine.data(server.client, transaction)
        return acceptance.verdict.reply
