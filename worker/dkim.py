"""DKIM signing at the end of DATA (SPEC §4), with dkimpy.

The signature is made after the gateway completed the headers and before
the spool write, over the message as delivery will send it: line ends
made CRLF and lines over 998 characters broken by the same function
delivery applies (``worker.delivery.lines.for_delivery``, a fixed point), so
delivery sends exactly the signed bytes. The
trace headers added afterwards are not signed.

d= is the ``From:`` domain when it is the authenticated account's domain or
one of its aliases and that domain has a ``dkim_selector``: a tenant never
gets another tenant's signature, whatever ``policy.from_alignment`` says.

Keys are read with the tenant directory (:class:`DkimKeyring`, one per
snapshot); a key that cannot be used is logged once (when mail from its
domain first needs it), and that mail goes unsigned.

Signing runs on a small thread pool: OpenSSL releases the GIL while it signs
(see :func:`_openssl_rsassa_sign`), so the event loop keeps serving other
sessions meanwhile. ``loadtest/bench_dkim.py`` measures both.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cluster.dkimkeys import DkimKeyError, SigningKey, key_path, read_signing_key, wanted_keys
from cluster.logjson import log_event
from cluster.names import BadDomain, to_alabel
from cluster.tenants import TenantDirectory
from worker.client import Client
from worker.delivery.lines import for_delivery

# Signed when present, and their absence signed when absent (so none can be
# added on the way). From twice: a second From: added later breaks the
# signature instead of passing DMARC with the first. List-Unsubscribe and
# List-Unsubscribe-Post must be signed for one-click unsubscribe (RFC 8058).
SIGNED_HEADERS = (
    b"from", b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to",
    b"cc", b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
    b"references", b"list-unsubscribe", b"list-unsubscribe-post",
)
_HEADER_SCAN_LIMIT = 256 * 1024


# -- keys ---------------------------------------------------------------------------

Stamp = tuple[int, int, int] | None


class _KeyFile:
    """One key file as last read; kept across reloads while the file is unchanged."""

    __slots__ = ("stamp", "key", "problem", "reported")

    def __init__(self, stamp: Stamp, key: SigningKey | None, problem: str) -> None:
        self.stamp = stamp
        self.key = key
        self.problem = problem
        self.reported = False


def _stamp(path: Path) -> Stamp:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class DkimKeyring:
    """The signing keys of one tenant directory, by d= domain (A-label)."""

    def __init__(self, keys: dict[str, SigningKey] | None = None,
                 wanted: dict[str, tuple[str, Path]] | None = None,
                 files: dict[Path, _KeyFile] | None = None) -> None:
        self.keys = keys or {}
        self._wanted = wanted or {}  # signing domain -> (tenant domain, key file)
        self._files = files or {}

    @classmethod
    def load(cls, keys_dir: Path, tenants: TenantDirectory,
             previous: DkimKeyring | None = None) -> DkimKeyring:
        """Reads only what changed since ``previous`` (by mtime, size and inode)."""
        old = previous._files if previous is not None else {}
        keys: dict[str, SigningKey] = {}
        files: dict[Path, _KeyFile] = {}
        wanted: dict[str, tuple[str, Path]] = {}
        for owner, domain, selector in wanted_keys(tenants):
            path = key_path(keys_dir, domain, selector)
            stamp = _stamp(path)
            entry = old.get(path) or files.get(path)
            if entry is None or entry.stamp != stamp:
                entry = _read(path, domain, selector, stamp)
            files[path] = entry
            wanted[domain] = (owner, path)
            if entry.key is not None:
                keys[domain] = entry.key
        return cls(keys, wanted, files)

    @property
    def wanted(self) -> bool:
        """Whether any domain of this directory is to be signed."""
        return bool(self._wanted)

    def get(self, domain: str) -> SigningKey | None:
        return self.keys.get(domain)

    def unavailable(self, domain: str) -> str | None:
        """Why a domain that should be signed cannot be (None: nothing to sign with).

        Logged the first time it matters, once per problem and process: at
        load time a worker may not have its log file yet, and check-config
        lists every problem before a start.
        """
        found = self._wanted.get(domain)
        if found is None:
            return None
        owner, path = found
        entry = self._files[path]
        if entry.key is not None:
            return None
        if not entry.reported:
            entry.reported = True
            log_event("dkim_key_unavailable", logging.ERROR, domain=domain,
                      selector=path.stem, tenant=owner, path=str(path), error=entry.problem,
                      note="mail from this domain goes unsigned")
        return f"key {path} {entry.problem}"


def _read(path: Path, domain: str, selector: str, stamp: Stamp) -> _KeyFile:
    try:
        return _KeyFile(stamp, read_signing_key(path, domain, selector), "")
    except DkimKeyError as exc:
        return _KeyFile(stamp, None, str(exc))


EMPTY_KEYRING = DkimKeyring()


# -- signing ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Signed:
    """The message to queue; ``by`` is ``domain/selector`` when signed, ``skipped``
    why a message that should have been signed was not."""

    content: bytes
    by: str | None = None
    skipped: str | None = None


class DkimSigner:
    def __init__(self, threads: int = 2) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def choose(self, keyring: DkimKeyring, tenants: TenantDirectory, client: Client,
               content: bytes) -> tuple[SigningKey | None, str | None]:
        """The key for this message, or None with why (None when nothing was due)."""
        account = client.account
        if account is None or not keyring.wanted:
            return None, None
        domain = header_from_domain(content)
        if domain is None or domain not in tenants.sender_domains(account):
            return None, None
        key = keyring.get(domain)
        return key, None if key is not None else keyring.unavailable(domain)

    async def sign(self, keyring: DkimKeyring, tenants: TenantDirectory, client: Client,
                   content: bytes) -> Signed:
        key, skipped = self.choose(keyring, tenants, client, content)
        if key is None:
            return Signed(content, skipped=skipped)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="dkim")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, sign_message, content, key)
        except Exception as exc:  # a bug or a message dkimpy cannot parse: send it unsigned
            log_event("dkim_failed", logging.ERROR, sid=client.sid, domain=key.domain,
                      selector=key.selector, error=f"{type(exc).__name__}: {exc}")
            return Signed(content, skipped=f"signing failed: {type(exc).__name__}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def sign_message(content: bytes, key: SigningKey) -> Signed:
    """The deliverable form of ``content`` with its DKIM-Signature header on top."""
    # The delivery side sends exactly this (for_delivery is a fixed point).
    message = for_delivery(content)
    try:
        header = dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                           key.secret, canonicalize=(b"relaxed", b"relaxed"),
                           signature_algorithm=key.algorithm, include_headers=SIGNED_HEADERS)
    except dkim.DKIMException as exc:  # the decision line says why (dkim_skipped)
        return Signed(content, skipped=f"unsignable message: {exc}")
    return Signed(header + message, by=key.label)



def header_from_domain(content: bytes) -> str | None:
    """The A-label domain of the first address in ``From:``, or None."""
    value = _header_value(content, b"from")
    if value is None:
        return None
    for _name, address in email.utils.getaddresses([value]):
        _, at, domain = address.rpartition("@")
        if at and domain:
            try:
                return to_alabel(domain)
            except BadDomain:
                return None
    return None


def _header_value(content: bytes, name: bytes) -> str | None:
    """The first ``name:`` field of the header block, unfolded."""
    head = content[:_HEADER_SCAN_LIMIT]
    value: list[bytes] | None = None
    prefix = name + b":"
    for line in head.splitlines():
        if not line:
            break
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value.append(line)
                continue
            break
        if line[:len(prefix)].lower() == prefix:
            value = [line[len(prefix):]]
    if value is None:
        return None
    return b" ".join(part.strip() for part in value).decode("utf-8", "surrogateescape")


# -- dkimpy's RSA signature, computed by OpenSSL ----------------------------------------

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha1": hashes.SHA1,
}
_PURE_PYTHON_RSASSA = dkim.crypto.RSASSA_PKCS1_v1_5_sign


def _openssl_rsassa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signature (byte for byte: the scheme is
    deterministic), computed by OpenSSL instead of Python integers.

    dkimpy does the private-key operation with ``pow()`` on Python ints:
    ~6 ms for RSA-2048 on this machine, holding the GIL throughout, where
    OpenSSL takes ~0.3 ms and releases the GIL. Everything else (header
    selection, canonicalization, hashing, the header itself) stays dkimpy's.
    """
    algorithm = _HASHES.get(getattr(hash, "name", "").lower())
    if algorithm is None:
        return bytes(_PURE_PYTHON_RSASSA(hash, private_key))
    public = rsa.RSAPublicNumbers(private_key["publicExponent"], private_key["modulus"])
    numbers = rsa.RSAPrivateNumbers(
        private_key["prime1"], private_key["prime2"], private_key["privateExponent"],
        private_key["exponent1"], private_key["exponent2"], private_key["coefficient"], public)
    # Proven when the key file was read (cluster.dkimkeys), not again per message.
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return key.sign(hash.digest(), padding.PKCS1v15(), Prehashed(algorithm()))


def install_openssl_rsa() -> bool:
    """Route dkimpy's RSA signing through OpenSSL; False when this dkimpy has no
    such step to route (it then signs by itself, correctly but slowly)."""
    current = getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)
    if current is _openssl_rsassa_sign:
        return True
    if current is not _PURE_PYTHON_RSASSA:
        return False
    dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsassa_sign
    return True


install_openssl_rsa()
