from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from worker.spam import ScannerUnavailable, ScanRequest, ScanResult, make_scanner
from worker.spam.builtin import (
    BODY_LIMIT,
    GTUBE,
    MAX_DEPTH,
    THRESHOLD,
    BuiltinScanner,
    classify,
)
from worker.spam.rspamd import RspamdScanner
from worker.spam.spamd import SpamdScanner, parse_address

SID = "piWs1j0010jifNx01iWsdh"
PUBLIC_IP = "45.133.1.20"


def mail(
    subject: str = "Meeting notes",
    body: str = "Hi Anna,\n\nthe notes from today's meeting are below.\n\nBest regards,\nTom\n",
    *,
    sender: str = "Tom Baker <tom@example.com>",
    to: str = "anna@example.org",
    cte: str = "quoted-printable",
    html: str | None = None,
    html_only: bool = False,
) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    if html_only:
        message.set_content(html or "", subtype="html", cte=cte)
    else:
        message.set_content(body, cte=cte)
        if html is not None:
            message.add_alternative(html, subtype="html", cte=cte)
    return message.as_bytes(policy=policy.SMTP)


def request(message: bytes, **changes: object) -> ScanRequest:
    fields: dict[str, object] = dict(
        message=message,
        mail_from="tom@example.com",
        rcpt_tos=("anna@example.org", "piotr@zażółć.pl"),
        client_ip="203.0.113.9",
        helo="laptop.example.com",
        user="tom@example.com",
        session_id=SID,
    )
    fields.update(changes)
    return ScanRequest(**fields)  # type: ignore[arg-type]


# --- loopback peers that answer like the daemons --------------------------------


@dataclass
class Peer:
    host: str
    port: int
    requests: list[tuple[str, list[tuple[str, str]], bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


async def read_request(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("utf-8")
    first, *lines = head.split("\r\n")
    fields = [
        (name, value.strip()) for name, _, value in (line.partition(":") for line in lines if line)
    ]
    length = next(int(value) for name, value in fields if name.lower() == "content-length")
    return first, fields, await reader.readexactly(length)


@contextlib.asynccontextmanager
async def peer(answer: bytes | None, unix_path: Path | None = None) -> AsyncIterator[Peer]:
    """A server that reads one request and sends ``answer``; ``None`` never answers."""
    stop = asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()
    result = Peer("127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            result.requests.append(await read_request(reader))
            if answer is None:
                await stop.wait()
            else:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    if unix_path is None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        result.port = server.sockets[0].getsockname()[1]
    else:
        server = await asyncio.start_unix_server(handle, str(unix_path))
    try:
        yield result
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*handlers, return_exceptions=True)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_answer(payload: object, status: str = "200 OK") -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status}\r\nServer: rspamd/3.8\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


REJECT = {
    "is_skipped": False,
    "score": 1001.5,
    "required_score": 15.0,
    "action": "reject",
    "symbols": {
        "GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "metric_score": -0.2},
    },
    "messages": {"smtp_message": "Gtube pattern"},
}


def spamd_answer(spam: str, symbols: str = "", status: str = "0 EX_OK") -> bytes:
    return (
        f"SPAMD/1.1 {status}\r\nContent-length: {len(symbols)}\r\nSpam: {spam}\r\n\r\n{symbols}"
    ).encode()


# --- the interface --------------------------------------------------------------


async def test_make_scanner_builds_each_backend() -> None:
    builtin = make_scanner("builtin", "", 10.0, ["reject"])
    rspamd = make_scanner("rspamd", "http://127.0.0.1:11333", 10.0, ["reject"])
    spamd = make_scanner("spamd", "127.0.0.1:783", 10.0, ["reject"])
    assert (builtin.name, rspamd.name, spamd.name) == ("builtin", "rspamd", "spamd")
    result = await builtin.scan(request(mail(body=GTUBE.decode())))
    assert result.spam and result.backend == "builtin"
    for scanner in (builtin, rspamd, spamd):
        await scanner.close()


@pytest.mark.parametrize(
    ("backend", "url", "timeout", "error"),
    [
        ("clamav", "", 10.0, "spam.backend: must be one of builtin, rspamd, spamd, got 'clamav'"),
        ("builtin", "", 0.0, "spam.timeout: must be positive, got 0.0"),
        ("rspamd", "127.0.0.1:11333", 10.0, "spam.url: rspamd needs an http://host[:port] URL"),
        ("rspamd", "https://rspamd.example:11333", 10.0, "spam.url: rspamd needs an http://"),
        (
            "rspamd",
            "http://127.0.0.1:99999",
            10.0,
            "spam.url: bad port in 'http://127.0.0.1:99999'",
        ),
        ("spamd", "127.0.0.1:99999", 10.0, "spam.url: bad spamd port in '127.0.0.1:99999'"),
        ("spamd", "http://127.0.0.1:783", 10.0, "spam.url: spamd needs host:port"),
    ],
)
def test_make_scanner_rejects_bad_configuration(
    backend: str, url: str, timeout: float, error: str
) -> None:
    with pytest.raises(ValueError) as caught:
        make_scanner(backend, url, timeout, ["reject"])
    assert str(caught.value).startswith(error)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("127.0.0.1:783", ("127.0.0.1", 783)),
        ("spamd.internal", ("spamd.internal", 783)),
        ("[::1]:7830", ("::1", 7830)),
        ("::1", ("::1", 783)),
        ("/run/spamd.sock", "/run/spamd.sock"),
    ],
)
def test_spamd_address_forms(url: str, address: tuple[str, int] | str) -> None:
    assert parse_address(url) == address


