"""Sessions that end (SPEC §2): connection cap, command timeout, session age, error limit.

Real sockets against a real worker, with small settings so each test takes
a few seconds at most.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import MESSAGE, PASSWORD, Gateway, Raw, plain_auth, running_gateway

SID = r"[A-Za-z0-9]{22}"


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns,
                         server={"max_connections_per_ip": 2, "command_timeout": "1s",
                                 "max_session_time": "3s", "max_errors": 3,
                                 "require_tls_for_auth": False,
                                 "trusted_networks": ["127.0.0.200/32"]}) as gw:
        yield gw


def decisions(gateway: Gateway, sid: str) -> list[dict[str, Any]]:
    return [line for line in gateway.log_lines()
            if line.get("sid") == sid and line.get("event") == "decision"]


def test_connections_per_address_are_capped(gateway: Gateway) -> None:
    first, second = Raw(gateway, "127.0.0.61"), Raw(gateway, "127.0.0.61")
    assert first.banner.startswith("220 ") and second.banner.startswith("220 ")
    third = Raw(gateway, "127.0.0.61")
    match = re.fullmatch(rf"421 4\.7\.0 ({SID}) too many connections from your address, "
                         r"try later", third.banner)
    assert match, third.banner
    assert third.closed()
    [line] = decisions(gateway, match.group(1))
    assert (line["stage"], line["policy"], line["verdict"]) == (
        "CONNECT", "connection_cap", "tempfail")
    # Another address, and a trusted one, are not affected.
    other = Raw(gateway, "127.0.0.62")
    assert other.banner.startswith("220 ")
    trusted = [Raw(gateway, "127.0.0.200") for _ in range(3)]
    assert all(t.banner.startswith("220 ") for t in trusted)
    # A connection that ends gives its place back.
    first.command("QUIT")
    assert first.closed()
    deadline = time.monotonic() + 10
    while True:
        again = Raw(gateway, "127.0.0.61")
        if again.banner.startswith("220 "):
            break
        assert time.monotonic() < deadline
        again.close()
        time.sleep(0.05)
    for client in (first, second, third, other, again, *trusted):
        client.close()


def test_no_command_within_the_timeout_ends_the_session(gateway: Gateway) -> None:
    client = Raw(gateway)
    assert client.command("EHLO client.test").startswith("250 ")
    started = time.monotonic()
    assert client.reply() == f"421 4.4.2 {client.sid} timeout, closing connection"
    assert 0.8 < time.monotonic() - started < 5
    assert client.closed()
    [line] = decisions(gateway, client.sid)
    assert (line["policy"], line["verdict"]) == ("command_timeout", "tempfail")
    client.close()


def test_a_message_arriving_slowly_is_not_idle(gateway: Gateway) -> None:
    client = Raw(gateway)
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[:3] == "235"
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    assert client.command("RCPT TO:<someone@example.org>")[:3] == "250"
    assert client.command("DATA")[:3] == "354"
    for line in MESSAGE.split(b"\r\n")[:-1]:  # 1.5 s in all, more than the 1 s timeout
        client.send(line + b"\r\n")
        time.sleep(0.3)
    client.send(b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    client.command("QUIT")
    client.close()


def test_a_busy_session_still_ends_at_max_session_time(gateway: Gateway) -> None:
    client = Raw(gateway)
    started = time.monotonic()
    while True:
        reply = client.command("NOOP")  # never idle for long
        if not reply.startswith("250"):
            break
        assert time.monotonic() - started < 10
        time.sleep(0.2)
    assert reply == f"421 4.4.2 {client.sid} timeout, closing connection"
    assert 2.5 < time.monotonic() - started < 6
    assert client.closed()
    assert decisions(gateway, client.sid)[-1]["policy"] == "max_session_time"
    client.close()


def test_too_many_errors_end_the_session(gateway: Gateway) -> None:
    client = Raw(gateway)
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[:3] == "235"
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    assert client.command("RCPT TO:<a@no-mail.test>")[:3] == "550"
    assert client.command("RCPT TO:<someone@example.org>")[:3] == "250"
    assert client.command("DATA")[:3] == "354"
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[:3] == "250"  # an accepted message starts the count again
    assert client.command("BOGUS")[:3] == "500"
    assert client.command("MAIL FROM:<stranger@elsewhere.test>")[:3] == "550"
    assert client.command("")[:3] == "500"
    # Three refused commands since the last accepted message: the next one ends it.
    assert client.command("NOOP") == f"421 4.7.0 {client.sid} too many errors, closing connection"
    assert client.closed()
    lines = decisions(gateway, client.sid)
    assert [line["policy"] for line in lines if line["verdict"] != "accept"] == [
        "recipient_domain", "syntax", "sender_domain", "syntax", "max_errors"]
    client.close()


def test_every_refusal_is_one_decision_line(gateway: Gateway) -> None:
    client = Raw(gateway)
    replies = [client.command(line) for line in (
        "MAIL FROM:<jan@kowalski.pl>",           # before EHLO: 503
        "EHLO client.test",
        "MAIL FROM:<jan@kowalski.pl> SIZE=99999999999",  # 552 before AUTH
    )]
    assert replies[0].startswith("503") and replies[2].startswith("552 5.3.4")
    client.command("QUIT")
    lines = decisions(gateway, client.sid)
    assert [(line["stage"], line["policy"], line["reply"]) for line in lines] == [
        ("MAIL", "sequence", replies[0]), ("MAIL", "size", replies[2])]
    client.close()


def test_new_limits_apply_to_open_sessions_after_a_reload(short_tmp: Path, dns: Any) -> None:
    import dataclasses

    from cluster.settings import load_settings

    with running_gateway(short_tmp, dns, server={"command_timeout": "1h"}) as gateway:
        client = Raw(gateway)
        assert client.command("EHLO client.test").startswith("250 ")
        # What a SIGHUP does in the cluster: a new snapshot swapped in by reference.
        text = gateway.config_path.read_text().replace('command_timeout = "1h"',
                                                       'command_timeout = "1s"')
        gateway.config_path.write_text(text)
        settings = load_settings(gateway.config_path)
        source = gateway.parts.source
        gateway.call(lambda: setattr(source, "_snapshot",
                                     dataclasses.replace(source.current(), settings=settings)))
        assert client.command("NOOP").startswith("250")  # the next command takes it
        started = time.monotonic()
        assert client.reply() == f"421 4.4.2 {client.sid} timeout, closing connection"
        assert time.monotonic() - started < 10
        client.close()


def test_ipv6_clients_are_capped_per_64(short_tmp: Path, dns: Any) -> None:
    # Loopback has one IPv6 address: a PROXY header names the clients instead.
    with running_gateway(short_tmp, dns, server={"max_connections_per_ip": 2,
                                                 "proxy_protocol": True,
                                                 "proxy_networks": ["127.0.0.1/32"]}) as gw:
        def proxied(source: str) -> Raw:
            sock = socket.create_connection(("127.0.0.1", gw.port), 30)
            sock.sendall(f"PROXY TCP6 {source} 2001:db8::25 40000 587\r\n".encode())
            client = Raw.__new__(Raw)
            client.sock, client.lines = sock, sock.makefile("rb")
            client.banner = client.line()
            return client

        same_64 = [proxied(f"2001:db8:1:2::{n}") for n in ("1", "beef")]
        assert all(c.banner.startswith("220 ") for c in same_64), (
            [c.banner for c in same_64], gw.settings.log_file.read_text())
        third = proxied("2001:db8:1:2:ffff:ffff:ffff:ffff")
        assert re.fullmatch(rf"421 4\.7\.0 {SID} too many connections from your address, "
                            r"try later", third.banner), third.banner
        assert third.closed()
        other_64 = proxied("2001:db8:1:3::1")
        assert other_64.banner.startswith("220 ")
        for client in (*same_64, third, other_64):
            client.close()


def test_commands_that_move_no_mail_have_a_budget_per_session(short_tmp: Path,
                                                               dns: Any) -> None:
    with running_gateway(short_tmp, dns) as gw:
        client = Raw(gw)
        # RSET moves mail along (one per message): a busy session sends many.
        client.send(b"RSET\r\n" * 300)
        assert [client.reply() for _ in range(300)] == ["250 OK"] * 300
        client.send(b"NOOP\r\n" * 101)
        replies = [client.reply() for _ in range(101)]
        assert replies[:100] == ["250 OK"] * 100
        assert replies[100] == "421 4.7.0 NOOP sent too many times"
        assert client.closed()
        [line] = [line for line in decisions(gw, client.sid) if line["stage"] == "NOOP"]
        assert (line["policy"], line["verdict"]) == ("call_limit", "tempfail")
        client.close()
