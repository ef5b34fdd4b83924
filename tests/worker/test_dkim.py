"""DKIM signing pieces with the real dkimpy: keys per tenant directory, the From: domain,
the deliverable form, and OpenSSL doing dkimpy's RSA step byte for byte."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cluster.dkimkeys import generate_key, key_path
from cluster.logjson import JsonFormatter
from cluster.tenants import TenantDirectory, parse_tenants
from worker import dkim as signing
from worker.client import Client
from worker.delivery.lines import for_delivery
from worker.dkim import DkimKeyring, DkimSigner, header_from_domain, sign_message

TENANTS = {
    "domains": {
        "kowalski.pl": {"aliases": ["kowalski.com.pl"], "dkim_selector": "sg1"},
        "nowak.pl": {"dkim_selector": "ed1"},
        "plain.pl": {},
    },
    "accounts": {
        "jan@kowalski.pl": {"password": "{PLAIN}x", "alternate_sender": "jan@gmail.com"},
        "anna@nowak.pl": {"password": "{PLAIN}x"},
    },
}


def tenants(data: dict[str, object] = TENANTS) -> TenantDirectory:
    return parse_tenants(Path("tenants.toml"), data)  # type: ignore[arg-type]


@pytest.fixture
def decisions() -> Iterator[list[dict[str, object]]]:
    """The JSON lines logged meanwhile."""
    lines: list[dict[str, object]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    handler = Keep()
    logger = logging.getLogger("sendguard")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def make_key(keys_dir: Path, domain: str, selector: str, kind: str = "rsa") -> str:
    pem, value = generate_key(kind, 1024)
    path = key_path(keys_dir, domain, selector)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    return value


def verify(message: bytes, records: dict[str, str]) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def test_openssl_does_dkimpys_rsa_step_byte_for_byte() -> None:
    assert signing.install_openssl_rsa()
    assert dkim.RSASSA_PKCS1_v1_5_sign is signing._openssl_rsassa_sign
    for bits in (1024, 2048):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        parsed = dkim.crypto.parse_pem_private_key(pem)
        for data in (b"", b"one", b"x" * 1000):
            for hasher in (hashlib.sha256, hashlib.sha1):
                ours = signing._openssl_rsassa_sign(hasher(data), parsed)
                theirs = bytes(signing._PURE_PYTHON_RSASSA(hasher(data), parsed))
                assert ours == theirs


def test_the_signed_message_is_what_delivery_sends(tmp_path: Path) -> None:
    # Long lines are broken before signing, by delivery's own rule, so delivery
    # has nothing left to change in the signed bytes and the signature holds.
    value = make_key(tmp_path, "kowalski.pl", "sg1")
    key = DkimKeyring.load(tmp_path, tenants()).keys["kowalski.pl"]
    long_line = bytes(range(33, 127)) * 30  # 2820 characters, no space to break at
    content = b"From: j@kowalski.pl\nSubject: x\n\n" + long_line + b"\nend\n"
    signed = sign_message(content, key).content
    assert for_delivery(signed) == signed
    assert max(len(line) for line in signed.split(b"\r\n")) <= 998
    assert verify(signed, {"sg1._domainkey.kowalski.pl": value})


@pytest.mark.parametrize("head, domain", [
    (b"From: Jan <jan@Kowalski.PL>\r\n", "kowalski.pl"),
    (b"Subject: x\r\nfrom:\r\n  \"K, J\" <j@kowalski.com.pl>,\r\n\tother@nowak.pl\r\n",
     "kowalski.com.pl"),
    ("From: =?utf-8?q?Za=C5=BC?= <j@zażółć.pl>\r\n".encode(), "xn--za-6ja4f8n1l.pl"),
    (b"Subject: no from\r\n", None),
    (b"From: undisclosed\r\n", None),
    (b"Subject: x\r\n\r\nFrom: j@kowalski.pl\r\n", None),  # in the body
])
def test_header_from_domain(head: bytes, domain: str | None) -> None:
    assert header_from_domain(head + b"\r\nbody\r\n") == domain


def test_keys_load_with_the_directory_and_a_missing_one_is_logged_once(
        tmp_path: Path, decisions: list[dict[str, object]]) -> None:
    make_key(tmp_path, "kowalski.pl", "sg1")
    first = DkimKeyring.load(tmp_path, tenants())
    assert set(first.keys) == {"kowalski.pl"}
    assert first.unavailable("kowalski.pl") is None
    assert first.unavailable("plain.pl") is None  # no selector: nothing to sign with
    why = first.unavailable("nowak.pl")
    assert why == f"key {tmp_path}/nowak.pl/ed1.pem cannot be read: no such file"
    assert first.unavailable("nowak.pl") == why

    # Reloaded with the next directory: the key is not reread, the problem not retold.
    second = DkimKeyring.load(tmp_path, tenants(), first)
    assert second.keys["kowalski.pl"] is first.keys["kowalski.pl"]
    assert second.unavailable("nowak.pl") == why
    assert second.unavailable("kowalski.com.pl") is not None
    missing = [(line["domain"], line["tenant"], line["error"]) for line in decisions
               if line["event"] == "dkim_key_unavailable"]
    assert missing == [("nowak.pl", "nowak.pl", "cannot be read: no such file"),
                       ("kowalski.com.pl", "kowalski.pl", "cannot be read: no such file")]

    make_key(tmp_path, "nowak.pl", "ed1", "ed25519")
    third = DkimKeyring.load(tmp_path, tenants(), second)
    assert set(third.keys) == {"kowalski.pl", "nowak.pl"}
    assert third.keys["nowak.pl"].algorithm == b"ed25519-sha256"
    assert third.unavailable("nowak.pl") is None


def client_of(directory: TenantDirectory, user: str) -> Client:
    return Client("S" * 22, "127.0.0.5", "127.0.0.5", False, account=directory.account(user))


@pytest.mark.parametrize("user, sender, signed", [
    ("jan@kowalski.pl", "jan@kowalski.pl", "kowalski.pl/sg1"),
    ("jan@kowalski.pl", "jan@kowalski.com.pl", "kowalski.com.pl/sg1"),  # an alias: d= itself
    ("jan@kowalski.pl", "jan@gmail.com", None),  # the alternate sender is not ours to sign
    ("jan@kowalski.pl", "anna@nowak.pl", None),  # never another tenant's signature
    ("anna@nowak.pl", "anna@nowak.pl", "nowak.pl/ed1"),
])
async def test_the_from_domain_of_the_account_is_signed(tmp_path: Path, user: str, sender: str,
                                                        signed: str | None) -> None:
    records = {
        "sg1._domainkey.kowalski.pl": make_key(tmp_path, "kowalski.pl", "sg1"),
        "sg1._domainkey.kowalski.com.pl": make_key(tmp_path, "kowalski.com.pl", "sg1"),
        "ed1._domainkey.nowak.pl": make_key(tmp_path, "nowak.pl", "ed1", "ed25519"),
    }
    directory = tenants()
    keyring = DkimKeyring.load(tmp_path, directory)
    message = f"From: <{sender}>\r\nTo: a@example.org\r\nSubject: s\r\n\r\nbody\r\n".encode()
    signer = DkimSigner()
    try:
        result = await signer.sign(keyring, directory, client_of(directory, user), message)
    finally:
        signer.close()
    assert result.by == signed
    if signed is None:
        assert result.content == message
    else:
        assert result.content.startswith(b"DKIM-Signature: ")
        assert verify(b"Received: from somewhere\r\n" + result.content, records)


def test_an_unsignable_message_goes_unsigned(tmp_path: Path) -> None:
    make_key(tmp_path, "kowalski.pl", "sg1")
    key = DkimKeyring.load(tmp_path, tenants()).keys["kowalski.pl"]
    broken = b"From: j@kowalski.pl\r\n\x01bad header line\r\n\r\nbody\r\n"
    result = sign_message(broken, key)
    assert result.by is None and result.content == broken
    assert result.skipped is not None and result.skipped.startswith("unsignable message")


def test_a_signature_survives_delivery_line_end_rewriting(tmp_path: Path) -> None:
    """aiosmtplib turns every line end into CRLF on delivery; signing did that first."""
    import re

    value = make_key(tmp_path, "kowalski.pl", "sg1")
    key = DkimKeyring.load(tmp_path, tenants()).keys["kowalski.pl"]
    message = b"From: j@kowalski.pl\nSubject: lf\n\nbare lf\nand a bare\rcr\n" + b"y" * 3000
    signed = sign_message(message, key).content
    delivered = re.sub(rb"(?:\r\n|\n|\r(?!\n))", b"\r\n", signed)  # aiosmtplib's rule
    assert delivered == signed
    assert verify(delivered, {"sg1._domainkey.kowalski.pl": value})