async def test_hanging_scanner_times_out_without_stalling_other_scans() -> None:
    async with peer(None) as silent, peer(http_answer(REJECT)) as rspamd:
        hanging = make_scanner("spamd", silent.address, 0.3, ["reject"])
        healthy = make_scanner("rspamd", f"http://{rspamd.address}", 0.3, ["reject"])
        started = time.monotonic()
        stuck = asyncio.create_task(hanging.scan(request(mail())))
        answered = await healthy.scan(request(mail()))
        assert answered.spam and not stuck.done()
        with pytest.raises(ScannerUnavailable, match=r"^spamd: timeout after 0\.3s$"):
            await stuck
        # Generous above: a loaded machine runs timers late; a scan without
        # its timeout would never end.
        assert 0.25 < time.monotonic() - started < 10.0


# --- builtin: GTUBE ---------------------------------------------------------------


def test_gtube_is_spam_with_certainty() -> None:
    result = classify(mail(body=f"Test message.\n\n{GTUBE.decode()}\n"))
    assert result.spam
    assert result.score >= 1000
    assert result.symbols == ("GTUBE",)
    assert result.backend == "builtin"


def test_gtube_in_base64_body_is_found() -> None:
    message = mail(body=f"{GTUBE.decode()}\n", cte="base64")
    assert GTUBE not in message
    assert "GTUBE" in classify(message).symbols


def test_gtube_in_html_only_message() -> None:
    message = mail(html=f"<p>{GTUBE.decode()}</p>", html_only=True)
    assert classify(message).spam


