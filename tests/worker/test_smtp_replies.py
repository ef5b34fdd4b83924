"""SPEC §2 replies of the SMTP face, over real SMTP on loopback: banner, AUTH, SIZE, RCPT count."""

from __future__ import annotations

import base64
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import MESSAGE, PASSWORD, Gateway, plain_auth, reply, running_gateway

SID = r"[A-Za-z0-9]{22}"


@pytest.fixture
def gateway(short_tmp: Path, dns) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, server={"max_recipients": 2, "max_message_size": 4096},
                         auth={"max_failures": 3, "failure_window": "2s"}) as gw:
        yield gw


def sid_of(client: smtplib.SMTP) -> str:
    return client.sid  # type: ignore[attr-defined,no-any-return]


def connect(gateway: Gateway, source: str = "127.0.0.5", **kwargs) -> smtplib.SMTP:
    """A client that remembers the session id from the banner."""
    client = smtplib.SMTP(local_hostname="client.test", source_address=(source, 0), timeout=30)
    client._host = "127.0.0.1"  # starttls() needs it; connect() does not set it
    code, banner = client.connect("127.0.0.1", gateway.port)
    assert code == 220
    match = re.fullmatch(rf"mx\.test ESMTP sendguard ({SID})", banner.decode())
    assert match, banner
    client.sid = match.group(1)  # type: ignore[attr-defined]
    client.ehlo()
    if kwargs.get("starttls", True):
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.starttls(context=context)
        client.ehlo()
    return client


def test_banner_has_a_fresh_session_id(gateway: Gateway) -> None:
    first, second = connect(gateway), connect(gateway)
    assert sid_of(first) != sid_of(second)
    first.quit()
    second.quit()


def test_ehlo_offers_size_8bitmime_smtputf8_starttls_then_auth(gateway: Gateway) -> None:
    client = connect(gateway, starttls=False)
    assert client.has_extn("starttls") and client.has_extn("8bitmime")
    assert client.has_extn("smtputf8") and client.esmtp_features["size"] == "4096"
    assert not client.has_extn("auth")
    client.quit()
    client = connect(gateway)
    assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
    client.quit()


def test_mail_before_auth(gateway: Gateway) -> None:
    client = connect(gateway)
    assert reply(client, "MAIL FROM:<jan@kowalski.pl>") == (
        550, f"5.1.0 {sid_of(client)} authentication failed")
    assert reply(client, "RCPT TO:<a@example.org>") == (
        550, f"5.1.0 {sid_of(client)} authentication failed")
    # The session stays open: log in and send.
    client.login("jan@kowalski.pl", PASSWORD)
    assert gateway.send(client)[0] == 250
    client.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_wrong_password(gateway: Gateway, mechanism: str) -> None:
    client = connect(gateway)
    client.user, client.password = "jan@kowalski.pl", "wrong"
    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        client.auth(mechanism, method, initial_response_ok=True)
    assert (caught.value.smtp_code, caught.value.smtp_error.decode()) == (
        535, f"5.7.8 {sid_of(client)} authentication failed")
    client.quit()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_right_password(gateway: Gateway, mechanism: str) -> None:
    client = connect(gateway)
    client.user, client.password = "jan@kowalski.pl", PASSWORD
    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    code, _ = client.auth(mechanism, method, initial_response_ok=False)
    assert code == 235
    assert gateway.send(client)[0] == 250
    client.quit()


def test_unknown_user_gets_the_same_reply(gateway: Gateway) -> None:
    client = connect(gateway)
    assert reply(client, "AUTH PLAIN " + plain_auth("nobody@kowalski.pl", PASSWORD)) == (
        535, f"5.7.8 {sid_of(client)} authentication failed")
    client.quit()


def test_auth_on_plain_connection_needs_tls(gateway: Gateway) -> None:
    client = connect(gateway, starttls=False)
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD)) == (
        538, "5.7.11 Encryption required for requested authentication mechanism")
    client.quit()


def test_implicit_tls_listener(gateway: Gateway) -> None:
    client = gateway.login(implicit_tls=True)
    assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
    assert not client.has_extn("starttls")
    code, text = gateway.send(client)
    assert code == 250 and re.fullmatch(r"2\.0\.0 Ok: queued as [A-Za-z0-9]{1,32}", text)
    client.quit()


