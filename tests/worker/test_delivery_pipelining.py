"""Delivery with PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, replies in order.

The sink is aiosmtpd with PIPELINING added to its EHLO (aiosmtpd reads
commands from a buffer one after another, so it takes pipelined input);
it records, when MAIL FROM arrives, whether the rest of the transaction was
already waiting in its buffer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as ServerSMTP
from test_delivery import (  # noqa: F401
    MESSAGE,
    MakeWorld,
    Sink,
    make_world,
    tls_context,
    until,
    zone,
)

from worker.delivery.pipeline import ReplyReader, data_block


class PipeliningSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.pipelined: list[bool] = []  # per MAIL: RCPT and DATA were already buffered
        self.commands: list[str] = []

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        await asyncio.sleep(0.05)  # let everything the client sent arrive
        waiting = bytes(server._reader._buffer)
        self.pipelined.append(b"RCPT TO:" in waiting and b"DATA\r\n" in waiting)
        self.commands.append("MAIL")
        if address.startswith("refused"):
            return "550 5.7.1 Sender refused"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append("RSET")
        return "250 OK"


@pytest.fixture
async def sink(tls_context: ssl.SSLContext) -> AsyncIterator[tuple[Sink, int]]:  # noqa: F811
    handler = PipeliningSink()

    def factory() -> ServerSMTP:
        handler.connections += 1
        return ServerSMTP(handler, hostname="sink.test", tls_context=tls_context,
                          require_starttls=False, enable_SMTPUTF8=True)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    yield handler, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_transaction_is_pipelined_and_arrives_intact(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world()
    record = await world.submit("ok@dest.test", "ok2@dest.test")
    got = await until(lambda: world.sink.to("ok@dest.test"), "delivery")
    assert got[0].content == MESSAGE  # dots, 8-bit text and line ends as stored
    assert got[0].rcpt_tos == ["ok@dest.test", "ok2@dest.test"] and got[0].tls
    assert world.sink.pipelined == [True]
    await until(world.empty, "removal from the queue")
    assert record.attempts == 1


async def test_refused_recipients_and_sender_with_pipelining(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(retry=["1h"], agent={"idle_timeout": 60.0})
    # One at a time, each with its DSN delivered, so each reuses its destination's session.
    mixed = await world.submit("reject-a@dest.test", "ok-b@dest.test", "later-c@dest.test")
    await until(lambda: mixed.attempts == 1 and len(world.sink.messages) == 2, "mixed, DSN")
    none = await world.submit("reject-d@dest.test", "reject-e@dest.test")
    await until(lambda: none.attempts == 1 and len(world.sink.messages) == 3, "none, DSN")
    refused = await world.submit("ok-f@dest.test", sender="refused@kowalski.pl")
    await until(lambda: refused.attempts == 1 and len(world.sink.messages) == 4, "refused")
    assert [r["status"] for r in mixed.recipients] == ["bounced", "delivered", "deferred"]
    assert [r["status"] for r in none.recipients] == ["bounced", "bounced"]
    assert refused.recipients[0]["status"] == "bounced"
    assert "Sender refused" in refused.recipients[0]["last_error"]
    # No data went out for the other two (what else arrived are the DSNs to the senders).
    assert not [m for m in world.sink.messages if m.rcpt_tos[0].endswith("@dest.test")
                and m.rcpt_tos != ["ok-b@dest.test"]]
    # Both transactions that ended without data were reset ...
    assert world.sink.commands.count("RSET") == 2
    # ... on the one connection to dest.test (the other one carried the DSNs), which
    # still carries the next message.
    assert world.agent is not None and world.agent.pool.sessions_opened == 2
    await world.submit("ok-g@dest.test")
    await until(lambda: world.sink.to("ok-g@dest.test"), "the next delivery")
    assert world.agent.pool.sessions_opened == 2


async def _reader_against(chunks: list[bytes]) -> list[tuple[int, str]]:
    """Replies a ReplyReader makes of what a real server writes in these pieces."""
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for chunk in chunks:
                if not chunk:  # the server hangs up
                    return
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.002)
            await reader.read()  # until the client closes
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, "127.0.0.1", port)
    pipe = ReplyReader(transport)  # type: ignore[arg-type]
    got = []
    try:
        while True:
            reply = await pipe.reply(5.0)
            got.append((reply.code, reply.message))
            if reply.code == 221:
                break
    finally:
        pipe.close()
        await done.wait()
        server.close()
        await server.wait_closed()
    return got


async def test_replies_split_and_joined_any_way_come_out_in_order() -> None:
    wire = (b"250 2.1.0 Ok\r\n250-first line\r\n250-second\r\n250 last\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n221 Bye\r\n")
    expected = [(250, "2.1.0 Ok"), (250, "first line\nsecond\nlast"),
                (354, "End data with <CR><LF>.<CR><LF>"), (221, "Bye")]
    assert await _reader_against([wire]) == expected
    assert await _reader_against([wire[i:i + 1] for i in range(len(wire))]) == expected
    assert await _reader_against([wire[:17], wire[17:60], wire[60:]]) == expected


async def test_a_malformed_or_missing_reply_is_an_error_not_a_hang() -> None:
    from aiosmtplib.errors import SMTPResponseException, SMTPServerDisconnected

    with pytest.raises(SMTPResponseException):
        await _reader_against([b"250 Ok\r\nnot a reply\r\n"])
    with pytest.raises(SMTPServerDisconnected):
        await _reader_against([b"250 Ok\r\n", b"250-half a reply\r\n", b""])


def test_data_block_stuffs_dots_and_ends_lines() -> None:
    assert data_block(b"a\n.b\r\n..c\rd") == b"a\r\n..b\r\n...c\r\nd\r\n.\r\n"
    assert data_block(b"x\r\n") == b"x\r\n.\r\n"