def test_only_the_first_64_kb_of_the_body_is_read() -> None:
    filler = "Regular report line, nothing to see here.\n" * (BODY_LIMIT // 40 + 10)
    late = classify(mail(body=filler + GTUBE.decode(), cte="8bit"))
    early = classify(mail(body=GTUBE.decode() + "\n" + filler, cte="8bit"))
    assert not late.spam
    assert early.spam


# --- builtin: clean mail stays clean ------------------------------------------------

POLISH_BODY = (
    "Dzień dobry,\n\n"
    "w załączeniu przesyłam fakturę VAT nr FV/2024/10/117 za październik. Termin "
    "płatności: 14 dni. Prosimy o przelew na rachunek podany na fakturze.\n\n"
    "W razie pytań proszę o kontakt pod numerem +48 22 123 45 67.\n\n"
    "Z poważaniem\nGrzegorz Brzęczyszczykiewicz\nZażółć Gęślą Jaźń Sp. z o.o.\n"
)

NEWSLETTER_HTML = (
    "<!DOCTYPE html><html><head><style>body{font-family:Arial}.btn{color:#fff}</style></head>"
    '<body><div style="display:none;max-height:0;overflow:hidden">'
    "Nowości w ofercie na listopad</div>"
    "<h1>Listopadowe nowości</h1><p>Szanowni Państwo, zapraszamy do zapoznania się z nową "
    'ofertą hostingu. Szczegóły na <a href="https://www.example.pl/oferta">naszej stronie</a>.</p>'
    '<p><small>Aby zrezygnować z subskrypcji, <a href="https://www.example.pl/u">kliknij '
    "tutaj</a>.</small></p></body></html>"
)


def pdf_invoice() -> bytes:
    message = EmailMessage()
    message["From"] = "Księgowość <ksiegowosc@zażółć.pl>"
    message["To"] = "Biuro Klienta <biuro@klient.pl>, Anna Nowak <anna.nowak@klient.pl>"
    message["Cc"] = "Jan Kowalski <jan.kowalski@zażółć.pl>"
    message["Subject"] = "Faktura FV/2024/10/117 – płatność do 14.11"
    message.set_content(POLISH_BODY, cte="quoted-printable")
    message.add_attachment(
        b"%PDF-1.7\n" + bytes(range(256)) * 40,
        maintype="application",
        subtype="pdf",
        filename="faktura.pdf",
    )
    return message.as_bytes(policy=policy.SMTPUTF8)


CLEAN = {
    "english business": mail(
        subject="Re: Q3 budget review",
        body=(
            "Hi Anna,\n\nThanks for the draft. Two remarks on the travel line: the October "
            "trip to Berlin is already booked, and the training budget moves to Q4.\n\n"
            "Could we go through it on Thursday at 10:00?\n\n> On Monday, Anna wrote:\n"
            "> Please find the draft attached.\n\nBest regards,\nTom Baker\nFinance\n"
        ),
    ),
    "polish utf-8 8bit": mail(
        subject="Faktura za październik",
        body=POLISH_BODY,
        cte="8bit",
        sender="Grzegorz Brzęczyszczykiewicz <grzegorz@zażółć.pl>",
    ),
    "polish quoted-printable": mail(
        subject="Faktura za październik – prośba o potwierdzenie",
        body=POLISH_BODY,
        cte="quoted-printable",
    ),
    "polish base64": mail(subject="Umowa serwisowa", body=POLISH_BODY, cte="base64"),
    "polish invoice with pdf": pdf_invoice(),
    "newsletter with plain part": mail(
        subject="Listopadowe nowości w ofercie",
        body="Listopadowe nowości: https://www.example.pl/oferta\n",
        html=NEWSLETTER_HTML,
    ),
    "html-only webmail reply": mail(
        subject="RE: zamówienie 2024/887",
        html="<div>Dzień dobry,<br>potwierdzam odbiór zamówienia. Wysyłka jutro.<br>"
        "Pozdrawiam, Marta</div>",
        html_only=True,
    ),
    "short private ip link": mail(subject="panel", body="zobacz http://10.0.0.5:8080/\n"),
    "contact form with same address as name": mail(
        sender='"kontakt@firma.pl" <kontakt@firma.pl>', subject="Nowa wiadomość z formularza"
    ),
    "ticket with acronyms": mail(subject="RE: FV 2024/10 PZU SA", body="Dziękuję, otrzymałem.\n"),
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_normal_mail_is_not_spam(name: str) -> None:
    result = classify(CLEAN[name])
    assert not result.spam, result
    assert result.score < THRESHOLD / 2, result


def test_polish_quoted_printable_is_decoded() -> None:
    # A phrase split by a soft line break in QP is still seen as one phrase.
    body = "Gratulacje! " * 6 + "Wygrałeś nowy telefon, odbierz nagrodę już dziś."
    assert "SPAM_PHRASES" in classify(mail(body=body, cte="quoted-printable")).symbols


# --- builtin: weighted signals --------------------------------------------------------


def test_typical_spam_adds_up() -> None:
    message = mail(
        subject="YOU HAVE WON A FREE IPHONE!!!",
        body=(
            "Dear friend!!!\n\nCongratulations!!! You have won. Claim your prize now, "
            "this is a limited time offer!!! Act now.\n"
        ),
    )
    result = classify(message)
    assert result.spam
    assert set(result.symbols) >= {
        "SUBJECT_ALL_CAPS",
        "SUBJECT_EXCLAIM",
        "BODY_EXCLAIM",
        "SPAM_PHRASES",
    }
    assert result.score >= THRESHOLD


@pytest.mark.parametrize(
    ("subject", "hit"),
    [
        ("WAŻNE: ZAPŁAĆ ZALEGŁĄ FAKTURĘ", True),
        ("PILNE", False),  # too short to tell shouting from an acronym
        ("Ważne: zapłać zaległą fakturę", False),
    ],
)
def test_subject_in_capitals(subject: str, hit: bool) -> None:
    assert ("SUBJECT_ALL_CAPS" in classify(mail(subject=subject)).symbols) is hit


def test_spam_phrases_weigh_per_phrase_and_are_capped() -> None:
    one = classify(mail(body="We offer a risk-free trial of our accounting package.\n"))
    many = classify(
        mail(
            body=(
                "You have won! Claim your prize, act now, limited time offer, 100% free, "
                "no credit check, make money fast, viagra and cialis.\n"
            )
        )
    )
    assert one.symbols == ("SPAM_PHRASES",) and one.score == 1.5
    assert "SPAM_PHRASES" in many.symbols and many.score == 6.0 and many.spam


def test_body_that_is_only_a_raw_ip_link() -> None:
    alone = classify(mail(subject="Invoice", body=f"http://{PUBLIC_IP}/inv/8812.php\n"))
    assert alone.symbols == ("RAW_IP_URL", "BODY_ONLY_IP_URL")
    assert not alone.spam  # strong, but one signal alone is not a verdict
    shouted = classify(mail(subject="YOUR INVOICE IS READY", body=f"http://{PUBLIC_IP}/inv\n"))
    assert shouted.spam


def test_raw_ip_link_hidden_behind_html_text() -> None:
    html = f'<p><a href="http://{PUBLIC_IP}:8080/login">Click here</a></p>'
    result = classify(mail(html=html, html_only=True))
    assert {"RAW_IP_URL", "BODY_ONLY_IP_URL", "HTML_ONLY"} <= set(result.symbols)
    assert result.spam


def test_raw_ip_link_inside_a_real_letter_is_a_small_signal() -> None:
    body = (
        "Hi,\n\nthe staging server is up again at http://45.133.1.20/, please check the "
        "new checkout page before Friday and send me your remarks.\n\nTom\n"
    )
    result = classify(mail(body=body))
    assert result.symbols == ("RAW_IP_URL",) and not result.spam


@pytest.mark.parametrize(
    ("sender", "hit"),
    [
        ('"service@paypal.com" <secure@paypal-billing.ru>', True),
        ("service@paypal.com <secure@paypal-billing.ru>", True),
        ("=?utf-8?q?support=40bank=2Epl?= <alert@bank-pl.top>", True),
        ('"tom@example.com" <Tom@Example.com>', False),
        ("Tom Baker <tom@example.com>", False),
        ("tom@example.com", False),
    ],
)
def test_from_display_name_with_another_address(sender: str, hit: bool) -> None:
    assert ("FROM_NAME_OTHER_ADDR" in classify(mail(sender=sender)).symbols) is hit


def test_html_only_with_hidden_text() -> None:
    html = (
        "<html><body><p>Hello, your parcel is waiting.</p>"
        '<span style="font-size:0px">casual friendly meeting lunch invoice report</span>'
        "<div style='visibility: hidden'>quarterly agenda minutes project colleague</div>"
        "</body></html>"
    )
    result = classify(mail(html=html, html_only=True))
    assert result.symbols == ("HTML_ONLY", "HTML_HIDDEN_TEXT")
    assert result.score == 3.0


def test_visible_small_font_is_not_hidden() -> None:
    html = '<p style="font-size: 10px; color: #333">Regulamin promocji dostępny w biurze.</p>'
    assert "HTML_HIDDEN_TEXT" not in classify(mail(html=html, html_only=True)).symbols


@pytest.mark.parametrize(("count", "score"), [(5, 0.0), (25, 1.0), (60, 2.0)])
def test_many_visible_recipients(count: int, score: float) -> None:
    to = ", ".join(f"customer{n}@example.net" for n in range(count))
    result = classify(mail(to=to))
    assert result.score == score
    assert ("MANY_VISIBLE_RCPTS" in result.symbols) is (score > 0)


def test_missing_date_and_message_id_are_not_signals() -> None:
    message = b"From: tom@example.com\r\nTo: anna@example.org\r\nSubject: hi\r\n\r\nHello Anna.\r\n"
    assert classify(message) == ScanResult(spam=False, score=0.0, symbols=(), backend="builtin")


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"no headers at all",
        b"\r\n\r\nbody without headers",
        bytes(range(256)) * 50,
        b"Subject: =?x-unknown?q?abc?= =?utf-8?b?####?=\r\nFrom: <\r\n\r\nbody",
        b"Subject: \xc5\xbb\xc3\xb3\xc5\x82w \xff\r\nFrom: \xff <a@b>\r\n\r\n8-bit headers",
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nbody \xff\xfe",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!not base64==\r\n",
        b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\nbad\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n",
        b"Content-Type: text/html\r\n\r\n" + b"<style <a <div style='display:none' " * 2000,
    ],
)
def test_malformed_messages_get_a_verdict(message: bytes) -> None:
    assert isinstance(classify(message), ScanResult)


