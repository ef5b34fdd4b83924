"""SPEC §3.1: a session's login is checked again at each MAIL.

The tenant file is rewritten while a session is open: a removed account or
a changed password ends that session's login (550 5.1.0 ... authentication
failed), and the session can log in again with what is valid now.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import PASSWORD, TENANTS, Gateway, plain_auth, reply, running_gateway


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns) as gw:
        yield gw


def logged_in_sid(gateway: Gateway) -> str:
    """The session of the last successful AUTH."""
    return [d["sid"] for d in gateway.log_lines()
            if d.get("stage") == "AUTH" and d.get("verdict") == "accept"][-1]


def rewrite_tenants(gateway: Gateway, text: str) -> None:
    gateway.tenants_path.write_text(text)
    assert gateway.reload(), "the new tenant file was not taken"


def test_a_removed_account_stops_sending_in_an_open_session(gateway: Gateway) -> None:
    client = gateway.login()
    sid = logged_in_sid(gateway)
    assert gateway.send(client)[0] == 250
    rewrite_tenants(gateway, TENANTS.replace('[accounts."jan@kowalski.pl"]\n'
                                             'password = "{PLAIN}correct horse"\n'
                                             'alternate_sender = "jan.kowalski@gmail.com"\n',
                                             ""))
    refused = (550, f"5.1.0 {sid} authentication failed")
    assert reply(client, "MAIL FROM:<jan@kowalski.pl>") == refused
    # No longer logged in: RCPT and a second MAIL get the same, and AUTH is open again.
    assert reply(client, "RCPT TO:<a@example.org>") == refused
    assert reply(client, "MAIL FROM:<jan@kowalski.pl>") == refused
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[0] == 535
    assert reply(client, "AUTH PLAIN " + plain_auth("anna@nowak.pl", PASSWORD))[0] == 235
    assert gateway.send(client, "anna@nowak.pl")[0] == 250
    client.quit()
    line = [d for d in gateway.log_lines() if d.get("sid") == sid and d.get("stage") == "MAIL"
            and d.get("verdict") == "reject"][0]
    assert (line["policy"], line["detail"], line["account"]) == (
        "auth", "account removed", "jan@kowalski.pl")


def test_a_changed_password_ends_the_login(gateway: Gateway) -> None:
    client = gateway.login()
    sid = logged_in_sid(gateway)
    assert gateway.send(client)[0] == 250
    rewrite_tenants(gateway, TENANTS.replace('"{PLAIN}correct horse"\nalternate_sender',
                                             '"{PLAIN}battery staple"\nalternate_sender'))
    assert reply(client, "MAIL FROM:<jan@kowalski.pl>") == (
        550, f"5.1.0 {sid} authentication failed")
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[0] == 535
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "battery staple"))[0] == 235
    assert gateway.send(client)[0] == 250
    client.quit()
    details = [d["detail"] for d in gateway.log_lines()
               if d.get("sid") == sid and d.get("stage") == "MAIL" and d.get("verdict") == "reject"]
    assert details == ["password changed"]


def test_other_changes_keep_the_login_and_take_effect(gateway: Gateway) -> None:
    client = gateway.login()
    assert client.mail("jan@kowalski.com.pl")[0] == 250
    client.rset()
    # The alias is withdrawn; the account and its password stay.
    rewrite_tenants(gateway, TENANTS.replace('aliases = ["kowalski.com.pl", "zażółć.pl"]',
                                             'aliases = ["zażółć.pl"]'))
    code, text = client.mail("jan@kowalski.com.pl")
    assert (code, text.decode()) == (550, "5.1.0 <jan@kowalski.com.pl> sender rejected")
    assert gateway.send(client)[0] == 250
    client.quit()
