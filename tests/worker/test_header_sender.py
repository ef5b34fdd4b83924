"""SPEC §3.8 header sender alignment, over real SMTP: every case of the header From:/Sender:."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import Gateway, running_gateway
from test_policies_e2e import find_record

BODY = b"Subject: Invoice\r\nTo: <someone@example.org>\r\n\r\nThe invoice we discussed.\r\n"


def message(*headers: str) -> bytes:
    return "".join(f"{h}\r\n" for h in headers).encode() + BODY


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns) as gw:
        yield gw


@pytest.mark.parametrize("headers", [
    ["From: Jan <jan@kowalski.pl>"],
    ["From: jan@kowalski.com.pl"],                                  # an alias
    ["From: =?utf-8?q?Jan?= <JAN@Kowalski.PL>"],                      # other case
    ["From: Jan <jan.kowalski@gmail.com>"],                           # the alternate sender
    ["From: Jan <Jan.Kowalski@GMAIL.com>"],                           # ... in other case
    ['From: "boss@bank.example" <jan@kowalski.pl>'],                  # a name that looks like one
    ["From: anna@kowalski.pl, jan@kowalski.pl"],                      # two of the domain's
    ["From: jan@kowalski.pl", "Sender: office@kowalski.com.pl"],
    ["From: jan@xn--za-6ja4f8n1l.pl"],                                # the IDN alias, A-label
])
def test_aligned_headers_pass(gateway: Gateway, headers: list[str]) -> None:
    client = gateway.login()
    code, text = gateway.send(client, body=message(*headers))
    assert code == 250, text
    client.quit()


@pytest.mark.parametrize(("headers", "refused"), [
    (["From: Boss <boss@bank.example>"], "boss@bank.example"),
    (['From: "jan@kowalski.pl" <boss@bank.example>'], "boss@bank.example"),   # name ignored
    (["From: jan@kowalski.pl, boss@bank.example"], "boss@bank.example"),      # two addresses
    (["From: jan@kowalski.pl", "Sender: boss@bank.example"], "boss@bank.example"),
    (["From: jan@mail.kowalski.pl"], "jan@mail.kowalski.pl"),                 # no subdomains
    (["From: jan@nowak.pl"], "jan@nowak.pl"),                                 # another tenant
    (["From: Jan Kowalski"], "Jan"),                                          # no address at all
    (["From: undisclosed-recipients:;"], ""),
])
def test_misaligned_headers_are_refused(gateway: Gateway, headers: list[str],
                                        refused: str) -> None:
    client = gateway.login()
    code, text = gateway.send(client, body=message(*headers))
    assert (code, text) == (550, f"5.1.0 <{refused}> sender rejected")
    client.quit()
    line = [d for d in gateway.log_lines() if d.get("stage") == "DATA"][-1]
    assert (line["policy"], line["verdict"]) == ("from_alignment", "reject")


def test_a_message_without_from_gets_the_envelope_sender(gateway: Gateway) -> None:
    client = gateway.login()
    code, text = gateway.send(client, "jan@kowalski.com.pl", body=BODY)
    assert code == 250, text
    client.quit()
    stored = find_record(gateway, text.rsplit(" ", 1)[1]).message
    head = stored.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nFrom: <jan@kowalski.com.pl>\r\n" in head
    # Received names the session, never the login.
    assert b"authenticated" not in head and b"jan@kowalski.pl" not in head


@pytest.mark.parametrize("mode", ["log", "off"])
def test_log_and_off_let_the_message_through(short_tmp: Path, dns: Any, mode: str) -> None:
    with running_gateway(short_tmp, dns, policy={"from_alignment": mode}) as gateway:
        client = gateway.login()
        code, text = gateway.send(client, body=message("From: Boss <boss@bank.example>"))
        assert code == 250, text
        client.quit()
        line = [d for d in gateway.log_lines() if d.get("stage") == "DATA"][-1]
        if mode == "log":
            assert line["from_alignment"] == (
                "would refuse: 550 5.1.0 <boss@bank.example> sender rejected")
        else:
            assert "from_alignment" not in line


SIMPLE_AND_NOT = [
    "Jan <jan@kowalski.pl>", "jan@kowalski.pl", "<jan@kowalski.pl>", '"Jan K." <jan@kowalski.pl>',
    "=?utf-8?q?Jan?= <JAN@Kowalski.PL>", '"boss@bank.example" <jan@kowalski.pl>',
    "Jan K. <jan@x.pl>", "jan@kowalski.pl, evil@x.example", "boss@bank.example <jan@kowalski.pl>",
    '"jan@kowalski.pl" <boss@bank.example>', "Jan Kowalski", "undisclosed:;",
    "<jan@kowalski.pl> (comment)", "jan.k+tag@sub.kowalski.pl", "Jan <jan@zażółć.pl>",
    '"a\\"b" <x@y.pl>', "a@b@c", "<a@b", "Jan <jan@kowalski.pl>, ", " Jan  <jan@kowalski.pl> ",
    '"" <jan@x.pl>', "x@y.pl\udc80", "Jan <jan@kowalski.pl", "a <b> <c@d.pl>", "(x) a@b.pl",
    "Jan <jan@[127.0.0.1]>", "jan@kowalski.pl;", "Jan: <jan@kowalski.pl>", "<@route:jan@x.pl>",
]


@pytest.mark.parametrize("value", SIMPLE_AND_NOT)
def test_the_quick_parse_agrees_with_the_email_package(value: str) -> None:
    import email.utils

    from worker.policies.header_sender import addresses_of

    expected = [address for _, address in email.utils.getaddresses([value])]
    assert addresses_of([value]) == expected