def test_cost_per_small_message() -> None:
    message = mail(subject="Faktura za październik", body=POLISH_BODY + POLISH_BODY[:300])
    assert 900 < len(message) < 1200
    runs = 300
    started = time.perf_counter()
    for _ in range(runs):
        classify(message)
    assert (time.perf_counter() - started) / runs < 0.001


def test_cost_is_bounded_for_a_huge_message() -> None:
    line = "Lorem ipsum dolor sit amet <a href='http://45.133.1.20/'>x</a>!!!\r\n"
    message = mail(subject="report", body=line * (36 * 1024 * 1024 // len(line)), cte="8bit")
    assert len(message) > 35 * 1024 * 1024
    started = time.perf_counter()
    classify(message)
    assert time.perf_counter() - started < 0.05


def nested_multipart(depth: int, leaf: bytes) -> bytes:
    message = b"Subject: nested\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(1, depth):
        message += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (
            level - 1,
            level,
        )
    return message + b"--b%d\r\nContent-Type: text/plain\r\n\r\n%s\r\n" % (depth - 1, leaf)


def test_text_in_nested_parts_is_read() -> None:
    assert classify(nested_multipart(4, b"claim your prize")).symbols == ("SPAM_PHRASES",)


def test_nesting_is_bounded() -> None:
    # The stdlib parser raises RecursionError on the deepest; the walker stops at MAX_DEPTH.
    assert classify(nested_multipart(MAX_DEPTH, b"claim your prize")).symbols == ("SPAM_PHRASES",)
    assert classify(nested_multipart(MAX_DEPTH + 1, b"claim your prize")).symbols == ()
    assert classify(nested_multipart(3000, b"claim your prize")).symbols == ()


HTML = b"Content-Type: text/html\r\n\r\n"
HOSTILE = {
    "deep nesting": nested_multipart(3000, b"x"),
    "many parts": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 3000,
    "many hidden tags": HTML + b"<p style='display:none'></p>" * 3000,
    "hiding styles outside tags": HTML + b"<" + b"display:none " * 6000,
    "many tags": HTML + b"<p style='color:red'>x</p>" * 3000,
    "many ip urls": b"Subject: x\r\n\r\n" + b"http://10.0.0.1/ " * 4000,
    "encoded-word subject": b"Subject: " + b"=?a?q?" * 10000 + b"\r\n\r\nx",
    "long display name": b"From: " + b"a" * 60000 + b"@ <x@y.pl>\r\n\r\nx",
    "huge To header": b"To: " + b"a@b.pl, " * 8000 + b"\r\n\r\nx",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_costs_little(name: str) -> None:
    # CPU time of this thread, not wall time: a busy machine delays the
    # thread but does not add to it. Linear work on these inputs takes a few
    # ms; the backtracking or quadratic walks they were written against take
    # seconds, so the bound is far from both.
    started = time.thread_time()
    classify(HOSTILE[name])
    assert time.thread_time() - started < 0.25


async def test_builtin_scanner_uses_classify() -> None:
    scanner = BuiltinScanner()
    message = mail(body=GTUBE.decode())
    assert await scanner.scan(request(message)) == classify(message)
    await scanner.close()


# --- rspamd ---------------------------------------------------------------------------


async def test_rspamd_request_and_verdict() -> None:
    message = mail(body=GTUBE.decode())
    async with peer(http_answer(REJECT)) as daemon:
        scanner = RspamdScanner(f"http://{daemon.address}")
        result = await scanner.scan(request(message))
    assert result == ScanResult(
        spam=True, score=1001.5, symbols=("GTUBE", "MIME_GOOD"), backend="rspamd", action="reject"
    )
    [(first, fields, body)] = daemon.requests
    assert first == "POST /checkv2 HTTP/1.1"
    assert body == message
    assert fields == [
        ("Host", daemon.address),
        ("Content-Length", str(len(message))),
        ("Connection", "close"),
        ("From", "tom@example.com"),
        ("Rcpt", "anna@example.org"),
        ("Rcpt", "piotr@zażółć.pl"),
        ("IP", "203.0.113.9"),
        ("Helo", "laptop.example.com"),
        ("User", "tom@example.com"),
        ("Queue-Id", SID),
    ]


async def test_rspamd_null_sender_and_header_injection() -> None:
    async with peer(http_answer(REJECT)) as daemon:
        scanner = RspamdScanner(f"http://{daemon.address}/")
        await scanner.scan(request(mail(), mail_from="", helo="evil\r\nSettings: {}"))
    [(_, fields, _)] = daemon.requests
    assert ("From", "<>") in fields
    assert ("Helo", "evil  Settings: {}") in fields
    assert "Settings" not in [name for name, _ in fields]


@pytest.mark.parametrize(
    ("action", "spam_actions", "spam"),
    [
        ("reject", ("reject",), True),
        ("add header", ("reject",), False),
        ("add header", ("reject", "add header"), True),
        ("no action", ("reject", "add header"), False),
    ],
)
async def test_rspamd_spam_actions(action: str, spam_actions: tuple[str, ...], spam: bool) -> None:
    answer = {"action": action, "score": 7, "symbols": {}}
    async with peer(http_answer(answer)) as daemon:
        scanner = make_scanner("rspamd", f"http://{daemon.address}", 5.0, spam_actions)
        result = await scanner.scan(request(mail()))
    assert (result.spam, result.score, result.symbols, result.action) == (spam, 7.0, (), action)


async def test_rspamd_path_prefix_and_chunked_answer() -> None:
    body = json.dumps({"action": "no action", "score": -0.5, "symbols": {"R_SPF_NA": {}}})
    chunked = (
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{len(body[:10]):x}\r\n{body[:10]}\r\n{len(body[10:]):x}\r\n{body[10:]}\r\n0\r\n\r\n"
    ).encode()
    async with peer(chunked) as daemon:
        scanner = RspamdScanner(f"http://{daemon.address}/rspamd/")
        result = await scanner.scan(request(mail()))
    assert daemon.requests[0][0] == "POST /rspamd/checkv2 HTTP/1.1"
    assert (result.spam, result.score, result.symbols) == (False, -0.5, ("R_SPF_NA",))


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            http_answer({"error": "cannot parse input"}, "400 Bad Request"),
            "rspamd: HTTP 400: cannot parse input",
        ),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "rspamd: HTTP 503"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!", "rspamd: answer is not JSON"),
        (http_answer(["reject"]), "rspamd: answer is not a JSON object"),
        (http_answer({"score": 3.0, "symbols": {}}), "rspamd: answer has no action"),
        (http_answer({"action": "reject", "score": "high"}), "rspamd: answer has no numeric score"),
        (
            http_answer({"action": "reject", "score": 9, "symbols": ["A"]}),
            "rspamd: symbols is not an object",
        ),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "rspamd: not an HTTP answer"),
        (b"", "rspamd: connection closed without an answer"),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"action"',
            "rspamd: connection closed in the middle of the answer",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n{}", "rspamd: malformed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "rspamd: connection closed in the answer headers"),
    ],
)
async def test_rspamd_malformed_answers(answer: bytes, error: str) -> None:
    async with peer(answer) as daemon:
        scanner = make_scanner("rspamd", f"http://{daemon.address}", 5.0, ["reject"])
        with pytest.raises(ScannerUnavailable) as caught:
            await scanner.scan(request(mail()))
    assert str(caught.value).startswith(error)