def test_brute_force_throttle(gateway: Gateway) -> None:
    attacker = "127.0.0.21"
    client = connect(gateway, attacker)
    sid = sid_of(client)
    for _ in range(3):
        assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess")) == (
            535, f"5.7.8 {sid} authentication failed")
    throttled = (454, f"4.7.0 {sid} too many authentication failures, try later")
    # Every AUTH now gets 454, whatever the user, even the right password.
    assert reply(client, "AUTH PLAIN " + plain_auth("anna@nowak.pl", PASSWORD)) == throttled
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD)) == throttled
    # 538 comes before 454.
    plain = connect(gateway, attacker, starttls=False)
    assert reply(plain, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[0] == 538
    # Another address is not affected.
    assert gateway.login("127.0.0.22").quit()[0] == 221
    # The 454s were not failures: once the 2 s window passes the address may log in.
    client.quit()
    plain.quit()
    import time

    end = time.monotonic() + 30.0
    while True:
        # A new session each time: every 454 is a refused command of its session.
        client = connect(gateway, attacker)
        code, _ = reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))
        client.quit()
        if code == 235:
            break
        assert code == 454 and time.monotonic() < end
        time.sleep(0.2)


def test_declared_size_over_the_limit_comes_before_auth(gateway: Gateway) -> None:
    client = connect(gateway)
    expected = (552, "5.3.4 Message size exceeds fixed maximum message size")
    assert reply(client, "MAIL FROM:<jan@kowalski.pl> SIZE=5000") == expected
    client.login("jan@kowalski.pl", PASSWORD)
    assert reply(client, "MAIL FROM:<jan@kowalski.pl> SIZE=5000") == expected
    assert reply(client, "MAIL FROM:<jan@kowalski.pl> SIZE=100")[0] == 250
    client.quit()


def test_message_over_the_limit_at_end_of_data(gateway: Gateway) -> None:
    client = gateway.login()
    code, text = gateway.send(client, body=MESSAGE + (b"y" * 70 + b"\r\n") * 80)
    assert (code, text) == (552, "5.3.4 Message size exceeds fixed maximum message size")
    assert gateway.send(client)[0] == 250
    client.quit()


def test_too_many_recipients(gateway: Gateway) -> None:
    client = gateway.login()
    assert client.mail("jan@kowalski.pl")[0] == 250
    assert client.rcpt("a@example.org")[0] == 250
    assert client.rcpt("b@example.org")[0] == 250
    code, text = client.rcpt("c@example.org")
    assert (code, text.decode()) == (452, "4.5.3 Too many recipients")
    assert client.data(MESSAGE)[0] == 250
    client.quit()


def test_decisions_are_logged_with_the_session_id(gateway: Gateway) -> None:
    client = connect(gateway, "127.0.0.23")
    sid = sid_of(client)
    client.login("jan@kowalski.pl", PASSWORD)
    assert client.mail("stranger@elsewhere.test")[0] == 550
    client.quit()
    import time

    end = time.monotonic() + 30
    while True:
        lines = [line for line in gateway.log_lines() if line.get("sid") == sid]
        refused = [line for line in lines if line.get("stage") == "MAIL"]
        if refused or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert refused, lines
    line = refused[0]
    assert line["event"] == "decision"
    assert line["client_ip"] == "127.0.0.23"
    assert line["account"] == "jan@kowalski.pl"
    assert line["policy"] == "sender_domain"
    assert line["verdict"] == "reject"
    assert line["reply"] == "550 5.1.0 <stranger@elsewhere.test> sender rejected"
    assert list(line)[:2] == ["ts", "level"]


def test_half_closed_client_is_let_go(gateway: Gateway) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        assert sock.recv(512).startswith(b"220 ")
        sock.shutdown(socket.SHUT_WR)
        # The server closes its side instead of holding the connection until its idle timeout.
        assert sock.recv(512) == b""


def test_refusals_of_the_protocol_layer_are_one_decision_line_each(gateway: Gateway) -> None:
    """What the session refuses itself (bad SASL answers, DATA out of sequence, STARTTLS
    with an argument) goes through the engine like a policy's refusal: one line each."""
    client = connect(gateway, "127.0.0.24", starttls=False)
    sid = sid_of(client)
    assert reply(client, "STARTTLS now") == (501, "Syntax: STARTTLS")
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
    assert reply(client, "AUTH PLAIN %%%") == (501, "5.5.2 Can't decode base64")
    no_nuls = base64.b64encode(b"jan@kowalski.pl correct horse").decode()
    assert reply(client, f"AUTH PLAIN {no_nuls}") == (501, "5.5.2 Can't split auth value")
    client.login("jan@kowalski.pl", PASSWORD)
    assert client.mail("jan@kowalski.pl")[0] == 250
    assert reply(client, "DATA") == (503, "Error: need RCPT command")
    client.quit()
    expected = [("STARTTLS", "syntax", "501 Syntax: STARTTLS"),
                ("AUTH", "syntax", "501 5.5.2 Can't decode base64"),
                ("AUTH", "syntax", "501 5.5.2 Can't split auth value"),
                ("DATA", "sequence", "503 Error: need RCPT command")]
    refusals = [(line["stage"], line["policy"], line["reply"])
                for line in gateway.log_lines()
                if line.get("sid") == sid and line.get("event") == "decision"
                and line["verdict"] != "accept"]
    assert refusals == expected
