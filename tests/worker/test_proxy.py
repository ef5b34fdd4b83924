"""PROXY protocol v1/v2 (issue 6 item 4): the parser, and a real worker behind a "balancer".

The tests play HAProxy: they connect from 127.0.0.1 (the only address in
``server.proxy_networks``), write the header themselves and then speak SMTP,
on the STARTTLS listener and on the implicit-TLS one. The header names a
client the GeoIP database maps elsewhere than the balancer (127.0.0.1 is PL,
127.0.0.66 US, 127.0.0.42 DE), so a policy that looked at the socket's peer
would decide differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import selectors
import smtplib
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import TestDNSServer
from gateway import PASSWORD, Gateway, running_gateway
from test_policies_e2e import find_record

from worker.proxy import (
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    parse_v1,
    parse_v2,
    read_header,
)

PROXY_TIMEOUT = 1.0
SENDER_REJECTED = (550, "5.1.0 <jan@kowalski.pl> sender rejected")


def v1(source: str, sport: int = 40000, destination: str = "127.0.0.1", dport: int = 587) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    if family == "TCP6" and ":" not in destination:
        destination = f"::ffff:{destination}"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source: str | None, sport: int = 40000, destination: str = "127.0.0.1", dport: int = 587,
       *, command: int = 0x1, tlvs: bytes = b"") -> bytes:
    if source is None:
        family, addresses = 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        if src.version == 4:
            family = 0x11
        else:
            family, dst = 0x21, ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
        addresses = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    payload = addresses + tlvs
    fixed = V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(payload))
    return fixed + payload


# -- the parser -------------------------------------------------------------------

@pytest.mark.parametrize("line, source", [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 587\r\n", ("192.0.2.1", 51000)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 465\r\n", ("2001:db8::1", 65535)),
    (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n", ("::ffff:192.0.2.1", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
])
def test_v1_valid(line: bytes, source: tuple[str, int] | None) -> None:
    parsed = parse_v1(line).source
    if source is None:
        assert parsed is None
    else:
        assert parsed is not None and parsed[1] == source[1]
        assert ipaddress.ip_address(parsed[0]) == ipaddress.ip_address(source[0])


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 587\n",  # LF only
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51000\r\n",  # a field missing
    b"PROXY TCP4  192.0.2.1 198.51.100.2 51000 587\r\n",  # two spaces
    b"PROXY TCP4 2001:db8::1 198.51.100.2 51000 587\r\n",  # IPv6 under TCP4
    b"PROXY TCP6 192.0.2.1 2001:db8::2 51000 587\r\n",  # IPv4 under TCP6
    b"PROXY TCP4 192.0.2.01 198.51.100.2 51000 587\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 587\r\n",  # port out of range
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 587\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 5x 587\r\n",
    b"PROXY UDP4 192.0.2.1 198.51.100.2 51000 587\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 587\r\r\n",
    b"PROXY TCP4 \xc5\x82\xc3\xb3d\xc5\xba 198.51.100.2 51000 587\r\n",  # not ASCII
    b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",  # over 107 bytes
])
def test_v1_invalid(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_v1(line)


def test_v2_valid_with_tlvs_local_and_unspec() -> None:
    tlv = bytes([0x05]) + struct.pack("!H", 4) + b"abcd"  # PP2_TYPE_UNIQUE_ID
    header = v2("203.0.113.7", 41000, tlvs=tlv)
    assert parse_v2(header[:16], header[16:]) == ProxyHeader(
        2, "proxy", ("203.0.113.7", 41000), ("127.0.0.1", 587))
    header = v2("2001:db8::7", 41000, "2001:db8::1", 465)
    assert parse_v2(header[:16], header[16:]).source == ("2001:db8::7", 41000)
    header = v2("203.0.113.7", command=0x0)
    assert parse_v2(header[:16], header[16:]) == ProxyHeader(2, "local")
    header = v2(None)
    assert parse_v2(header[:16], header[16:]) == ProxyHeader(2, "proxy")


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h[:12] + b"\x10" + h[13:], "version 1"),
    (lambda h: h[:12] + b"\x22" + h[13:], "unknown command 2"),
    (lambda h: h[:13] + b"\x41" + h[14:], "unknown address family 4"),
    (lambda h: h[:13] + b"\x12" + h[14:], "transport 2"),
    (lambda h: h[:14] + struct.pack("!H", 8) + h[16:24], "cannot hold its addresses"),
    (lambda h: h[:14] + struct.pack("!H", MAX_V2_PAYLOAD + 1) + h[16:], "declares 4097 bytes"),
    (lambda h: h[:11] + b"X" + h[12:], "bad signature"),
])
def test_v2_invalid(mutate: Callable[[bytes], bytes], message: str) -> None:
    header = mutate(v2("203.0.113.7"))
    with pytest.raises(ProxyError, match=message):
        parse_v2(header[:16], header[16:])


def test_parsers_raise_only_proxy_error_on_random_input() -> None:
    rng = random.Random(6)
    valid = [v1("203.0.113.7"), v1("2001:db8::7"), v2("203.0.113.7"), v2("2001:db8::7")]
    for _ in range(5000):
        base = rng.choice(valid)
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 120))
        elif kind == 1:  # a few flipped bytes in a valid header
            data = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            data = base[:rng.randrange(len(base))]
        for parse in (lambda d: parse_v1(d), lambda d: parse_v2(d[:16], d[16:])):
            try:
                parse(data)
            except ProxyError:
                pass


# -- the reader: nothing past the header, truncations ------------------------------

async def read_from_pair(data: bytes, *, close: bool = True) -> tuple[ProxyHeader, bytes]:
    """Feed ``data`` through a socket pair; the header and what is left unread after it."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        theirs.sendall(data)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(10):
            header = await read_header(ours)
        ours.setblocking(True)
        ours.settimeout(5)
        rest = b""
        while chunk := ours.recv(65536):
            rest += chunk
        return header, rest
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("header", [
    v1("203.0.113.7"), v1("2001:db8::7"), b"PROXY UNKNOWN\r\n", v2("203.0.113.7"),
    v2("2001:db8::7", tlvs=b"\x05\x00\x02ab"), v2(None), v2("203.0.113.7", command=0),
])
async def test_reader_stops_exactly_at_the_end_of_the_header(header: bytes) -> None:
    # A TLS ClientHello or an early command may share the header's segment.
    after = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"EHLO client.test\r\n\n\r\n"
    parsed, rest = await read_from_pair(header + after)
    assert rest == after
    assert parsed.version == (1 if header.startswith(b"PROXY") else 2)


