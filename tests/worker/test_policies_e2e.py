"""SPEC §3 policies end to end, over real SMTP, DNS on loopback and a real GeoIP database."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import GTUBE, MESSAGE, PASSWORD, UNKNOWN_IP, Gateway, running_gateway

SPAM = b"Subject: offer\r\n\r\n" + GTUBE + b"\r\n"


@pytest.fixture
def gateway(short_tmp: Path, dns) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns,
                         # Tests below poll a refused MAIL in one session.
                         server={"trusted_networks": ["127.0.0.200/32"], "max_errors": 1000},
                         limits=[{"window": "2s", "max": 3}],
                         spam={"grace": 2, "window": "1m"}) as gw:
        yield gw


# -- sender domain (§3.2) ------------------------------------------------------

@pytest.mark.parametrize("sender", [
    "jan@kowalski.pl", "other.person@KOWALSKI.PL", "jan@kowalski.com.pl",
    "jan@zażółć.pl", "jan@xn--za-6ja4f8n1l.pl", "jan.kowalski@gmail.com",
    "Jan.Kowalski@Gmail.com",
])
def test_sender_allowed(gateway: Gateway, sender: str) -> None:
    client = gateway.login()
    assert client.mail(sender, ["SMTPUTF8"] if not sender.isascii() else [])[0] == 250
    client.quit()


@pytest.mark.parametrize("sender", [
    "jan@nowak.pl", "jan@mail.kowalski.pl", "jan@kowalski.pl.evil.test", "someone@gmail.com",
])
def test_sender_refused(gateway: Gateway, sender: str) -> None:
    client = gateway.login()
    code, text = client.mail(sender)
    assert (code, text.decode()) == (550, f"5.1.0 <{sender}> sender rejected")
    client.quit()


def test_null_sender_refused(gateway: Gateway) -> None:
    client = gateway.login()
    code, text = client.docmd("MAIL", "FROM:<>")
    assert (code, text.decode()) == (550, "5.1.0 <> sender rejected")
    client.quit()


# -- GeoIP (§3.3) --------------------------------------------------------------

def test_country_allowed_by_domain(gateway: Gateway) -> None:
    client = gateway.login("127.0.0.42")  # DE: allowed for kowalski.pl
    assert client.mail("jan@kowalski.pl")[0] == 250
    client.quit()


@pytest.mark.parametrize("source, user, sender", [
    ("127.0.0.66", "jan@kowalski.pl", "jan@kowalski.pl"),  # US
    ("127.0.0.42", "anna@nowak.pl", "anna@nowak.pl"),  # DE, nowak.pl has the default PL only
    (UNKNOWN_IP, "jan@kowalski.pl", "jan@kowalski.pl"),  # not in the database, unknown=reject
])
def test_country_refused(gateway: Gateway, source: str, user: str, sender: str) -> None:
    client = gateway.login(source, user)
    code, text = client.mail(sender)
    assert (code, text.decode()) == (550, f"5.1.0 <{sender}> sender rejected")
    client.quit()


def test_country_added_live(gateway: Gateway) -> None:
    client = gateway.login("127.0.0.66")
    assert client.mail("jan@kowalski.pl")[0] == 550
    text = gateway.tenants_path.read_text().replace('countries = ["PL", "DE"]',
                                                    'countries = ["PL", "DE", "US"]')
    gateway.tenants_path.write_text(text)
    assert gateway.reload()
    assert client.mail("jan@kowalski.pl")[0] == 250
    client.quit()


def test_bad_tenant_file_keeps_the_old_one(gateway: Gateway) -> None:
    gateway.tenants_path.write_text(gateway.tenants_path.read_text() + "\n[accounts.\n")
    assert not gateway.reload()
    client = gateway.login()
    assert client.mail("jan@kowalski.pl")[0] == 250
    client.quit()


def test_trusted_network_skips_geoip_and_ip_limits(gateway: Gateway) -> None:
    # 127.0.0.200 is not in the database (unknown=reject) but is trusted.
    client = gateway.login("127.0.0.200", "anna@nowak.pl")
    for _ in range(3):
        assert gateway.send(client, "anna@nowak.pl")[0] == 250
    # The account key still applies to trusted networks.
    code, text = client.mail("anna@nowak.pl")
    assert code == 550 and text.decode().endswith(" policy violation")
    client.quit()


# -- rate limits (§3.4) --------------------------------------------------------

def test_rate_limit_per_ip_and_window_slides(gateway: Gateway) -> None:
    jan = gateway.login("127.0.0.31")
    anna = gateway.login("127.0.0.31", "anna@nowak.pl")
    assert gateway.send(jan)[0] == 250
    assert gateway.send(jan)[0] == 250
    assert gateway.send(anna, "anna@nowak.pl")[0] == 250
    # The address has used its 3 messages in 2 s, whichever account sent them.
    code, text = anna.mail("anna@nowak.pl")
    assert code == 550 and text.decode().endswith(" policy violation")
    # A fresh address with another account is fine.
    other = gateway.login("127.0.0.32", "anna@nowak.pl")
    assert gateway.send(other, "anna@nowak.pl")[0] == 250
    # After the window, the address may send again.
    deadline = time.monotonic() + 30
    while jan.mail("jan@kowalski.pl")[0] != 250:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    jan.rset()
    for client in (jan, anna, other):
        client.quit()


def test_refused_message_changes_no_counter(gateway: Gateway) -> None:
    client = gateway.login("127.0.0.33")
    for _ in range(5):
        assert client.mail("stranger@elsewhere.test")[0] == 550
    for _ in range(3):
        assert gateway.send(client)[0] == 250
    client.quit()


def test_racing_sessions_on_one_account_accept_exactly_the_limit(short_tmp: Path, dns) -> None:
    limit = 7
    with running_gateway(short_tmp, dns, limits=[{"window": "1h", "max": 100}],
                         tenants_text=ONE_ACCOUNT_LIMITED.format(limit=limit)) as gateway:
        results: list[int] = []
        lock = threading.Lock()

        def session(index: int) -> None:
            client = gateway.login(f"127.0.1.{index + 1}", "jan@kowalski.pl")
            for _ in range(2):
                code, _text = gateway.send(client)
                with lock:
                    results.append(code)
            client.quit()

        threads = [threading.Thread(target=session, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 24
        assert results.count(250) == limit
        assert results.count(550) == 24 - limit


ONE_ACCOUNT_LIMITED = """
[domains."kowalski.pl"]
[accounts."jan@kowalski.pl"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = {limit}}}]
"""


# -- recipient domain (§3.5) ---------------------------------------------------

@pytest.mark.parametrize("recipient", [
    "a@example.org", "a@a-only.test", "a@aaaa-only.test", "a@EXAMPLE.ORG",
])
def test_recipient_domain_ok(gateway: Gateway, recipient: str) -> None:
    client = gateway.login()
    client.mail("jan@kowalski.pl")
    assert client.rcpt(recipient)[0] == 250
    client.quit()


def recipient_reply(gateway: Gateway, recipient: str) -> tuple[int, str, str]:
    client = gateway.login()
    client.mail("jan@kowalski.pl")
    code, text = client.rcpt(recipient)
    sid = text.decode().split()[1] if len(text.split()) > 1 else ""
    client.quit()
    return code, text.decode(), sid


@pytest.mark.parametrize("recipient", [
    "a@nxdomain.test", "a@null-mx.test", "a@no-mail.test",
])
def test_recipient_domain_invalid(gateway: Gateway, recipient: str) -> None:
    code, text, sid = recipient_reply(gateway, recipient)
    assert (code, text) == (550, f"5.1.1 {sid} invalid destination domains")
    assert len(sid) == 22


@pytest.mark.parametrize("recipient", ["a@servfail.test", "a@timeout.test"])
def test_recipient_domain_tempfail(gateway: Gateway, recipient: str) -> None:
    code, text, sid = recipient_reply(gateway, recipient)
    assert (code, text) == (451, f"4.4.3 {sid} destination domain lookup failed, try later")


def test_one_good_and_one_bad_recipient(gateway: Gateway) -> None:
    client = gateway.login()
    code, text = gateway.send(client, recipients=("a@nxdomain.test", "b@example.org"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]
    record = find_record(gateway, queue_id)
    assert record.rcpt_tos == ["b@example.org"]
    client.quit()


def find_record(gateway: Gateway, queue_id: str):
    """Read the queued record from the spool's files, as a restarted worker would."""
    from worker.spool import seglog
    from worker.spool.base import segment_seq

    active = gateway.settings.delivery.spool / "w0" / "active"
    segments = sorted((p for p in active.iterdir() if segment_seq(p.name) is not None),
                      key=lambda p: segment_seq(p.name))
    live = seglog.replay(seglog.scan(p.read_bytes()) for p in segments)
    assert queue_id in live, f"{queue_id} not in the spool"
    return live[queue_id]


