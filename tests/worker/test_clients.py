"""Real clients against the gateway, and what reaches the next hop byte for byte.

The clients people submit with: Python's smtplib (str and bytes messages,
SMTPUTF8), aiosmtplib, and swaks (installed by .ci/services.sh; skipped
only on a developer's machine without it, a failure under CI). Each runs
over STARTTLS and over implicit TLS, with AUTH PLAIN and LOGIN, and sends
8-bit text, a line far over 998 octets, a line that starts with a dot and,
where the client lets it through, bare LF line ends. The gateway delivers
to a real aiosmtpd sink in smarthost mode.

What the sink gets is the client's message with the gateway's trace
headers on top, CRLF line ends, and the long line broken with CRLF SPACE
(it has no whitespace to fold at): removing exactly those CRLF SPACEs must
give back the client's message, byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path

import aiosmtplib
import pytest
from gateway import PASSWORD, Gateway, running_gateway
from mailsink import Delivered, MailSink

USER = "jan@kowalski.pl"
TRANSPORTS = ["starttls", "implicit-tls"]
MECHANISMS = ["PLAIN", "LOGIN"]
LONG = "ABCDEFGH" * 500  # 4,000 octets, nothing to fold at


@pytest.fixture
def sink() -> Iterator[MailSink]:
    with MailSink() as running:
        yield running


@pytest.fixture
def gateway(short_tmp: Path, dns, sink: MailSink) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, delivery={"mode": "smarthost",
                                                   "smarthost": f"127.0.0.1:{sink.port}"}) as gw:
        yield gw


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(marker: str, *, eol: str = "\r\n", text: str = "Zażółć gęślą jaźń.") -> str:
    """A message whose first header names the test, so its delivery can be found."""
    lines = [f"X-Client-Test: {marker}", "From: Jan <jan@kowalski.pl>", "To: <a@example.org>",
             f"Subject: {marker}", f"Message-ID: <{marker}@kowalski.pl>",
             "Date: Thu, 26 Nov 2026 10:00:00 +0100", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "",
             text, LONG, ".a line that starts with a dot", "..and one with two", "last line"]
    return eol.join(lines) + eol


def delivered(sink: MailSink, marker: str, timeout: float = 30.0) -> Delivered:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in sink.messages if f"X-Client-Test: {marker}\r\n".encode() in m.content]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{marker} never reached the sink within {timeout:g} s")


def assert_same(received: Delivered, sent: bytes) -> None:
    """``sent`` (CRLF line ends) arrived byte for byte, below the gateway's trace headers."""
    content = received.content
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None, "a bare CR or LF was delivered"
    assert max(map(len, content.split(b"\r\n"))) <= 998
    head, _, client_part = content.partition(b"X-Client-Test: ")
    assert head.startswith(b"Received: from ") and b"\r\nX-Spam-Scan: " in head
    assert (b"X-Client-Test: " + client_part).replace(b"\r\n ", b"") == sent


# -- smtplib ----------------------------------------------------------------------------