async def test_rspamd_refused_connection() -> None:
    port = closed_port()
    scanner = make_scanner("rspamd", f"http://127.0.0.1:{port}", 5.0, ["reject"])
    with pytest.raises(
        ScannerUnavailable, match=rf"^rspamd: cannot connect to 127\.0\.0\.1:{port}"
    ):
        await scanner.scan(request(mail()))


async def test_rspamd_that_never_answers_times_out() -> None:
    async with peer(None) as daemon:
        scanner = make_scanner("rspamd", f"http://{daemon.address}", 0.2, ["reject"])
        with pytest.raises(ScannerUnavailable, match=r"^rspamd: timeout after 0\.2s$"):
            await scanner.scan(request(mail()))
        assert len(daemon.requests) == 1


# --- spamd ----------------------------------------------------------------------------


async def test_spamd_request_and_verdict() -> None:
    message = mail(body=GTUBE.decode())
    answer = spamd_answer("True ; 1000.0 / 5.0", "GTUBE,MISSING_DATE,NO_RECEIVED")
    async with peer(answer) as daemon:
        scanner = make_scanner("spamd", daemon.address, 5.0, ["reject"])
        result = await scanner.scan(request(message))
    assert result == ScanResult(
        spam=True, score=1000.0, symbols=("GTUBE", "MISSING_DATE", "NO_RECEIVED"), backend="spamd"
    )
    [(first, fields, body)] = daemon.requests
    assert first == "SYMBOLS SPAMC/1.5"
    assert fields == [("Content-length", str(len(body)))]
    trace, _, rest = body.partition(b"\r\n\t")
    assert trace == b"Received: from laptop.example.com (unknown [203.0.113.9])"
    assert rest.startswith(f"by sendguard with ESMTPSA id {SID};\r\n\t".encode())
    assert body.endswith(b"\r\n" + message)


