"""Delivery (SPEC §4): real SMTP sinks on loopback, real DNS, a real spool and counters.

One aiosmtpd sink plays every mail server. It decides by the recipient's
local part: ``reject*`` gets 550, ``later*`` always 451, ``flakyN*`` 451
for its first N tries; anything else is accepted. The DNS server points
every MX at 127.0.0.1 and ``delivery.port`` at the sink.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as ServerSMTP
from dnsserver import TestDNSServer

from cluster.counting import Op
from cluster.keys import UNDELIVERABLE, bounce_key
from cluster.selfsigned import write_self_signed
from cluster.settings import Settings, parse_settings
from worker.counters.client import LocalCounters
from worker.counters.shard import CounterShard
from worker.delivery import DeliveryAgent
from worker.dns import DomainResolver
from worker.spool import Spool, SpoolRecord

SENDER = "jan@kowalski.pl"
CLIENT = "192.0.2.10"
TRUSTED = "10.1.2.3"
MESSAGE = (b"From: Jan <jan@kowalski.pl>\r\nTo: <ok@dest.test>\r\nSubject: Invoice 42\r\n"
           b"Message-ID: <m42@kowalski.pl>\r\n\r\nHello,\r\n.a line that starts with a dot\r\n"
           b".\r\n..two dots\r\nZa\xc5\xbc\xc3\xb3\xc5\x82\xc4\x87 g\xc4\x99\xc5\x9bl\xc4\x85 "
           b"ja\xc5\xba\xc5\x84.\r\n")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    helo: str | None


class Sink:
    """Handler of the sink server: records what it accepted."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.tries: Counter[str] = Counter()
        self.connections = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.tries[address] += 1
        local = address.split("@")[0]
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        if local.startswith("later"):
            return "451 4.3.0 Try again later"
        flaky = re.match(r"flaky(\d+)", local)
        if flaky and self.tries[address] <= int(flaky.group(1)):
            return "451 4.7.1 Greylisted, come back later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.content, session.ssl is not None,
                                      session.host_name))
        return "250 2.0.0 Ok: queued"

    def to(self, rcpt: str) -> list[Received]:
        return [m for m in self.messages if rcpt in m.rcpt_tos]


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    folder = tmp_path_factory.mktemp("tls")
    write_self_signed(folder / "cert.pem", folder / "key.pem", "mx.dest.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@pytest.fixture
async def sink(tls_context: ssl.SSLContext) -> AsyncIterator[tuple[Sink, int]]:
    handler = Sink()

    def factory() -> ServerSMTP:
        handler.connections += 1
        return ServerSMTP(handler, hostname="sink.test", tls_context=tls_context,
                          require_starttls=False, enable_SMTPUTF8=True)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    yield handler, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
def zone(dns: TestDNSServer) -> TestDNSServer:
    dns.add_mx("dest.test", "mx1.dest.test", 10)
    dns.add_a("mx1.dest.test", "127.0.0.1")
    dns.add_mx("kowalski.pl", "mx.kowalski.pl", 10)
    dns.add_a("mx.kowalski.pl", "127.0.0.1")
    # The preferred exchanger has nothing listening: delivery must move on.
    dns.add_mx("backup.test", "dead.backup.test", 10)
    dns.add_a("dead.backup.test", "127.0.0.3")
    dns.add_mx("backup.test", "mx2.backup.test", 20)
    dns.add_a("mx2.backup.test", "127.0.0.1")
    return dns


def make_settings(folder: Path, **delivery: Any) -> Settings:
    values: dict[str, Any] = {"spool": str(folder / "spool"), "retry": ["200ms", "200ms"],
                              "max_queue_time": "1h"}
    values.update(delivery)
    return parse_settings(folder / "sendguard.toml", {
        "server": {"hostname": "relay.test", "listen": ["127.0.0.1:0"],
                   "trusted_networks": [f"{TRUSTED}/32"]},
        "tenants": {"file": "tenants.toml"},
        "bounce": {"window": "1h"},
        "delivery": values,
    })


class World:
    """A spool, an agent, counters and the sink, with helpers to submit and wait."""

    def __init__(self, settings: Settings, sink: Sink, dns: TestDNSServer | None,
                 **agent_args: Any) -> None:
        self.settings = settings
        self.sink = sink
        self.dns = dns
        self.shard = CounterShard()
        self.spool = Spool(settings.delivery.spool, "w0")
        self.agent_args = agent_args
        self.resolver: DomainResolver | None = None
        self.agent: DeliveryAgent | None = None
        self.closed = False

    async def start(self) -> DeliveryAgent:
        if self.dns is not None:
            self.resolver = DomainResolver([self.dns.address], timeout=2.0)
        self.agent = DeliveryAgent(self.spool, lambda: self.settings,
                                   LocalCounters(self.shard), self.resolver, **self.agent_args)
        await self.agent.start()
        return self.agent

    async def submit(self, *rcpts: str, sender: str = SENDER, client: str = CLIENT,
                     message: bytes = MESSAGE, enqueue: bool = True) -> SpoolRecord:
        record = SpoolRecord.new(session_id="piWs1j0010jifNx01iWsdh", client_ip=client,
                                 account=SENDER, helo="laptop", mail_from=sender,
                                 rcpt_tos=list(rcpts), message=message)
        await self.spool.store(record)
        if enqueue:
            assert self.agent is not None
            self.agent.enqueue(record)
        return record

    def undeliverable(self, client: str = CLIENT) -> int:
        op = Op(bounce_key(client), UNDELIVERABLE, self.settings.bounce.window, None, 0)
        return self.shard.check([op]).counts[0]

    def empty(self) -> bool:
        return self.agent is not None and self.agent.queued == 0

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.agent is not None:
            await self.agent.stop(5.0)
        await self.spool.aclose()
        if self.resolver is not None:
            await self.resolver.close()

    def reload_spool(self) -> list[SpoolRecord]:
        """What a restart would find in the spool (after close())."""
        assert self.closed
        spool = Spool(self.settings.delivery.spool, "w0")
        try:
            return spool.load_all()
        finally:
            spool.close()


async def until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


MakeWorld = Callable[..., Awaitable[World]]


@pytest.fixture
async def make_world(short_tmp: Path, sink: tuple[Sink, int],
                     zone: TestDNSServer) -> AsyncIterator[MakeWorld]:
    """``await make_world(retry=[...], ..., agent={...})``: a started World."""
    handler, port = sink
    worlds: list[World] = []

    async def make(*, agent: dict[str, Any] | None = None, dns: bool = True,
                   start: bool = True, **delivery: Any) -> World:
        w = World(make_settings(short_tmp, **{"port": port, **delivery}), handler,
                  zone if dns else None, **(agent or {}))
        worlds.append(w)
        if start:
            await w.start()
        return w

    yield make
    for w in worlds:
        await w.close()


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def dsn_parts(content: bytes) -> tuple[EmailMessage, str, list[Any], str]:
    """(the DSN, its human-readable text, its status field groups, the returned header)."""
    dsn = parse(content)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    groups, headers = parts[1].get_payload(), parts[2].get_payload()
    assert isinstance(groups, list) and isinstance(headers, str)
    return dsn, parts[0].get_content(), groups, headers


# -- delivery ----------------------------------------------------------------------------


async def test_delivers_with_body_and_envelope_intact(make_world: MakeWorld) -> None:
    world = await make_world()
    record = await world.submit("ok@dest.test", "ok2@dest.test")
    got = await until(lambda: world.sink.to("ok@dest.test"), "delivery")
    assert len(got) == 1
    msg = got[0]
    assert msg.mail_from == SENDER
    assert msg.rcpt_tos == ["ok@dest.test", "ok2@dest.test"]
    assert msg.content == MESSAGE
    assert msg.tls, "STARTTLS was offered, so it must have been used"
    assert msg.helo == "relay.test"
    await until(world.empty, "removal from the queue")
    assert record.attempts == 1
    assert world.undeliverable() == 0
    await world.close()
    assert world.reload_spool() == []


async def test_next_mx_when_the_preferred_one_is_down(make_world: MakeWorld) -> None:
    world = await make_world()
    await world.submit("ok@backup.test")
    got = await until(lambda: world.sink.to("ok@backup.test"), "delivery via the backup MX")
    assert got[0].content == MESSAGE


async def test_one_connection_carries_several_messages(make_world: MakeWorld) -> None:
    world = await make_world(agent={"per_destination": 2}, start=False)
    for i in range(10):
        await world.submit(f"ok{i}@dest.test", enqueue=False)
    await world.start()  # as after a restart: ten messages due at once
    await until(lambda: len(world.sink.messages) == 10, "ten deliveries")
    assert 1 <= world.sink.connections <= 2
    await until(world.empty, "an empty queue")


async def test_smarthost_mode_sends_everything_to_the_relay(make_world: MakeWorld,
                                                            sink: tuple[Sink, int]) -> None:
    # No DNS at all, and delivery.port leads nowhere: the relay is the only route.
    world = await make_world(dns=False, port=1, mode="smarthost",
                             smarthost=f"127.0.0.1:{sink[1]}")
    await world.submit("a@nowhere.invalid", "b@dest.test", "c@other.invalid")
    got = await until(lambda: world.sink.messages, "delivery to the smarthost")
    assert got[0].rcpt_tos == ["a@nowhere.invalid", "b@dest.test", "c@other.invalid"]
    assert got[0].content == MESSAGE
    assert world.sink.connections == 1
    await until(world.empty, "an empty queue")


async def test_a_failed_tls_handshake_falls_back_to_plain_text(
        make_world: MakeWorld, tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx.dest.test")
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broken.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    # Demanding a client certificate (which an MTA does not present) fails the
    # handshake itself under TLS 1.2, after STARTTLS was offered and accepted.
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    broken.verify_mode = ssl.CERT_REQUIRED
    broken.load_verify_locations(tmp_path / "cert.pem")
    handler = Sink()

    def factory() -> ServerSMTP:
        handler.connections += 1
        return ServerSMTP(handler, hostname="old.test", tls_context=broken,
                          require_starttls=False)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        world = await make_world(port=server.sockets[0].getsockname()[1])
        world.sink = handler
        await world.submit("ok@dest.test")
        got = await until(lambda: handler.messages, "delivery in plain text")
        assert not got[0].tls
        assert got[0].content == MESSAGE
        assert handler.connections == 2
        await until(world.empty, "an empty queue")
    finally:
        server.close()
        await server.wait_closed()


async def _plain_sink(handler: Sink, context: ssl.SSLContext | None = None) -> Any:
    """A sink offering STARTTLS with ``context``, or not at all without one."""
    def factory() -> ServerSMTP:
        handler.connections += 1
        return ServerSMTP(handler, hostname="plain.test", tls_context=context,
                          require_starttls=False)

    return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)


async def test_tls_encrypt_never_delivers_in_plain_text(make_world: MakeWorld) -> None:
    handler = Sink()
    server = await _plain_sink(handler)  # no certificate: STARTTLS is not offered
    try:
        world = await make_world(port=server.sockets[0].getsockname()[1], tls="encrypt")
        world.sink = handler
        record = await world.submit("ok@dest.test")
        await until(lambda: record.recipients[0]["status"] == "deferred", "the deferral")
        assert handler.messages == [] and handler.connections >= 1
        error = record.recipients[0]["last_error"]
        assert "TLS is required, but STARTTLS was not offered" in error, error
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_encrypt_does_not_fall_back_after_a_failed_handshake(
        make_world: MakeWorld, tmp_path: Path) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx.dest.test")
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broken.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    broken.verify_mode = ssl.CERT_REQUIRED  # fails the handshake, as in the test above
    broken.load_verify_locations(tmp_path / "cert.pem")
    handler = Sink()
    server = await _plain_sink(handler, broken)
    try:
        world = await make_world(port=server.sockets[0].getsockname()[1], tls="encrypt")
        record = await world.submit("ok@dest.test")
        await until(lambda: record.recipients[0]["status"] == "deferred", "the deferral")
        assert "the TLS handshake failed" in record.recipients[0]["last_error"]
        assert handler.messages == [] and handler.connections == 1  # no plain-text retry
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_verify_needs_a_certificate_for_the_host(make_world: MakeWorld,
                                                           tmp_path: Path) -> None:
    # mx1.dest.test is the MX of dest.test (see the zone above).
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx1.dest.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    handler = Sink()
    server = await _plain_sink(handler, context)
    port = server.sockets[0].getsockname()[1]
    try:
        # Not signed by an authority the system knows: the mail waits.
        world = await make_world(port=port, tls="verify")
        record = await world.submit("ok@dest.test")
        await until(lambda: record.recipients[0]["status"] == "deferred", "the deferral")
        assert "certificate verify failed" in record.recipients[0]["last_error"]
        assert handler.messages == []
        await world.close()
        # With the certificate as delivery.tls_ca, it goes, over TLS.
        world = await make_world(port=port, tls="verify", tls_ca=str(tmp_path / "cert.pem"))
        await world.submit("ok2@dest.test")
        got = await until(lambda: handler.to("ok2@dest.test"), "verified delivery")
        assert got[0].tls
    finally:
        server.close()
        await server.wait_closed()


# -- failures, retries, DSNs --------------------------------------------------------------


async def test_partial_failure_bounces_only_the_refused_recipient(make_world: MakeWorld) -> None:
    world = await make_world()
    record = await world.submit("ok@dest.test", "reject@dest.test")
    dsn = await until(lambda: world.sink.to(SENDER), "the DSN")
    assert world.sink.to("ok@dest.test")[0].rcpt_tos == ["ok@dest.test"]
    _, text, groups, _ = dsn_parts(dsn[0].content)
    assert [str(g["Final-Recipient"]) for g in groups[1:]] == ["rfc822; reject@dest.test"]
    assert "<reject@dest.test>:" in text and "ok@dest.test" not in text
    await until(world.empty, "an empty queue")
    assert [r["status"] for r in record.recipients] == ["delivered", "bounced"]
    assert world.undeliverable() == 1  # a bounced recipient: the message counts


async def test_5xx_produces_an_rfc3464_dsn_to_the_sender(make_world: MakeWorld) -> None:
    world = await make_world()
    record = await world.submit("reject@dest.test")
    got = await until(lambda: world.sink.to(SENDER), "the DSN at the sender's MX")
    assert got[0].mail_from == "<>"
    assert got[0].rcpt_tos == [SENDER]
    dsn, text, groups, headers = dsn_parts(got[0].content)
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert dsn["To"].addresses[0].addr_spec == SENDER
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["Message-ID"] and dsn["Date"]
    assert record.queue_id in text
    per_message, per_rcpt = groups
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert arrival.timestamp() == pytest.approx(record.received_at, abs=1)
    assert per_rcpt["Final-Recipient"] == "rfc822; reject@dest.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.dest.test"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <reject@dest.test>")
    assert "Subject: Invoice 42" in headers
    assert "Hello," not in headers  # the header only, never the body
    await until(world.empty, "an empty queue")
    assert world.undeliverable() == 1  # the DSN itself is never counted


async def test_4xx_is_retried_until_delivered_and_stops_counting(make_world: MakeWorld) -> None:
    world = await make_world(retry=["200ms", "200ms"])
    record = await world.submit("flaky2@dest.test")
    # Counted as undeliverable from the first deferral...
    await until(lambda: world.undeliverable() == 1, "the undeliverable mark")
    assert record.recipients[0]["status"] == "deferred"
    assert "451 4.7.1 Greylisted" in record.recipients[0]["last_error"]
    got = await until(lambda: world.sink.to("flaky2@dest.test"), "the delivery after retries")
    assert got[0].content == MESSAGE
    await until(world.empty, "an empty queue")
    # ...and no longer once delivered.
    assert world.undeliverable() == 0
    assert world.sink.tries["flaky2@dest.test"] == 3
    assert record.attempts == 3
    assert not world.sink.to(SENDER)


async def test_expiry_bounces_with_a_dsn(make_world: MakeWorld) -> None:
    world = await make_world(retry=["200ms"], max_queue_time="1s")
    start = time.monotonic()
    record = await world.submit("later@dest.test")
    got = await until(lambda: world.sink.to(SENDER), "the expiry DSN")
    assert time.monotonic() - start >= 0.9
    dsn, text, groups, _ = dsn_parts(got[0].content)
    assert "expired" in dsn["Subject"]
    assert "1 second" in text
    rcpt = groups[1]
    assert rcpt["Final-Recipient"] == "rfc822; later@dest.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.3.0"  # what the server last said, as RFC 3463 X.4.7 advises
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
    await until(world.empty, "an empty queue")
    assert record.recipients[0]["status"] == "bounced"
    assert record.attempts >= 3
    assert world.undeliverable() == 1


async def test_null_mx_bounces_without_connecting(make_world: MakeWorld) -> None:
    world = await make_world()
    await world.submit("anna@null-mx.test")
    got = await until(lambda: world.sink.to(SENDER), "the DSN")
    rcpt = dsn_parts(got[0].content)[2][1]
    assert rcpt["Status"] == "5.1.10"
    assert rcpt["Remote-MTA"] is None
    assert "null MX" in rcpt["Diagnostic-Code"]
    assert world.sink.tries == Counter({SENDER: 1})  # only the DSN reached a server
    assert world.undeliverable() == 1


async def test_dns_temporary_failure_defers(make_world: MakeWorld) -> None:
    world = await make_world(retry=["1h"])
    record = await world.submit("anna@servfail.test")
    await until(lambda: record.attempts >= 1, "the first attempt")
    assert record.recipients[0]["status"] == "deferred"
    assert "lookup failed" in record.recipients[0]["last_error"]
    assert world.undeliverable() == 1
    assert not world.sink.messages


async def test_a_dsn_that_cannot_be_delivered_is_dropped(make_world: MakeWorld) -> None:
    world = await make_world()
    await world.submit("reject@dest.test", sender="")
    await until(lambda: world.sink.tries["reject@dest.test"] == 1, "the attempt")
    await until(world.empty, "an empty queue")
    assert not world.sink.messages
    assert world.undeliverable() == 0


async def test_trusted_clients_are_not_counted(make_world: MakeWorld) -> None:
    world = await make_world()
    await world.submit("reject@dest.test", client=TRUSTED)
    await until(lambda: world.sink.to(SENDER), "the DSN")
    await until(world.empty, "an empty queue")
    assert world.undeliverable(TRUSTED) == 0


# -- operator hooks ------------------------------------------------------------------------


async def test_list_flush_delete(make_world: MakeWorld) -> None:
    world = await make_world(retry=["1h"])
    agent = world.agent
    assert agent is not None
    record = await world.submit("later@dest.test", "ok@dest.test")
    [entry] = await until(lambda: [e for e in agent.list_queue() if e["state"] == "deferred"],
                          "the first attempt to end")
    assert entry["queue_id"] == record.queue_id
    assert entry["attempts"] == 1
    assert 3500 < entry["next_try_in"] <= 3600
    assert "451 4.3.0 Try again later" in entry["last_error"]
    assert [(r["rcpt"], r["status"]) for r in entry["recipients"]] == [
        ("later@dest.test", "deferred"), ("ok@dest.test", "delivered")]
    assert entry["age"] >= 0 and entry["size"] == len(MESSAGE)

    assert agent.flush() == 1
    await until(lambda: record.attempts == 2, "the flushed attempt")
    assert world.sink.tries["later@dest.test"] == 2
    assert world.sink.tries["ok@dest.test"] == 1  # a delivered recipient is not sent again

    assert await agent.delete(record.queue_id) is True
    assert await agent.delete(record.queue_id) is False
    assert agent.list_queue() == []
    await world.close()
    assert world.reload_spool() == []


async def test_a_deferred_message_survives_a_restart_with_its_mark(make_world: MakeWorld) -> None:
    world = await make_world(retry=["1h"])
    record = await world.submit("later@dest.test")
    await until(lambda: record.attempts == 1, "the first attempt")
    assert world.undeliverable() == 1
    await world.close()
    [loaded] = world.reload_spool()
    assert loaded.counted_undeliverable
    assert loaded.recipients[0]["status"] == "deferred"
    assert loaded.attempts == 1
    assert loaded.next_attempt == pytest.approx(record.next_attempt)