def smtplib_session(gateway: Gateway, transport: str, mechanism: str) -> smtplib.SMTP:
    client = gateway.connect(implicit_tls=transport == "implicit-tls")
    client.user, client.password = USER, PASSWORD
    code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    assert code == 235, text
    return client


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_smtplib_with_a_str_message(gateway: Gateway, sink: MailSink, transport: str,
                                    mechanism: str) -> None:
    # A str must be ASCII for smtplib; it turns its bare LFs into CRLF itself.
    marker = f"smtplib-str-{transport}-{mechanism}"
    text = message(marker, eol="\n", text="Plain ASCII text.")
    client = smtplib_session(gateway, transport, mechanism)
    assert client.sendmail(USER, ["a@example.org"], text) == {}
    client.quit()
    assert_same(delivered(sink, marker), text.replace("\n", "\r\n").encode())


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_smtplib_with_8bit_bytes_and_bare_lf(gateway: Gateway, sink: MailSink, transport: str,
                                             mechanism: str) -> None:
    # Bytes go as they are: bare LF line ends, dots doubled after them, and a
    # CRLF added since the message does not end with one (an empty last line).
    marker = f"smtplib-bytes-{transport}-{mechanism}"
    data = message(marker, eol="\n").encode()
    client = smtplib_session(gateway, transport, mechanism)
    assert client.sendmail(USER, ["a@example.org"], data, mail_options=["BODY=8BITMIME"]) == {}
    client.quit()
    received = delivered(sink, marker)
    assert "BODY=8BITMIME" in received.mail_options
    assert_same(received, data.replace(b"\n", b"\r\n") + b"\r\n")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_smtplib_with_smtputf8_addresses(gateway: Gateway, sink: MailSink,
                                         transport: str) -> None:
    marker = f"smtplib-smtputf8-{transport}"
    mail = EmailMessage(policy=SMTPUTF8)
    mail["X-Client-Test"] = marker
    mail["From"] = "Jan <jan@zażółć.pl>"  # an alias domain, in its U-label form
    mail["To"] = "Żaneta <żaneta@example.org>"
    mail["Subject"] = "Zażółć"
    mail["Message-ID"] = f"<{marker}@kowalski.pl>"
    mail["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    mail.set_content("Gęślą jaźń.\n" + LONG + "\n")  # the email package folds it (QP)
    client = smtplib_session(gateway, transport, "PLAIN")
    assert client.send_message(mail) == {}
    client.quit()
    received = delivered(sink, marker)
    assert (received.mail_from, received.rcpt_tos) == ("jan@zażółć.pl", ["żaneta@example.org"])
    assert "SMTPUTF8" in received.mail_options
    assert_same(received, mail.as_bytes(policy=SMTPUTF8.clone(linesep="\r\n")))


# -- aiosmtplib -------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_aiosmtplib(gateway: Gateway, sink: MailSink, transport: str, mechanism: str) -> None:
    marker = f"aiosmtplib-{transport}-{mechanism}"
    data = message(marker, eol="\n").encode()

    async def send() -> None:
        implicit = transport == "implicit-tls"
        client = aiosmtplib.SMTP(hostname="127.0.0.1",
                                 port=gateway.tls_port if implicit else gateway.port,
                                 use_tls=implicit, start_tls=not implicit, tls_context=no_verify(),
                                 local_hostname="client.test")
        async with client:
            protocol = client.protocol
            await client.ehlo()  # the mechanism methods do not say EHLO after STARTTLS
            await getattr(client, f"auth_{mechanism.lower()}")(USER, PASSWORD)
            errors, _ = await client.sendmail(USER, ["a@example.org"], data)
            assert errors == {}
        # A TLS connection finishes closing after QUIT; the loop must not end first.
        async with asyncio.timeout(30):
            while protocol is not None and protocol.transport is not None:
                await asyncio.sleep(0.01)

    asyncio.run(send())
    # aiosmtplib sends CRLF line ends whatever it is given.
    assert_same(delivered(sink, marker), data.replace(b"\n", b"\r\n"))


# -- swaks ------------------------------------------------------------------------------


def swaks_binary() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is not installed: run .ci/services.sh")
        pytest.skip("swaks is not installed (.ci/services.sh installs it)")
    return path


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_swaks(gateway: Gateway, sink: MailSink, short_tmp: Path, transport: str,
               mechanism: str) -> None:
    binary = swaks_binary()
    marker = f"swaks-{transport}-{mechanism}"
    data = message(marker, eol="\n").encode()
    (short_tmp / "message.eml").write_bytes(data)
    implicit = transport == "implicit-tls"
    done = subprocess.run(
        [binary, "--server", "127.0.0.1", "--port",
         str(gateway.tls_port if implicit else gateway.port),
         "--tls-on-connect" if implicit else "--tls", "--pipeline",
         "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", USER, "--to", "a@example.org", "--helo", "client.test",
         "--data", f"@{short_tmp / 'message.eml'}"],
        capture_output=True, timeout=60)
    transcript = done.stdout.decode(errors="replace")
    assert done.returncode == 0, transcript[-3000:]
    assert "250 2.0.0 Ok: queued as " in transcript
    # PIPELINING offered and used: the envelope went in one batch.
    batch = r" [~-]> MAIL FROM:<[^>]*>\n *[~-]> RCPT TO:<[^>]*>\n *[~-]> DATA\n"
    assert re.search(batch, transcript), transcript
    # swaks writes its lines with CRLF, doubles leading dots, and ends the
    # data with an empty line of its own before the final dot.
    assert_same(delivered(sink, marker), data.replace(b"\n", b"\r\n") + b"\r\n")
