"""Delivery sessions kept open between messages: reuse, idle close, a reused connection gone.

Real SMTP on loopback: an aiosmtpd sink that counts connections, QUITs and
the MAIL commands of each connection, a real spool and DNS (the fixtures of
``test_delivery``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import MISSING
from aiosmtpd.smtp import SMTP as ServerSMTP
from test_delivery import MakeWorld, Sink, make_world, tls_context, until, zone  # noqa: F401


class CountingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.quits = 0
        # With this set, a connection's second MAIL gets 421 and the connection closes.
        self.close_at_second_mail = False

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        session.mails = getattr(session, "mails", 0) + 1
        if self.close_at_second_mail and session.mails == 2:
            server.transport.close()
            return "421 4.4.2 sink.test Error: timeout exceeded"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> Any:
        self.quits += 1
        return MISSING


@pytest.fixture
def sink_idle_timeout() -> float:
    return 300.0


@pytest.fixture
async def sink(tls_context: ssl.SSLContext,  # noqa: F811
               sink_idle_timeout: float) -> AsyncIterator[tuple[CountingSink, int]]:
    handler = CountingSink()

    def factory() -> ServerSMTP:
        handler.connections += 1
        return ServerSMTP(handler, hostname="sink.test", tls_context=tls_context,
                          require_starttls=False, enable_SMTPUTF8=True,
                          timeout=sink_idle_timeout)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    yield handler, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_an_idle_connection_carries_the_next_message(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 5.0})
    for number in range(5):
        await world.submit(f"ok{number}@dest.test")
        await until(lambda n=number: len(world.sink.messages) == n + 1, "a delivery")
        await until(world.empty, "an empty queue")  # the session has nothing left to send
        await asyncio.sleep(0.05)
    assert world.sink.connections == 1
    assert world.agent is not None and world.agent.pool.sessions_opened == 1


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 0.2})
    await world.submit("ok1@dest.test")
    await until(lambda: world.sink.quits == 1, "QUIT after the idle timeout")
    await world.submit("ok2@dest.test")
    await until(lambda: len(world.sink.messages) == 2, "the second delivery")
    assert world.sink.connections == 2


async def test_stop_closes_idle_connections_at_once(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 60.0})
    await world.submit("ok1@dest.test")
    await until(world.empty, "the delivery")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await world.close()
    assert loop.time() - started < 5.0
    await until(lambda: world.sink.quits == 1, "QUIT at stop")


@pytest.mark.parametrize("sink_idle_timeout", [0.3])
async def test_a_connection_the_server_closed_while_idle_is_not_used(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 10.0})
    record = await world.submit("ok1@dest.test")
    await until(world.empty, "the first delivery")
    await asyncio.sleep(0.8)  # the sink times the idle connection out
    second = await world.submit("ok2@dest.test")
    await until(lambda: len(world.sink.messages) == 2, "the second delivery", timeout=5.0)
    assert (record.attempts, second.attempts) == (1, 1)
    assert world.sink.connections == 2


async def test_a_reused_connection_refusing_mail_with_421_requeues_the_message(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 10.0}, retry=["1h"])
    world.sink.close_at_second_mail = True
    await world.submit("ok1@dest.test")
    await until(world.empty, "the first delivery")
    second = await world.submit("ok2@dest.test")
    # Not deferred for an hour: straight onto a new connection.
    await until(lambda: len(world.sink.messages) == 2, "the second delivery", timeout=5.0)
    await until(world.empty, "an empty queue")
    assert second.attempts == 1
    assert world.sink.connections == 2


async def test_an_idle_connection_gives_its_slot_to_another_destination(
        make_world: MakeWorld) -> None:  # noqa: F811
    world = await make_world(agent={"idle_timeout": 60.0, "max_connections": 1})
    await world.submit("ok1@dest.test")
    await until(world.empty, "the first delivery")  # its session now idles
    await world.submit("ok2@kowalski.pl")
    await until(lambda: world.sink.to("ok2@kowalski.pl"), "the other destination", timeout=5.0)
    assert world.sink.quits == 1  # the idle session was closed politely to make room