async def test_reader_takes_a_header_that_arrives_in_pieces() -> None:
    header = v1("203.0.113.7")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        reading = asyncio.create_task(read_header(ours))
        for index in range(0, len(header), 7):
            theirs.sendall(header[index:index + 7])
            await asyncio.sleep(0)  # let the reader see each piece on its own
        theirs.sendall(b"EHLO x\r\n")
        async with asyncio.timeout(10):
            assert (await reading).source == ("203.0.113.7", 40000)
        assert ours.recv(100) == b"EHLO x\r\n"
    finally:
        ours.close()
        theirs.close()


async def test_every_truncation_of_a_valid_header_is_an_error() -> None:
    for header in (v1("203.0.113.7"), v1("2001:db8::7"), v2("203.0.113.7"), v2("2001:db8::7")):
        for cut in range(len(header)):
            with pytest.raises(ProxyError):
                await read_from_pair(header[:cut])


async def test_overlong_v1_and_oversize_v2_are_refused_without_reading_on() -> None:
    with pytest.raises(ProxyError, match="longer than 107"):
        await read_from_pair(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n")
    huge = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535)
    with pytest.raises(ProxyError, match="declares 65535 bytes"):
        await read_from_pair(huge + b"\0" * 100, close=False)


async def test_session_peer_is_the_header_address() -> None:
    from cluster.demo import bundled_examples
    from cluster.settings import load_settings
    from worker.policies import CONTINUE
    from worker.sessions import SessionRegistry
    from worker.smtp import GatewaySMTP

    class Handler:
        def connect(self, server: object) -> object:
            return CONTINUE

        def disconnect(self, server: object) -> None:
            pass

    ours, theirs = socket.socketpair()
    sessions = SessionRegistry()
    settings = load_settings(bundled_examples() / "sendguard.toml").server
    protocol = GatewaySMTP(Handler(), sessions=sessions,  # type: ignore[arg-type]
                           server_settings=lambda: settings,
                           trusted=lambda ip: ip == "203.0.113.7", hostname="x",
                           peer=("203.0.113.7", 4000), proxy="127.0.0.1")
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: protocol, ours)
    try:
        assert protocol.session is not None and protocol.session.peer == ("203.0.113.7", 4000)
        assert protocol.client is not None and protocol.client.ip == "203.0.113.7"
        assert protocol.client.trusted and len(sessions) == 1
    finally:
        transport.close()
        theirs.close()
        # The session's task ends when the transport has closed.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(protocol._handler_coroutine, 10)  # type: ignore[arg-type]


