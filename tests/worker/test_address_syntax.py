"""SPEC §2: addresses no policy should see get ``501 5.1.3 {sid} bad address syntax``.

Control characters, bytes that are not UTF-8 and addresses that do not
parse, at MAIL and at RCPT, sent as raw bytes; the decision lines stay one
line of JSON each, whatever the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import PASSWORD, Gateway, Raw, plain_auth, running_gateway
from test_policies_e2e import find_record

BAD = [
    b"<jan\x01@kowalski.pl>",           # a control character
    b"<jan@kowalski.pl\x7f>",           # DEL
    b'<"ja\x00n"@kowalski.pl>',         # NUL inside a quoted local part
    b"<jan\xff@kowalski.pl>",           # not UTF-8
    b"<jan@kowalski.\xc3(>",            # broken UTF-8 sequence in the domain
    b"<jan@kowalski@pl>",               # does not parse
    b"<jan>",                           # no domain
    b"<@kowalski.pl>",                  # no local part
    b"<jan@kowalski..pl>",              # not a domain name
    b"<jan@[not-an-ip]>",               # not an address literal
    b"<jan@kowal ski.pl>",              # a space inside: the parser would stop at it
    b"<jan@[127.0.0.1] x>",
    b"<jan@kowalski.pl",                # never closed
    b"<jan@kowalski.pl SIZE=10",
]


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, server={"require_tls_for_auth": False,
                                                 "max_errors": 100}) as gw:
        yield gw


def logged_in(gateway: Gateway) -> Raw:
    client = Raw(gateway)
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[:3] == "235"
    return client


def test_bad_senders(gateway: Gateway) -> None:
    client = logged_in(gateway)
    for address in BAD:
        assert client.command(b"MAIL FROM:" + address) == (
            f"501 5.1.3 {client.sid} bad address syntax"), address
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    client.command("QUIT")
    client.close()


def test_bad_recipients(gateway: Gateway) -> None:
    client = logged_in(gateway)
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    for address in [*BAD, b"<>"]:
        assert client.command(b"RCPT TO:" + address) == (
            f"501 5.1.3 {client.sid} bad address syntax"), address
    assert client.command("RCPT TO:<someone@example.org>")[:3] == "250"
    # The transaction is whole: nothing bad reached the envelope.
    assert client.command("DATA")[:3] == "354"
    client.send(b"From: jan@kowalski.pl\r\n\r\nhello\r\n.\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    client.command("QUIT")
    client.close()


def test_log_lines_stay_one_line_of_json_whatever_the_bytes(gateway: Gateway) -> None:
    client = logged_in(gateway)
    assert client.command(b"MAIL FROM:<x\xff\xfe\r@kowalski.pl>")[:3] == "501"
    assert client.command(b"VRFY <\xff\x00\x1b[31m>")[:3] == "252"
    assert client.command(b"\xff\xfe BOGUS \x00")[:3] == "500"
    assert client.command(b"HELO \xff\x00\x1b")[:3] == "250"
    assert client.command(b"MAIL FROM:<jan@kowalski.pl> X-\xff=\x01")[:3] == "501"
    client.command("QUIT")
    client.close()
    assert gateway.settings.log_file is not None
    raw = gateway.settings.log_file.read_bytes()
    raw.decode("utf-8")  # the file is UTF-8 throughout
    lines = [json.loads(line) for line in raw.splitlines()]
    refused = [line for line in lines if line.get("sid") == client.sid
               and line.get("verdict") not in (None, "accept")]
    assert len(refused) == 3, refused  # MAIL, BOGUS, MAIL
    assert all(line["reply"].count("\n") == 0 for line in refused)


def test_a_hello_name_that_is_not_text_still_lets_mail_through(gateway: Gateway) -> None:
    # The name goes into the spool record, the scanner's request and our Received: line.
    client = Raw(gateway)
    client.command(b"EHLO evil\x01\xff\xc3(host)\x1b[31m")
    assert client.command("AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[:3] == "235"
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    assert client.command("RCPT TO:<someone@example.org>")[:3] == "250"
    assert client.command("DATA")[:3] == "354"
    client.send(b"From: jan@kowalski.pl\r\n\r\nhello\r\n.\r\n")
    done = client.reply()
    assert done.startswith("250 2.0.0 Ok: queued as "), done
    record = find_record(gateway, done.rsplit(" ", 1)[1])
    assert record.helo == "evil???(host)?[31m"
    assert record.message.startswith(b"Received: from evil???(host)?[31m ")
    client.command("QUIT")
    client.close()