async def test_spamd_clean_and_client_text_sanitised() -> None:
    async with peer(spamd_answer("False ; -0.3 / 5.0", "ALL_TRUSTED\r\n")) as daemon:
        scanner = SpamdScanner(daemon.address)
        result = await scanner.scan(request(mail(), helo="bad helo\r\nX-Spam: no"))
    assert (result.spam, result.score, result.symbols) == (False, -0.3, ("ALL_TRUSTED",))
    body = daemon.requests[0][2]
    assert body.startswith(b"Received: from badheloX-Spam:no (unknown [203.0.113.9])")


async def test_spamd_over_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "spamd.sock"
    async with peer(spamd_answer("Yes ; 15.0 / 5.0"), unix_path=path):
        scanner = make_scanner("spamd", str(path), 5.0, ["reject"])
        result = await scanner.scan(request(mail()))
    assert (result.spam, result.score, result.symbols) == (True, 15.0, ())


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            b"SPAMD/1.0 76 Bad header line: (Content-length mismatch: 10 vs. 12)\r\n\r\n",
            "spamd: error 76 Bad header line: (Content-length mismatch: 10 vs. 12)",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", "spamd: not a SPAMD answer: 'HTTP/1.1 200 OK'"),
        (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
            "spamd: answer has no valid Spam header: None",
        ),
        (
            spamd_answer("Maybe ; 3.0 / 5.0"),
            "spamd: answer has no valid Spam header: 'Maybe ; 3.0 / 5.0'",
        ),
        (spamd_answer("True ; lots / 5.0"), "spamd: answer has no valid Spam header"),
        (
            b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.0 / 5.0\r\nContent-length: 50\r\n\r\nGTUBE",
            "spamd: connection closed in the middle of the answer",
        ),
        (
            b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.0 / 5.0\r\nContent-length: x\r\n\r\n",
            "spamd: malformed answer",
        ),
        (b"SPAMD/1.1 0 EX_OK\r\nSpam: Tr", "spamd: connection closed in the answer headers"),
        (b"", "spamd: connection closed without an answer"),
    ],
)
async def test_spamd_malformed_answers(answer: bytes, error: str) -> None:
    async with peer(answer) as daemon:
        scanner = make_scanner("spamd", daemon.address, 5.0, ["reject"])
        with pytest.raises(ScannerUnavailable) as caught:
            await scanner.scan(request(mail()))
    assert str(caught.value).startswith(error)


async def test_spamd_refused_connection() -> None:
    port = closed_port()
    scanner = make_scanner("spamd", f"127.0.0.1:{port}", 5.0, ["reject"])
    with pytest.raises(ScannerUnavailable, match=rf"^spamd: cannot connect to 127\.0\.0\.1:{port}"):
        await scanner.scan(request(mail()))


async def test_spamd_that_never_answers_times_out() -> None:
    async with peer(None) as daemon:
        scanner = make_scanner("spamd", daemon.address, 0.2, ["reject"])
        with pytest.raises(ScannerUnavailable, match=r"^spamd: timeout after 0\.2s$"):
            await scanner.scan(request(mail()))
        assert len(daemon.requests) == 1
