"""Dovecot-style password scheme hashes: ``{SCHEME}hash``.

Supported schemes: ``{ARGON2ID}``, ``{ARGON2I}``, ``{BLF-CRYPT}`` (bcrypt),
``{SHA512-CRYPT}`` and ``{PLAIN}`` (development only). Scheme names are
case-insensitive, as in Dovecot.

Every function here is blocking and some take hundreds of milliseconds
(Argon2id at Dovecot's defaults ~120 ms, bcrypt cost 12 ~250 ms): call them
from a thread pool, never on the event loop (see ``worker.auth``).

Passwords are compared as their UTF-8 bytes. A password containing NUL
never verifies: C implementations (libxcrypt, Dovecot) stop at the first
NUL, so such a password could match a shorter one elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import re
import secrets
from collections.abc import Callable

import bcrypt
import crypt_r
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import get_default_parameters

__all__ = [
    "SUPPORTED_SCHEMES",
    "PasswordSchemeError",
    "check_scheme",
    "cost_of",
    "decoy_hash",
    "hash_password",
    "verify_password",
]

SUPPORTED_SCHEMES: tuple[str, ...] = ("ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "PLAIN")

DEFAULT_BCRYPT_COST = 12

# bcrypt only ever looks at the first 72 bytes of a password.
_BCRYPT_MAX_BYTES = 72

_SCHEME_RE = re.compile(r"\{([^{}]*)\}(.*)", re.DOTALL)
_ARGON2_RE = re.compile(
    r"\$(argon2id|argon2i)\$(?:v=\d+\$)?m=\d+,t=\d+,p=\d+\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# libxcrypt refuses ':' and whitespace in a salt and rounds outside this range
# (it returns a failure token rather than clamping as old glibc did).
_SHA512_RE = re.compile(r"\$6\$(?:rounds=(\d{1,9})\$)?[^$:\s]{0,16}\$[./A-Za-z0-9]{86}")
_SHA512_MIN_ROUNDS = 1000
_CRYPT_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Verification reads every parameter from the hash itself; the instance is
# stateless and safe to share between threads.
_ARGON2_VERIFIER = PasswordHasher()


class PasswordSchemeError(ValueError):
    """A stored password has no, an unknown, or a malformed scheme hash."""


def _supported() -> str:
    return ", ".join(SUPPORTED_SCHEMES)


def _split(stored: str) -> tuple[str, str]:
    match = _SCHEME_RE.fullmatch(stored)
    if match is None:
        raise PasswordSchemeError(
            f"password has no {{SCHEME}} prefix; supported schemes: {_supported()}"
        )
    scheme = match.group(1).upper()
    if scheme not in SUPPORTED_SCHEMES:
        raise PasswordSchemeError(
            f"unknown password scheme {{{match.group(1)[:40]}}}; supported schemes: {_supported()}"
        )
    return scheme, match.group(2)


def _malformed(scheme: str, expected: str) -> PasswordSchemeError:
    # The hash itself stays out of the message: for {PLAIN} it is the password.
    return PasswordSchemeError(f"malformed {{{scheme}}} hash: expected {expected}")


def _is_canonical_b64(text: str) -> bool:
    # libargon2 rejects non-canonical base64 (stray bits in the last
    # character), which a truncated or hand-edited hash typically has.
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return False
    return base64.b64encode(raw).decode("ascii").rstrip("=") == text


def _check_argon2(scheme: str, body: str) -> None:
    variant = scheme.lower()
    expected = f"${variant}$v=19$m=...,t=...,p=...$<salt>$<hash>"
    match = _ARGON2_RE.fullmatch(body)
    if match is None or match.group(1) != variant:
        raise _malformed(scheme, expected)
    if not (_is_canonical_b64(match.group(2)) and _is_canonical_b64(match.group(3))):
        raise _malformed(scheme, expected + " in unpadded base64")
    try:
        params = extract_parameters(body)
    except InvalidHashError:
        raise _malformed(scheme, expected) from None
    p = params.parallelism
    if params.time_cost < 1 or p < 1 or params.memory_cost < 8 * p:
        raise _malformed(scheme, "t >= 1, p >= 1 and m >= 8 * p")


def _check_bcrypt(scheme: str, body: str) -> None:
    match = _BCRYPT_RE.fullmatch(body)
    if match is None or not 4 <= int(match.group(1)) <= 31:
        raise _malformed(scheme, "$2y$NN$ (cost 04-31) followed by 53 characters")


def _check_sha512(scheme: str, body: str) -> None:
    match = _SHA512_RE.fullmatch(body)
    expected = "$6$[rounds=N$]<salt of up to 16 characters>$<86 characters>"
    if match is None:
        raise _malformed(scheme, expected)
    if match.group(1) is not None and int(match.group(1)) < _SHA512_MIN_ROUNDS:
        raise _malformed(scheme, f"rounds of at least {_SHA512_MIN_ROUNDS}")


def _check_plain(scheme: str, body: str) -> None:
    if not body:
        raise PasswordSchemeError(f"empty {{{scheme}}} password")


def _verify_argon2(body: str, password: bytes) -> bool:
    try:
        return _ARGON2_VERIFIER.verify(body, password)
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError) as exc:
        raise PasswordSchemeError(f"malformed Argon2 hash: {exc or 'decoding failed'}") from None


def _verify_bcrypt(body: str, password: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_BYTES], body.encode("ascii"))
    except ValueError as exc:
        raise PasswordSchemeError(f"malformed {{BLF-CRYPT}} hash: {exc}") from None


def _verify_sha512(body: str, password: bytes) -> bool:
    result = crypt_r.crypt(password.decode("utf-8"), body)
    if result is None or not result.startswith("$6$"):
        # libxcrypt answers "*0"/"*1" for a setting it refuses.
        raise PasswordSchemeError("malformed {SHA512-CRYPT} hash: refused by crypt(3)")
    return hmac.compare_digest(result.encode("ascii"), body.encode("ascii"))


def _verify_plain(body: str, password: bytes) -> bool:
    # compare_digest on str accepts ASCII only; bytes work for any password.
    return hmac.compare_digest(body.encode("utf-8"), password)


_Scheme = tuple[Callable[[str, str], None], Callable[[str, bytes], bool]]

_SCHEMES: dict[str, _Scheme] = {
    "ARGON2ID": (_check_argon2, _verify_argon2),
    "ARGON2I": (_check_argon2, _verify_argon2),
    "BLF-CRYPT": (_check_bcrypt, _verify_bcrypt),
    "SHA512-CRYPT": (_check_sha512, _verify_sha512),
    "PLAIN": (_check_plain, _verify_plain),
}


def _password_bytes(password: str) -> bytes | None:
    if "\0" in password:
        return None
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


def check_scheme(stored: str) -> None:
    """Raise PasswordSchemeError unless ``stored`` is a well-formed supported hash.

    Cheap (no hashing): meant for validating configuration at load time.
    """
    scheme, body = _split(stored)
    _SCHEMES[scheme][0](scheme, body)


def verify_password(stored: str, password: str) -> bool:
    """Return whether ``password`` matches the ``{SCHEME}hash`` in ``stored``.

    Raises PasswordSchemeError for an unknown scheme or a malformed hash, so
    a broken account entry is not mistaken for a wrong password.
    """
    scheme, body = _split(stored)
    check, verify = _SCHEMES[scheme]
    check(scheme, body)
    raw = _password_bytes(password)
    if raw is None:
        return False
    return verify(body, raw)


def hash_password(
    password: str,
    scheme: str = "ARGON2ID",
    *,
    cost: int | None = None,
    time_cost: int | None = None,
    memory_cost: int | None = None,
    parallelism: int | None = None,
) -> str:
    """Hash ``password`` as ``{SCHEME}...``, the form the configuration stores.

    ``cost`` is bcrypt's log2 work factor (default 12) and applies to
    BLF-CRYPT only. ``time_cost``, ``memory_cost`` (KiB) and ``parallelism``
    override argon2-cffi's defaults and apply to the Argon2 schemes only.
    BLF-CRYPT is written as ``$2y$``, as Dovecot writes it.
    """
    name = scheme.strip().strip("{}").upper()
    if name not in SUPPORTED_SCHEMES:
        raise PasswordSchemeError(
            f"unknown password scheme {scheme[:40]!r}; supported schemes: {_supported()}"
        )
    if not password:
        raise ValueError("password is empty")
    raw = _password_bytes(password)
    if raw is None:
        raise ValueError("password contains NUL or cannot be encoded as UTF-8")
    argon2_options = {
        "time_cost": time_cost,
        "memory_cost": memory_cost,
        "parallelism": parallelism,
    }
    given_argon2 = {key: value for key, value in argon2_options.items() if value is not None}
    if cost is not None and name != "BLF-CRYPT":
        raise ValueError(f"cost applies to BLF-CRYPT only, not {name}")
    if given_argon2 and name not in ("ARGON2ID", "ARGON2I"):
        raise ValueError(f"{', '.join(given_argon2)} applies to Argon2 schemes only, not {name}")

    if name in ("ARGON2ID", "ARGON2I"):
        argon2_type = Type.ID if name == "ARGON2ID" else Type.I
        params = dataclasses.replace(get_default_parameters(), type=argon2_type, **given_argon2)
        body = PasswordHasher.from_parameters(params).hash(raw)
    elif name == "BLF-CRYPT":
        if len(raw) > _BCRYPT_MAX_BYTES:
            raise ValueError(
                f"BLF-CRYPT uses only the first {_BCRYPT_MAX_BYTES} bytes of a password; "
                "use ARGON2ID for longer passwords"
            )
        rounds = DEFAULT_BCRYPT_COST if cost is None else cost
        if not 4 <= rounds <= 31:
            raise ValueError(f"bcrypt cost must be 4-31, got {rounds}")
        hashed = bcrypt.hashpw(raw, bcrypt.gensalt(rounds)).decode("ascii")
        # $2b$ and $2y$ are the same algorithm for passwords of at most 72
        # bytes; $2y$ is what Dovecot and PHP write and every reader accepts.
        body = "$2y$" + hashed[4:]
    elif name == "SHA512-CRYPT":
        salt = "".join(secrets.choice(_CRYPT_SALT_CHARS) for _ in range(16))
        result = crypt_r.crypt(password, f"$6${salt}")
        if result is None or not result.startswith("$6$"):
            raise RuntimeError("crypt(3) does not support SHA512-CRYPT on this system")
        body = result
    else:
        body = password
    return f"{{{name}}}{body}"


def cost_of(stored: str) -> str:
    """The scheme and work factor of ``stored``, e.g. ``"ARGON2ID m=65536,t=3,p=4"``.

    Two hashes with the same answer cost the same to verify. Cheap (no
    hashing); ``""`` for a hash that is not well formed.
    """
    try:
        scheme, body = _split(stored)
        _SCHEMES[scheme][0](scheme, body)
    except PasswordSchemeError:
        return ""
    if scheme in ("ARGON2ID", "ARGON2I"):
        p = extract_parameters(body)
        return f"{scheme} m={p.memory_cost},t={p.time_cost},p={p.parallelism},l={p.hash_len}"
    if scheme == "BLF-CRYPT":
        return f"{scheme} {body[4:6]}"
    if scheme == "SHA512-CRYPT":
        match = _SHA512_RE.fullmatch(body)
        assert match is not None
        return f"{scheme} rounds={match.group(1) or 5000}"
    return scheme


def decoy_hash(like: str) -> str:
    """A hash of a random password with the scheme and cost of ``like`` (blocking).

    Verifying a login of an unknown user against it costs what verifying a
    real account of that kind costs, so neither the reply nor its timing
    says whether the account exists.
    """
    scheme, body = _split(like)
    _SCHEMES[scheme][0](scheme, body)
    password = secrets.token_urlsafe(24)
    if scheme in ("ARGON2ID", "ARGON2I"):
        params = extract_parameters(body)
        return f"{{{scheme}}}" + PasswordHasher.from_parameters(params).hash(password)
    if scheme == "BLF-CRYPT":
        return hash_password(password, scheme, cost=int(body[4:6]))
    if scheme == "SHA512-CRYPT":
        match = _SHA512_RE.fullmatch(body)
        assert match is not None
        salt = "".join(secrets.choice(_CRYPT_SALT_CHARS) for _ in range(16))
        rounds = f"rounds={match.group(1)}$" if match.group(1) else ""
        result = crypt_r.crypt(password, f"$6${rounds}{salt}")
        if result is None or not result.startswith("$6$"):
            raise PasswordSchemeError("malformed {SHA512-CRYPT} hash: refused by crypt(3)")
        return f"{{{scheme}}}{result}"
    return f"{{{scheme}}}{password}"