# -- spam (§3.7) ---------------------------------------------------------------

def test_spam_grace_then_refusal(gateway: Gateway) -> None:
    client = gateway.login("127.0.0.41")
    assert gateway.send(client, body=SPAM)[0] == 250
    client.quit()
    client = gateway.login("127.0.0.41", "anna@nowak.pl")  # the grace is per address
    assert gateway.send(client, "anna@nowak.pl", body=SPAM)[0] == 250
    code, text = gateway.send(client, "anna@nowak.pl", body=SPAM)
    sid = text.split()[1]
    assert (code, text) == (550, f"5.1.0 {sid} spam detected")
    # The refusal took nothing from the rate limit: one more clean message fits (3 in 2 s).
    assert gateway.send(client, "anna@nowak.pl")[0] == 250
    client.quit()


def test_queued_message_is_in_the_spool_with_its_envelope(gateway: Gateway) -> None:
    client = gateway.login("127.0.0.43")
    code, text = gateway.send(client, recipients=("x@example.org", "y@example.com"))
    assert code == 250
    record = find_record(gateway, text.rsplit(" ", 1)[1])
    assert record.client_ip == "127.0.0.43"
    assert record.account == "jan@kowalski.pl"
    assert record.mail_from == "jan@kowalski.pl"
    assert record.rcpt_tos == ["x@example.org", "y@example.com"]
    assert len(record.session_id) == 22
    assert record.message.startswith(b"Received: from client.test ([127.0.0.43])")
    assert MESSAGE.split(b"\r\n\r\n")[1] in record.message
    assert b"\r\nMessage-ID: <" in record.message and b"\r\nDate: " in record.message
    client.quit()


def test_password_verified_once_then_cached(gateway: Gateway) -> None:
    verifier = gateway.parts.engine.verifier
    before = verifier.cache_misses
    for _ in range(3):
        gateway.login("127.0.0.44").quit()
    assert verifier.cache_misses - before <= 1
    assert PASSWORD
