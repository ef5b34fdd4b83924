"""DKIM through the whole cluster: keys made by ``sendguard dkim keygen``, mail signed by
the workers, delivered to a sink and verified with dkimpy against the printed records."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dkim
import pytest
from clusterproc import Cluster, serving, wait_for
from gateway import TENANTS

pytestmark = pytest.mark.integration

DKIM_TENANTS = TENANTS.replace(
    'countries = ["PL", "DE"]', 'countries = ["PL", "DE"]\ndkim_selector = "sg1"'
).replace('[domains."nowak.pl"]', '[domains."nowak.pl"]\ndkim_selector = "ed1"') + """
[domains."plain.pl"]

[accounts."ola@plain.pl"]
password = "{PLAIN}correct horse"
"""
LONG_LINE = b"0123456789" * 99  # near the 998 limit of a line


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"

    def by_subject(self, subject: str) -> bytes | None:
        with self.lock:
            found = [m for m in self.messages if f"\r\nSubject: {subject}\r\n".encode() in m]
        return found[0] if found else None


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    with serving(handler) as port:
        yield handler, port


def txt_of(line: str) -> tuple[str, str]:
    """(name, value) of a printed zone line; a resolver joins the strings as they are."""
    name = line.split()[0].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', line))


def send(cluster: Cluster, user: str, sender: str, subject: str) -> None:
    client = cluster.login("127.0.0.5", user)
    try:
        assert client.mail(sender)[0] == 250
        assert client.rcpt("someone@example.org")[0] == 250
        message = (f"From: Someone <{sender}>\r\nTo: <someone@example.org>\r\n"
                   f"Subject: {subject}\r\nMIME-Version: 1.0\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()
        message += b"Hello,\r\n  spaced   out\t\r\n" + LONG_LINE + b"\r\n\r\n\r\n"
        code, text = client.data(message)
        assert code == 250, text
    finally:
        client.quit()


def test_mail_is_signed_as_delivered_and_verifies_against_the_printed_records(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    cluster = make_cluster(workers=2, tenants=DKIM_TENANTS,
                           delivery={"port": port, "retry": ["1h"]})
    records = {}
    for domain, selector, kind in (("kowalski.pl", "sg1", "rsa"), ("nowak.pl", "ed1", "ed25519")):
        made = cluster.admin("dkim", "keygen", domain, "--selector", selector, "--type", kind)
        assert made.returncode == 0, made.stderr
        name, value = txt_of(made.stdout.strip())
        records[name] = value
    assert set(records) == {"sg1._domainkey.kowalski.pl", "ed1._domainkey.nowak.pl"}
    cluster.start()

    send(cluster, "jan@kowalski.pl", "jan@kowalski.pl", "rsa signed")
    send(cluster, "anna@nowak.pl", "anna@nowak.pl", "ed25519 signed")
    send(cluster, "ola@plain.pl", "ola@plain.pl", "no selector")
    send(cluster, "jan@kowalski.pl", "jan@kowalski.com.pl", "alias without a key")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    for subject, algorithm, domain in (("rsa signed", b"rsa-sha256", b"kowalski.pl"),
                                       ("ed25519 signed", b"ed25519-sha256", b"nowak.pl")):
        got = wait_for(lambda s=subject: handler.by_subject(s), 30, f"{subject!r} at the sink")
        head = got.split(b"\r\n\r\n", 1)[0]
        # Our trace headers come first, unsigned; the signature sits on the client's headers.
        assert head.startswith(b"Received: from client.test ([127.0.0.5])")
        assert head.index(b"\r\nDKIM-Signature: ") > head.index(b"X-Spam-Scan: ")
        verifier = dkim.DKIM(got)
        assert verifier.verify(dnsfunc=dnsfunc), subject
        assert (verifier.signature_fields[b"a"], verifier.domain) == (algorithm, domain)
        assert verifier.signature_fields[b"c"] == b"relaxed/relaxed"
        signed = set(re.split(rb"\s*:\s*", verifier.signature_fields[b"h"]))
        assert {b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                b"content-type", b"reply-to"} <= signed
        assert b"received" not in signed

    for subject in ("no selector", "alias without a key"):
        got = wait_for(lambda s=subject: handler.by_subject(s), 30, f"{subject!r} at the sink")
        assert b"DKIM-Signature:" not in got

    lines = cluster.log_lines()
    accepted = {line.get("queue_id"): line for line in lines
                if line.get("event") == "decision" and line.get("stage") == "DATA"}
    signed_by = sorted(line.get("dkim") or "-" for line in accepted.values())
    assert signed_by == ["-", "-", "kowalski.pl/sg1", "nowak.pl/ed1"]
    [skipped] = [line for line in accepted.values() if line.get("dkim_skipped")]
    assert "kowalski.com.pl/sg1.pem cannot be read: no such file" in skipped["dkim_skipped"]

    # The missing key is logged when mail first needs it; again, it is not.
    send(cluster, "jan@kowalski.pl", "jan@kowalski.com.pl", "alias again")
    wait_for(lambda: handler.by_subject("alias again"), 30, "the second message at the sink")
    missing = [line for line in cluster.log_lines()
               if line.get("event") == "dkim_key_unavailable"]
    assert {line["domain"] for line in missing} == {"kowalski.com.pl"}
    assert len(missing) == len({line["process"] for line in missing})  # once per worker
    assert missing[0]["path"] == str(cluster.folder / "dkim" / "kowalski.com.pl" / "sg1.pem")


def test_a_key_file_replaced_in_place_is_read_again_on_hup(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    cluster = make_cluster(workers=1, tenants=DKIM_TENANTS,
                           delivery={"port": port, "retry": ["1h"]})
    key = cluster.folder / "dkim" / "kowalski.pl" / "sg1.pem"
    made = cluster.admin("dkim", "keygen", "kowalski.pl", "--selector", "sg1")
    assert made.returncode == 0, made.stderr
    old_record = txt_of(made.stdout.strip())[1]
    cluster.start()
    send(cluster, "jan@kowalski.pl", "jan@kowalski.pl", "old key")

    # A new key written over the old file (another folder's keygen, then a rename).
    made = cluster.admin("dkim", "keygen", "kowalski.pl", "--selector", "sg2")
    assert made.returncode == 0, made.stderr
    new_record = txt_of(made.stdout.strip())[1]
    (key.parent / "sg2.pem").replace(key)
    before = cluster.status()["config_version"]
    cluster.signal(signal.SIGHUP)
    wait_for(lambda: all((w["snapshot_version"] or 0) > before
                         for w in cluster.status()["workers"]), 15, "the workers reloaded")
    send(cluster, "jan@kowalski.pl", "jan@kowalski.pl", "new key")

    for subject, record in (("old key", old_record), ("new key", new_record)):
        got = wait_for(lambda s=subject: handler.by_subject(s), 30, f"{subject!r} at the sink")
        assert dkim.verify(got, dnsfunc=lambda name, timeout=5, r=record: r.encode()), subject
        other = new_record if record == old_record else old_record
        assert not dkim.verify(got, dnsfunc=lambda name, timeout=5, r=other: r.encode())
