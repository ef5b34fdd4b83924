"""DKIM keys (SPEC §4): where they live, how they are read, made and published.

A domain (or alias) whose tenant entry has a ``dkim_selector`` is signed with
``{dkim.keys_dir}/{domain}/{selector}.pem``, ``domain`` in A-label form. A
key file is an unencrypted PEM private key, RSA (PKCS#1 or PKCS#8, at least
1024 bits) or Ed25519 (PKCS#8), as ``sendguard dkim keygen`` writes it or
``openssl genpkey`` makes it.

Reading a key proves it by signing and verifying a test digest: a full RSA
key check (primality of p and q) costs ~70 ms here, too slow for thousands
of domains at every reload, while a damaged key is caught by the round
trip in well under a millisecond. :func:`check_dkim_keys` is what
``check-config`` runs; workers read the same keys with :func:`read_signing_key`.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from cluster.names import BadDomain, to_alabel
from cluster.settings import Settings
from cluster.tenants import TenantDirectory, selector_ok
from cluster.validate import ConfigError

RSA = "rsa"
ED25519 = "ed25519"
RSA_SHA256 = b"rsa-sha256"
ED25519_SHA256 = b"ed25519-sha256"
MIN_RSA_BITS = 1024  # RFC 8301: verifiers ignore smaller keys
MAX_RSA_BITS = 4096
DEFAULT_RSA_BITS = 2048
TXT_STRING_MAX = 255  # one character-string of a TXT record (RFC 1035 §3.3)
_PROBE = b"sendguard dkim key probe"


class DkimKeyError(Exception):
    """A key file that cannot be used; str() says why, without the path."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key ready for dkimpy: ``secret`` is a PKCS#1 PEM (RSA) or the
    base64 Ed25519 seed, the two forms its ``sign()`` takes."""

    domain: str
    selector: str
    algorithm: bytes
    secret: bytes = b""
    path: Path = Path()

    @property
    def label(self) -> str:
        return f"{self.domain}/{self.selector}"


def key_path(keys_dir: Path, domain: str, selector: str) -> Path:
    return keys_dir / domain / f"{selector}.pem"


def record_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


def wanted_keys(tenants: TenantDirectory) -> Iterator[tuple[str, str, str]]:
    """(tenant domain, signing domain, selector) for every domain and alias to sign."""
    for domain in tenants.domains.values():
        if domain.dkim_selector is None:
            continue
        for name in (domain.name, *sorted(domain.aliases)):
            yield domain.name, name, domain.dkim_selector


def read_signing_key(path: Path, domain: str, selector: str) -> SigningKey:
    """Raises DkimKeyError (missing, unreadable, not a key, wrong kind, too small, damaged)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DkimKeyError("cannot be read: no such file") from None
    except OSError as exc:
        raise DkimKeyError(f"cannot be read: {exc.strerror}") from None
    try:
        # The round trip below proves the key; the library's full RSA check
        # would cost ~70 ms per key (see the module docstring).
        key = serialization.load_pem_private_key(blob, password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except TypeError:
        raise DkimKeyError("is encrypted: sendguard needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimKeyError("is not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"is a {key.key_size}-bit RSA key: at least {MIN_RSA_BITS} "
                               "bits are needed")
        _probe_rsa(key)
        secret = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption())
        return SigningKey(domain, selector, RSA_SHA256, secret, path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return SigningKey(domain, selector, ED25519_SHA256, base64.b64encode(seed), path)
    raise DkimKeyError("is neither an RSA nor an Ed25519 key (the two DKIM signs with)")


def _probe_rsa(key: rsa.RSAPrivateKey) -> None:
    try:
        signature = key.sign(_PROBE, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(signature, _PROBE, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise DkimKeyError("is damaged: a test signature does not verify") from None


def check_dkim_keys(settings: Settings, tenants: TenantDirectory) -> None:
    """Every configured key can sign, or ConfigError naming the tenant's selector."""
    for owner, domain, selector in wanted_keys(tenants):
        path = key_path(settings.dkim.keys_dir, domain, selector)
        try:
            read_signing_key(path, domain, selector)
        except DkimKeyError as exc:
            alias = f" (alias {domain})" if domain != owner else ""
            raise ConfigError(settings.tenants_file, f'domains."{owner}".dkim_selector',
                              f"key file {path}{alias} {exc}", selector) from None


# -- keygen -------------------------------------------------------------------------

def generate_key(kind: str = RSA, bits: int = DEFAULT_RSA_BITS) -> tuple[bytes, str]:
    """A new private key as PEM and its public half as the record's ``k=`` and ``p=``."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == RSA:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    elif kind == ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    else:
        raise ValueError(f"unknown key type {kind!r}")
    return pem, record_value(private)


def record_value(private: Any) -> str:
    """``v=DKIM1; k=...; p=...`` for a private key (RFC 6376 §3.6.1, RFC 8463 §4.2)."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    raise ValueError(f"no DKIM record for a {type(public).__name__}")


def zone_line(domain: str, selector: str, value: str) -> str:
    """The TXT record as a zone-file line, split into strings of at most 255 characters."""
    chunks = [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    strings = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{record_name(domain, selector)}. IN TXT {strings}"


def write_key(path: Path, pem: bytes) -> None:
    """Folders created 0700 and the file 0600, with those modes from the start (never
    readable by others in between); refuses to replace a key: rotating means a new
    selector."""
    for folder in (path.parent.parent, path.parent):
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def key_record(path: Path) -> str:
    """The record value of an existing key file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None,
                                                 unsafe_skip_rsa_key_validation=True)
    except OSError as exc:
        raise DkimKeyError(f"cannot be read: {exc.strerror}") from None
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise DkimKeyError("is not an unencrypted PEM private key") from None
    try:
        return record_value(key)
    except ValueError as exc:
        raise DkimKeyError(str(exc)) from None


# -- command line -------------------------------------------------------------------

def add_parser(commands: Any, name: str, config_arg: Any) -> None:
    dkim = commands.add_parser(name, help="DKIM signing keys")
    actions = dkim.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    keygen = actions.add_parser("keygen", help="make a key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--type", choices=[RSA, ED25519], default=RSA, dest="key_type")
    keygen.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS,
                        help=f"RSA key size (default {DEFAULT_RSA_BITS})")
    config_arg(keygen)
    record = actions.add_parser("record", help="print the DNS record of an existing key")
    record.add_argument("domain")
    record.add_argument("--selector", required=True)
    config_arg(record)


def run(args: Any) -> int:
    from cluster.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from cluster.settings import load_settings

    try:
        domain = to_alabel(args.domain)
    except BadDomain:
        print(f"sendguard dkim: {args.domain!r} is not a domain name", file=sys.stderr)
        return EXIT_USAGE
    if not selector_ok(args.selector):
        print(f"sendguard dkim: {args.selector!r} is not a selector: a DNS label like "
              '"sg2026"', file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    path = key_path(settings.dkim.keys_dir, domain, args.selector)
    if args.dkim_command == "record":
        try:
            value = key_record(path)
        except DkimKeyError as exc:
            print(f"sendguard dkim: {path} {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(zone_line(domain, args.selector, value))
        return EXIT_OK
    if args.key_type == RSA and not MIN_RSA_BITS <= args.bits <= MAX_RSA_BITS:
        print(f"sendguard dkim: --bits must be between {MIN_RSA_BITS} and {MAX_RSA_BITS} "
              f"(got {args.bits})", file=sys.stderr)
        return EXIT_USAGE
    if path.exists():
        print(f"sendguard dkim: {path} exists; to rotate, make a key under a new selector",
              file=sys.stderr)
        return EXIT_FAILED
    pem, value = generate_key(args.key_type, args.bits)
    try:
        write_key(path, pem)
    except OSError as exc:
        print(f"sendguard dkim: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sendguard dkim: wrote {path}; publish this record, then set "
          f'dkim_selector = "{args.selector}" for {domain}', file=sys.stderr)
    print(zone_line(domain, args.selector, value))
    return EXIT_OK