# -- a real worker behind the "balancer" --------------------------------------------

CONTEXT = ssl.create_default_context()
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with tempfile.TemporaryDirectory(prefix="sg-", dir="/tmp") as folder, \
            TestDNSServer() as dns:
        dns.add_mx("example.org", "mx.example.org", 10)
        dns.add_a("mx.example.org", "127.0.0.1")
        with running_gateway(Path(folder), dns,
                             server={"proxy_protocol": True, "proxy_networks": ["127.0.0.1/32"],
                                     "proxy_timeout": f"{PROXY_TIMEOUT:g}s"}) as gw:
            yield gw


def raw(gateway: Gateway, *, source: str = "127.0.0.1", implicit_tls: bool = False
        ) -> socket.socket:
    port = gateway.tls_port if implicit_tls else gateway.port
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def proxied(gateway: Gateway, header: bytes, *, implicit_tls: bool = False,
            login: str | None = "jan@kowalski.pl") -> smtplib.SMTP:
    """An SMTP client that writes ``header`` first, then TLS (implicit or STARTTLS) and AUTH."""
    sock: socket.socket = raw(gateway, implicit_tls=implicit_tls)
    sock.sendall(header)
    if implicit_tls:
        sock = CONTEXT.wrap_socket(sock)
    client = smtplib.SMTP(local_hostname="client.test", timeout=30)
    client.sock, client.file, client._host = sock, None, "127.0.0.1"  # type: ignore[attr-defined]
    code, banner = client.getreply()
    assert code == 220 and banner.startswith(b"mx.test ESMTP sendguard "), banner
    client.sid = banner.split()[-1].decode()  # type: ignore[attr-defined]
    client.ehlo()
    if not implicit_tls:
        client.starttls(context=CONTEXT)
        client.ehlo()
    if login:
        client.login(login, PASSWORD)
    return client


