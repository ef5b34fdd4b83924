"""SPEC §3 "Content" over real SMTP: what a client sends, what reaches the next hop.

Long lines, bare LF line ends, SMTP smuggling, PIPELINING and lines the
gateway cannot take. The gateway delivers to a real aiosmtpd sink in
smarthost mode, and the tests compare what the sink received byte for byte.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Gateway, running_gateway
from mailsink import MailSink

SID = r"[A-Za-z0-9]{22}"
USER = "jan@kowalski.pl"
HEAD = b"From: Jan <jan@kowalski.pl>\r\nTo: <a@example.org>\r\nSubject: content\r\n"
MAX_SIZE = 200_000


@pytest.fixture
def sink() -> Iterator[MailSink]:
    with MailSink() as running:
        yield running


@pytest.fixture
def gateway(short_tmp: Path, dns, sink: MailSink) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, server={"max_message_size": MAX_SIZE},
                         delivery={"mode": "smarthost",
                                   "smarthost": f"127.0.0.1:{sink.port}"}) as gw:
        yield gw


def login(gateway: Gateway) -> smtplib.SMTP:
    client = gateway.login()
    assert client.has_extn("pipelining")
    return client


def replies(client: smtplib.SMTP, count: int) -> list[tuple[int, str]]:
    return [(code, text.decode()) for code, text in (client.getreply() for _ in range(count))]


def test_a_line_over_998_octets_is_taken_and_delivered_broken_with_its_content(
        gateway: Gateway, sink: MailSink) -> None:
    html = b"<p>" + b" ".join(b"<b>word%d</b>" % i for i in range(700)) + b"</p>"   # ~9 KB
    blob = b"QUJD" * 1500                                                          # 6 KB, no spaces
    message = HEAD + b"\r\n" + html + b"\r\n" + blob + b"\r\n"
    client = login(gateway)
    assert client.sendmail(USER, ["a@example.org"], message) == {}
    client.quit()
    [delivered] = sink.wait(1)
    body = delivered.body
    lines = body[:-2].split(b"\r\n")
    assert max(map(len, lines)) <= 998
    # The HTML line was folded before spaces; the blob got CRLF SPACE, as Postfix does.
    html_end = body.index(b"</p>\r\n") + len(b"</p>")
    assert body[:html_end].replace(b"\r\n", b"") == html
    assert body[html_end + 2:-2].replace(b"\r\n ", b"") == blob
    # The login name is not in the delivered message (SPEC §3).
    received = delivered.content.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom: ")[0]
    assert received.startswith(b"Received: ") and b"(session " in received
    assert USER.encode() not in received and b"authenticated as" not in received


def test_bare_lf_is_a_line_end_and_dot_unstuffing_follows_it(
        gateway: Gateway, sink: MailSink) -> None:
    # smtplib in bytes mode keeps bare LFs, doubles the dots after them and,
    # since the message does not end with CRLF, adds one: an empty last line.
    message = (b"From: <jan@kowalski.pl>\nSubject: lf\n\nfirst\n.dotline\n..two\n"
               b".\nlast\n")
    client = login(gateway)
    assert client.sendmail(USER, ["a@example.org"], message) == {}
    client.quit()
    [delivered] = sink.wait(1)
    assert delivered.body == b"first\r\n.dotline\r\n..two\r\n.\r\nlast\r\n\r\n"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", delivered.content) is None


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"])
def test_a_fake_end_of_data_cannot_smuggle_a_second_message(
        gateway: Gateway, sink: MailSink, fake_end: bytes) -> None:
    smuggled = (b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                b"From: ceo@bank.example\r\n\r\nwire the money\r\n")
    client = login(gateway)
    client.send(b"MAIL FROM:<jan@kowalski.pl>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
    assert [code for code, _ in replies(client, 3)] == [250, 250, 354]
    client.send(HEAD + b"\r\nhello" + fake_end + smuggled + b".\r\nNOOP\r\n")
    (code, text), noop = replies(client, 2)
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
    assert noop[0] == 250
    client.quit()
    [delivered] = sink.wait(1)
    assert delivered.rcpt_tos == ["a@example.org"]
    assert b"wire the money" in delivered.body and b"MAIL FROM:<ceo@" in delivered.body
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", delivered.content) is None
    assert len(sink.messages) == 1


def test_pipelined_commands_are_answered_in_order(gateway: Gateway, sink: MailSink) -> None:
    client = login(gateway)
    client.send(b"MAIL FROM:<jan@kowalski.pl>\r\nRCPT TO:<a@example.org>\r\n"
                b"RCPT TO:<b@null-mx.test>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
    answers = replies(client, 5)
    assert [code for code, _ in answers] == [250, 250, 550, 250, 354]
    assert re.fullmatch(rf"5\.1\.1 {SID} invalid destination domains", answers[2][1])
    # The end of one message, the next transaction and QUIT in one write.
    client.send(HEAD + b"\r\none\r\n.\r\nRSET\r\nMAIL FROM:<jan@kowalski.pl>\r\n"
                b"RCPT TO:<d@example.org>\r\nDATA\r\n")
    assert [code for code, _ in replies(client, 5)] == [250, 250, 250, 250, 354]
    client.send(HEAD + b"\r\ntwo\r\n.\r\nQUIT\r\n")
    assert [code for code, _ in replies(client, 2)] == [250, 221]
    client.close()
    first, second = sink.wait(2)
    assert {(m.body, tuple(m.rcpt_tos)) for m in (first, second)} == {
        (b"one\r\n", ("a@example.org", "c@example.com")), (b"two\r\n", ("d@example.org",))}


def test_a_command_line_too_long_is_answered_with_the_session_id_and_logged(
        gateway: Gateway) -> None:
    client = login(gateway)
    for line in (b"NOOP " + b"x" * 3000, b"MAIL FROM:<" + b"j" * 700 + b"@kowalski.pl>"):
        client.send(line + b"\r\n")
        [(code, text)] = replies(client, 1)
        match = re.fullmatch(rf"5\.5\.2 ({SID}) line too long", text)
        assert code == 500 and match, text
    assert client.noop()[0] == 250  # the session goes on
    client.quit()
    sid = match.group(1)
    logged = [line for line in gateway.log_lines()
              if line.get("sid") == sid and line.get("policy") == "line_length"]
    assert len(logged) == 2
    assert logged[0]["reply"] == f"500 5.5.2 {sid} line too long"
    assert logged[0]["verdict"] == "reject" and logged[0]["account"] == USER


def test_a_message_over_the_size_limit_is_read_to_its_end_refused_and_logged(
        gateway: Gateway, sink: MailSink) -> None:
    too_big = (552, b"5.3.4 Message size exceeds fixed maximum message size")
    client = login(gateway)
    big = HEAD + b"\r\n" + (b"y" * 5000 + b"\r\n") * (MAX_SIZE // 5000 + 1)
    with pytest.raises(smtplib.SMTPSenderRefused) as declared:  # SIZE= at MAIL
        client.sendmail(USER, ["a@example.org"], big)
    assert (declared.value.smtp_code, declared.value.smtp_error) == too_big
    assert client.mail(USER)[0] == 250  # no SIZE=: refused at the end of DATA
    assert client.rcpt("a@example.org")[0] == 250
    assert client.data(big) == too_big
    assert client.sendmail(USER, ["a@example.org"], HEAD + b"\r\nsmall\r\n") == {}
    client.quit()
    assert [m.body for m in sink.wait(1)] == [b"small\r\n"]
    refusals = [(line["stage"], line["reply"]) for line in gateway.log_lines()
                if line.get("policy") == "size" and re.fullmatch(SID, line.get("sid", ""))]
    text = "552 5.3.4 Message size exceeds fixed maximum message size"
    assert refusals == [("MAIL", text), ("DATA", text)]
