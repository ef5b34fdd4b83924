"""DKIM keys: ``sendguard dkim keygen|record``, reading key files, and check-config."""

from __future__ import annotations

import base64
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cluster.dkimkeys import (
    ED25519_SHA256,
    RSA_SHA256,
    DkimKeyError,
    read_signing_key,
    zone_line,
)

ROOT = Path(__file__).resolve().parents[2]
TENANTS = """
[domains."kowalski.pl"]
aliases = ["kowalski.com.pl"]
dkim_selector = "sg1"

[domains."nowak.pl"]
"""
# 512 bits: too small to sign with (RFC 8301), and too small for cryptography to make.
SMALL_RSA = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBPAIBAAJBAMjDAmmjwk9dd7hspT9IGCkGiYlNLzWUdRj3gGD+itZs0CySjgHE
Te0YJNWC8ZhuQiRqTaNKUYYxhFVJIfHKfBECAwEAAQJBAKc8k0juylGUmcM+ddUm
OEIMmQuQCVCHz5exrPafc4Yz+YmtNG0Z0Vx1LEpJmzQfnqCDR9IZHfFgn/ZofCcz
w3ECIQD3Ckk/r2/YxH/1EJqJFkmHymIXLNM5PF3visLqdPGePQIhANALCcyLmAXY
Dd59AhRdpdyPIi9WiCBDMXe7UKFOgiZlAiA51NCc9gbq6eVCi2aB3RPNlBUuc7Hm
3jjnUMaceE/vyQIhAKk8UXxTEheu6ZlTl515kLMavHRFr/aOsm7zsWOGudkBAiEA
10y9xcxpDLdmfYz+Yr1HvrZoubADBSgGLt/wtuI5/p4=
-----END RSA PRIVATE KEY-----
"""


def sendguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "tenants.toml").write_text(TENANTS)
    path = tmp_path / "sendguard.toml"
    path.write_text('[tenants]\nfile = "tenants.toml"\n[dkim]\nkeys_dir = "keys"\n')
    return path


def txt_value(line: str) -> str:
    """What a resolver hands back for the printed record: its strings joined."""
    return "".join(re.findall(r'"([^"]*)"', line))


def test_keygen_writes_a_private_rsa_key_and_prints_its_record(config: Path) -> None:
    done = sendguard("dkim", "keygen", "Kowalski.PL", "--selector", "sg1", "-c", str(config))
    assert done.returncode == 0, done.stderr
    path = config.parent / "keys" / "kowalski.pl" / "sg1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048

    line = done.stdout.strip()
    assert "\n" not in line
    assert line.startswith('sg1._domainkey.kowalski.pl. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    public = base64.b64decode(txt_value(line).split("p=", 1)[1])
    assert public == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert str(path) in done.stderr

    again = sendguard("dkim", "record", "kowalski.pl", "--selector", "sg1", "-c", str(config))
    assert (again.returncode, again.stdout.strip()) == (0, line)


def test_keygen_ed25519(config: Path) -> None:
    done = sendguard("dkim", "keygen", "nowak.pl", "--selector", "ed1", "--type", "ed25519",
                     "-c", str(config))
    assert done.returncode == 0, done.stderr
    key = serialization.load_pem_private_key(
        (config.parent / "keys" / "nowak.pl" / "ed1.pem").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    value = txt_value(done.stdout)
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    assert base64.b64decode(value.split("p=", 1)[1]) == key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_keygen_never_replaces_a_key(config: Path) -> None:
    assert sendguard("dkim", "keygen", "nowak.pl", "--selector", "a", "--type", "ed25519",
                     "-c", str(config)).returncode == 0
    path = config.parent / "keys" / "nowak.pl" / "a.pem"
    before = path.read_bytes()
    done = sendguard("dkim", "keygen", "nowak.pl", "--selector", "a", "-c", str(config))
    assert done.returncode == 1
    assert done.stderr.strip() == (f"sendguard dkim: {path} exists; to rotate, make a key "
                                   "under a new selector")
    assert path.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["nowak.pl", "--selector", "../x"],
     "sendguard dkim: '../x' is not a selector: a DNS label like \"sg2026\""),
    (["nowak..pl", "--selector", "s"], "sendguard dkim: 'nowak..pl' is not a domain name"),
    (["nowak.pl", "--selector", "s", "--bits", "512"],
     "sendguard dkim: --bits must be between 1024 and 4096 (got 512)"),
])
def test_keygen_bad_usage(config: Path, args: list[str], message: str) -> None:
    done = sendguard("dkim", "keygen", *args, "-c", str(config))
    assert (done.returncode, done.stderr.strip()) == (2, message)


def test_a_long_record_is_split_into_strings_of_255(config: Path) -> None:
    line = zone_line("example.pl", "s", "v=DKIM1; k=rsa; p=" + "A" * 700)
    strings = re.findall(r'"([^"]*)"', line)
    assert [len(s) for s in strings] == [255, 255, 208]
    assert txt_value(line) == "v=DKIM1; k=rsa; p=" + "A" * 700


def write_pem(path: Path, key: object, fmt: serialization.PrivateFormat,
              encryption: serialization.KeySerializationEncryption | None = None) -> Path:
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption()))
    return path


def test_keys_in_either_pem_layout_are_read(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        signing = read_signing_key(write_pem(tmp_path / "k.pem", key, fmt), "a.pl", "s")
        assert signing.algorithm == RSA_SHA256 and signing.secret.startswith(
            b"-----BEGIN RSA PRIVATE KEY-----")  # the layout dkimpy parses
    ed = ed25519.Ed25519PrivateKey.generate()
    signing = read_signing_key(write_pem(tmp_path / "e.pem", ed,
                                         serialization.PrivateFormat.PKCS8), "a.pl", "s")
    assert signing.algorithm == ED25519_SHA256
    assert base64.b64decode(signing.secret) == ed.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())


def damaged_key() -> rsa.RSAPrivateKey:
    good = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_numbers()
    # Every private exponent off: OpenSSL redoes a CRT result that fails its own
    # check with d, so only a wrong d as well yields a wrong signature.
    wrong = rsa.RSAPrivateNumbers(good.p, good.q, good.d + 2, good.dmp1 + 2, good.dmq1 + 2,
                                  good.iqmp, good.public_numbers)
    return wrong.private_key(unsafe_skip_rsa_key_validation=True)


@pytest.mark.parametrize("make, problem", [
    (lambda p: p, "cannot be read: no such file"),
    (lambda p: p.write_bytes(b"not a key\n") and p, "is not a PEM private key"),
    (lambda p: write_pem(p, ed25519.Ed25519PrivateKey.generate(),
                         serialization.PrivateFormat.PKCS8,
                         serialization.BestAvailableEncryption(b"secret")),
     "is encrypted: sendguard needs an unencrypted key"),
    (lambda p: p.write_bytes(SMALL_RSA) and p,
     "is a 512-bit RSA key: at least 1024 bits are needed"),
    (lambda p: write_pem(p, ec.generate_private_key(ec.SECP256R1()),
                         serialization.PrivateFormat.PKCS8),
     "is neither an RSA nor an Ed25519 key (the two DKIM signs with)"),
    (lambda p: write_pem(p, damaged_key(), serialization.PrivateFormat.TraditionalOpenSSL),
     "is damaged: a test signature does not verify"),
])
def test_unusable_keys_say_why(tmp_path: Path, make: object, problem: str) -> None:
    path = make(tmp_path / "k.pem")  # type: ignore[operator]
    with pytest.raises(DkimKeyError) as caught:
        read_signing_key(tmp_path / "k.pem", "a.pl", "s")
    assert str(caught.value) == problem
    assert path is not None


def test_check_config_loads_every_key_and_names_the_missing_one(config: Path) -> None:
    for domain in ("kowalski.pl", "kowalski.com.pl"):
        assert sendguard("dkim", "keygen", domain, "--selector", "sg1", "--type", "ed25519",
                         "-c", str(config)).returncode == 0
    done = sendguard("check-config", "-c", str(config))
    assert (done.returncode, done.stdout.strip()) == (0, f"{config}: ok"), done.stderr

    alias_key = config.parent / "keys" / "kowalski.com.pl" / "sg1.pem"
    alias_key.unlink()
    done = sendguard("check-config", "-c", str(config))
    assert done.returncode == 2
    assert done.stderr == (
        f'{config.parent / "tenants.toml"}: domains."kowalski.pl".dkim_selector: key file '
        f'{alias_key} (alias kowalski.com.pl) cannot be read: no such file (got "sg1")\n')