def wait_for_log(gateway: Gateway, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in gateway.log_lines():
            if match(line):
                return line
        time.sleep(0.05)
    raise AssertionError("no such log line")


def assert_closed_without_banner(sock: socket.socket) -> None:
    sock.settimeout(10)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        data = b""  # closed with our unread bytes still in its buffer
    assert data == b""
    sock.close()


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit-tls"])
def test_policies_see_the_header_address(gateway: Gateway, make_header: Callable[..., bytes],
                                         implicit_tls: bool) -> None:
    # The balancer (127.0.0.1) is in Poland; the client it names is in the US.
    client = proxied(gateway, make_header("127.0.0.66"), implicit_tls=implicit_tls)
    code, text = client.mail("jan@kowalski.pl")
    assert (code, text.decode()) == SENDER_REJECTED
    decision = wait_for_log(gateway, lambda line: line.get("sid") == client.sid
                            and line.get("stage") == "MAIL")
    assert decision["client_ip"] == "127.0.0.66" and decision["policy"] == "geoip"
    connect = wait_for_log(gateway, lambda line: line.get("sid") == client.sid
                           and line["event"] == "connect")
    assert connect["client_ip"] == "127.0.0.66" and connect["proxy"] == "127.0.0.1"
    assert connect["tls"] is implicit_tls
    client.quit()


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
def test_accepted_message_carries_the_header_address(gateway: Gateway,
                                                     make_header: Callable[..., bytes]) -> None:
    client = proxied(gateway, make_header("127.0.0.42"))  # DE: allowed for kowalski.pl
    code, text = gateway.send(client)
    assert code == 250, text
    record = find_record(gateway, text.rsplit(" ", 1)[1])
    assert record.client_ip == "127.0.0.42"
    assert record.message.startswith(b"Received: from client.test ([127.0.0.42])")
    client.quit()
    # nowak.pl allows the default PL only: the same address is refused for anna.
    client = proxied(gateway, make_header("127.0.0.42"), login="anna@nowak.pl")
    assert client.mail("anna@nowak.pl")[0] == 550
    client.quit()


def test_ipv4_mapped_and_ipv6_sources(gateway: Gateway) -> None:
    client = proxied(gateway, v2("::ffff:127.0.0.66"))  # an IPv4 client: US
    code, text = client.mail("jan@kowalski.pl")
    assert (code, text.decode()) == SENDER_REJECTED
    client.quit()
    client = proxied(gateway, v1("::1"))  # PL in the test database
    assert client.mail("jan@kowalski.pl")[0] == 250
    client.quit()


@pytest.mark.parametrize("header", [v2("203.0.113.9", command=0x0), b"PROXY UNKNOWN\r\n",
                                    v2(None)], ids=["v2-local", "v1-unknown", "v2-unspec"])
def test_health_checks_use_the_balancer_address(gateway: Gateway, header: bytes) -> None:
    client = proxied(gateway, header, login=None)
    connect = wait_for_log(gateway, lambda line: line.get("sid") == client.sid
                           and line["event"] == "connect")
    assert connect["client_ip"] == "127.0.0.1"
    client.quit()


def test_early_bytes_after_the_header_belong_to_smtp(gateway: Gateway) -> None:
    sock = raw(gateway)
    sock.sendall(v1("127.0.0.5") + b"EHLO client.test\r\n")  # one segment
    reply = b""
    while b"250 " not in reply:
        chunk = sock.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"220 mx.test ESMTP sendguard ")
    assert b"\r\n250-mx.test\r\n" in reply
    sock.close()


def test_implicit_tls_client_hello_in_the_header_segment(gateway: Gateway) -> None:
    # Header and ClientHello in one write, as a balancer may coalesce them.
    sock = raw(gateway, implicit_tls=True)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = CONTEXT.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock.sendall(v2("127.0.0.66") + outgoing.read())
    text, handshaken = b"", False
    while b"\r\n" not in text:
        try:
            if not handshaken:
                tls.do_handshake()
                handshaken = True
            text += tls.read(4096)
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    assert text.startswith(b"220 mx.test ESMTP sendguard ")
    sock.close()


def test_peer_outside_proxy_networks_is_refused(gateway: Gateway) -> None:
    sock = raw(gateway, source="127.0.0.2")
    sock.sendall(v1("127.0.0.5"))
    assert_closed_without_banner(sock)
    line = wait_for_log(gateway, lambda line: line["event"] == "proxy_refused"
                        and line.get("client_ip") == "127.0.0.2")
    assert line["reason"] == "not in server.proxy_networks" and line["level"] == "warning"


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit-tls"])
def test_silent_client_is_closed_at_the_timeout(gateway: Gateway, implicit_tls: bool) -> None:
    sock = raw(gateway, implicit_tls=implicit_tls)
    started = time.monotonic()
    assert_closed_without_banner(sock)
    assert PROXY_TIMEOUT * 0.9 <= time.monotonic() - started < PROXY_TIMEOUT + 8
    line = wait_for_log(gateway, lambda line: line["event"] == "proxy_refused"
                        and line["reason"].startswith("no PROXY header"))
    assert line["reason"] == f"no PROXY header within {PROXY_TIMEOUT:g}s"


MALFORMED = [
    b"EHLO client.test\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PROXY TCP4 127.0.0.66 127.0.0.1 40000\r\n",
    b"PROXY TCP4 127.0.0.66 127.0.0.1 40000 587\n",
    b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n",
    b"PROXY TCP4 127.0.0.66 127.0.0.1 40000 99999\r\n",
    V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535) + b"\0" * 12,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12,
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello without a header
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_header_closes_the_connection(gateway: Gateway, data: bytes) -> None:
    sock = raw(gateway)
    sock.sendall(data)
    assert_closed_without_banner(sock)
    wait_for_log(gateway, lambda line: line["event"] == "proxy_refused"
                 and line["reason"].startswith("bad PROXY header: "))


def test_fuzzed_headers_close_cleanly_and_the_worker_carries_on(gateway: Gateway) -> None:
    rng = random.Random(66)
    valid = [v1("127.0.0.66"), v1("::1"), v2("127.0.0.66"), v2("::1"), v2(None, command=0)]
    cases = [header[:cut] for header in valid for cut in range(0, len(header), 3)]
    cases += [rng.randbytes(rng.randrange(1, 200)) for _ in range(40)]
    for _ in range(40):
        mutated = bytearray(rng.choice(valid))
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cases.append(bytes(mutated))
    refused_before = sum(line["event"] == "proxy_refused" for line in gateway.log_lines())
    # All at once: a case the worker waits on ends at the header timeout, not one by one.
    answers = send_all_and_wait(gateway, cases)
    for data, answer in zip(cases, answers, strict=True):
        # A mutation may still be a valid header (a changed port digit, say).
        assert answer == b"" or answer.startswith(b"220 mx.test ESMTP sendguard "), data
    closed = answers.count(b"")
    assert closed > len(cases) * 3 // 4
    # One log line per refused connection.
    wait_for_log(gateway, lambda line: sum(line["event"] == "proxy_refused"
                                           for line in gateway.log_lines())
                 - refused_before >= closed)
    refused = sum(line["event"] == "proxy_refused" for line in gateway.log_lines())
    assert refused - refused_before == closed
    client = proxied(gateway, v2("127.0.0.5"))
    assert gateway.send(client)[0] == 250
    client.quit()


def send_all_and_wait(gateway: Gateway, cases: list[bytes]) -> list[bytes]:
    """Each case on its own connection; the first bytes the worker answered, b"" if it closed."""
    sockets = [raw(gateway) for _ in cases]
    answers: list[bytes | None] = [None] * len(cases)
    with selectors.DefaultSelector() as selector:
        for index, (sock, data) in enumerate(zip(sockets, cases, strict=True)):
            try:
                sock.sendall(data)
            except OSError:
                answers[index] = b""  # already closed on us
                continue
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + PROXY_TIMEOUT + 15
        while None in answers:
            assert time.monotonic() < deadline, "a connection neither answered nor closed"
            for key, _ in selector.select(timeout=1):
                try:
                    answers[key.data] = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except ConnectionResetError:
                    answers[key.data] = b""
                except BlockingIOError:
                    continue
                selector.unregister(key.fileobj)
    for sock in sockets:
        sock.close()
    return [answer or b"" for answer in answers]


def test_drain_closes_connections_still_sending_their_header(short_tmp: Path, dns) -> None:
    gateway = Gateway(short_tmp, dns, server={"proxy_protocol": True,
                                              "proxy_networks": ["127.0.0.1/32"],
                                              "proxy_timeout": "60s"}).start()
    sock = raw(gateway)
    sock.sendall(b"PROXY TCP4 ")
    client = proxied(gateway, v1("127.0.0.5"))
    started = time.monotonic()
    gateway.stop()
    assert time.monotonic() - started < 30
    assert_closed_without_banner(sock)
    code, text = client.getreply()
    assert code == 421 and text.endswith(b" service shutting down")
    client.close()
