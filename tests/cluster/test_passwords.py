from __future__ import annotations

import pytest

from cluster.passwords import (
    SUPPORTED_SCHEMES,
    PasswordSchemeError,
    check_scheme,
    hash_password,
    verify_password,
)

# Low costs keep the suite fast; the formats are the same as at full cost.
FAST_ARGON2 = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
FAST = {
    "ARGON2ID": FAST_ARGON2,
    "ARGON2I": FAST_ARGON2,
    "BLF-CRYPT": {"cost": 4},
    "SHA512-CRYPT": {},
    "PLAIN": {},
}

PASSWORD = "Zażółć gęślą jaźń 42!"

# Made by implementations other than the ones we verify with, for the
# password "correct horse": `openssl passwd -6 -salt Zq8vE1xYk2LmN3pQ`, and
# libxcrypt's crypt(3) with a "$2y$05$" setting (what Dovecot's BLF-CRYPT
# calls).
DOVECOT_SHA512 = (
    "{SHA512-CRYPT}$6$Zq8vE1xYk2LmN3pQ$W8vwF6ax05VWXopW34Z6aIde01U/1q9WLqUoBpluiAnsx"
    "SflCNjIxX8yT6epA7rX.1yG.YBcJJxK.vRH6rjh7."
)
DOVECOT_BLF = "{BLF-CRYPT}$2y$05$Hk3Zt9QwLp2xVb7NcRm4JeXDYw1TVOeasc0QxP26kueR9TaVXjwMu"
# The encoded example from the Argon2 reference implementation's README
# (password "password", salt "somesalt").
REFERENCE_ARGON2I = (
    "{ARGON2I}$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"
)

SUPPORTED = "ARGON2ID, ARGON2I, BLF-CRYPT, SHA512-CRYPT, PLAIN"


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {scheme: hash_password(PASSWORD, scheme, **FAST[scheme]) for scheme in FAST}


def test_every_supported_scheme_has_fast_settings() -> None:
    assert set(FAST) == set(SUPPORTED_SCHEMES)


@pytest.mark.parametrize("scheme", SUPPORTED_SCHEMES)
def test_hash_then_verify(hashes: dict[str, str], scheme: str) -> None:
    stored = hashes[scheme]
    assert stored.startswith("{" + scheme + "}")
    check_scheme(stored)
    assert verify_password(stored, PASSWORD) is True
    assert verify_password(stored, PASSWORD + " ") is False
    assert verify_password(stored, PASSWORD.upper()) is False
    assert verify_password(stored, "") is False


@pytest.mark.parametrize("scheme", SUPPORTED_SCHEMES)
def test_password_with_nul_or_unencodable_never_verifies(scheme: str) -> None:
    stored = hash_password("abc", scheme, **FAST[scheme])
    assert verify_password(stored, "abc\0") is False
    assert verify_password(stored, "abc\0def") is False
    assert verify_password(stored, "abc\udc80") is False


@pytest.mark.parametrize(
    ("stored", "password"),
    [
        (DOVECOT_SHA512, "correct horse"),
        (DOVECOT_BLF, "correct horse"),
        (REFERENCE_ARGON2I, "password"),
    ],
)
def test_hashes_from_other_implementations(stored: str, password: str) -> None:
    check_scheme(stored)
    assert verify_password(stored, password) is True
    assert verify_password(stored, password.capitalize()) is False


def test_scheme_name_is_case_insensitive() -> None:
    stored = DOVECOT_SHA512.replace("{SHA512-CRYPT}", "{sha512-crypt}")
    check_scheme(stored)
    assert verify_password(stored, "correct horse") is True


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_prefixes(prefix: str) -> None:
    stored = DOVECOT_BLF.replace("$2y$", prefix, 1)
    assert verify_password(stored, "correct horse") is True


def test_bcrypt_is_written_as_2y() -> None:
    assert hash_password("x", "BLF-CRYPT", cost=4).startswith("{BLF-CRYPT}$2y$04$")


def test_bcrypt_default_cost_is_12() -> None:
    assert hash_password("x", "BLF-CRYPT").startswith("{BLF-CRYPT}$2y$12$")


def test_bcrypt_looks_at_72_bytes_like_dovecot() -> None:
    stored = hash_password("a" * 72, "BLF-CRYPT", cost=4)
    assert verify_password(stored, "a" * 72 + "ignored") is True
    assert verify_password(stored, "a" * 71) is False


def test_bcrypt_refuses_to_hash_more_than_72_bytes() -> None:
    with pytest.raises(ValueError, match="first 72 bytes"):
        hash_password("a" * 73, "BLF-CRYPT", cost=4)


def test_sha512_salt_is_random() -> None:
    first = hash_password("x", "SHA512-CRYPT")
    second = hash_password("x", "SHA512-CRYPT")
    assert first != second
    assert first.startswith("{SHA512-CRYPT}$6$")
    assert len(first.split("$")[2]) == 16


def test_argon2_defaults() -> None:
    assert hash_password("x").startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$")


def test_argon2_costs_are_applied() -> None:
    assert "$m=8,t=1,p=1$" in hash_password("x", "ARGON2ID", **FAST_ARGON2)


def test_hash_password_accepts_lower_case_and_braces() -> None:
    assert hash_password("x", "plain") == "{PLAIN}x"
    assert hash_password("x", "{PLAIN}") == "{PLAIN}x"


def test_plain_compares_non_ascii() -> None:
    # hmac.compare_digest on str rejects non-ASCII; the module compares bytes.
    assert verify_password("{PLAIN}hasło", "hasło") is True
    assert verify_password("{PLAIN}hasło", "haslo") is False


ARGON2_EXPECTED = "expected ${v}$v=19$m=...,t=...,p=...$<salt>$<hash>"


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ("$6$abc$def", f"password has no {{SCHEME}} prefix; supported schemes: {SUPPORTED}"),
        ("", f"password has no {{SCHEME}} prefix; supported schemes: {SUPPORTED}"),
        ("{MD5}$1$abc$def", f"unknown password scheme {{MD5}}; supported schemes: {SUPPORTED}"),
        ("{}secret", f"unknown password scheme {{}}; supported schemes: {SUPPORTED}"),
        ("{PLAIN}", "empty {PLAIN} password"),
        (
            "{ARGON2ID}$argon2i$v=19$m=8,t=1,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
            "malformed {ARGON2ID} hash: " + ARGON2_EXPECTED.format(v="argon2id"),
        ),
        (
            "{ARGON2I}$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJOb",
            "malformed {ARGON2I} hash: "
            + ARGON2_EXPECTED.format(v="argon2i")
            + " in unpadded base64",
        ),
        (
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ",
            "malformed {ARGON2ID} hash: " + ARGON2_EXPECTED.format(v="argon2id"),
        ),
        (
            "{ARGON2ID}$argon2id$v=19$m=8,t=1,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG",
            "malformed {ARGON2ID} hash: expected t >= 1, p >= 1 and m >= 8 * p",
        ),
        (
            "{BLF-CRYPT}$2y$05$tooshort",
            "malformed {BLF-CRYPT} hash: expected $2y$NN$ (cost 04-31) followed by 53 characters",
        ),
        (
            DOVECOT_BLF.replace("$05$", "$03$"),
            "malformed {BLF-CRYPT} hash: expected $2y$NN$ (cost 04-31) followed by 53 characters",
        ),
        (
            DOVECOT_BLF.replace("$2y$", "$2x$"),
            "malformed {BLF-CRYPT} hash: expected $2y$NN$ (cost 04-31) followed by 53 characters",
        ),
        (
            DOVECOT_SHA512[:-1],
            "malformed {SHA512-CRYPT} hash: expected "
            "$6$[rounds=N$]<salt of up to 16 characters>$<86 characters>",
        ),
        (
            DOVECOT_SHA512.replace("$6$", "$6$rounds=10$"),
            "malformed {SHA512-CRYPT} hash: expected rounds of at least 1000",
        ),
        (
            DOVECOT_SHA512.replace("Zq8v", "Zq:v"),
            "malformed {SHA512-CRYPT} hash: expected "
            "$6$[rounds=N$]<salt of up to 16 characters>$<86 characters>",
        ),
        (
            DOVECOT_BLF.replace("{BLF-CRYPT}", "{SHA512-CRYPT}"),
            "malformed {SHA512-CRYPT} hash: expected "
            "$6$[rounds=N$]<salt of up to 16 characters>$<86 characters>",
        ),
    ],
)
def test_malformed_or_unknown_is_refused(stored: str, message: str) -> None:
    with pytest.raises(PasswordSchemeError) as checked:
        check_scheme(stored)
    assert str(checked.value) == message
    with pytest.raises(PasswordSchemeError) as verified:
        verify_password(stored, "correct horse")
    assert str(verified.value) == message


def test_error_is_a_value_error() -> None:
    assert issubclass(PasswordSchemeError, ValueError)


def test_error_does_not_echo_the_hash() -> None:
    body = "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub"
    with pytest.raises(PasswordSchemeError) as caught:
        check_scheme("{ARGON2ID}" + body + "!")
    assert "RdescudvJCsgt3ub" not in str(caught.value)


def test_hash_password_unknown_scheme() -> None:
    with pytest.raises(PasswordSchemeError, match=r"unknown password scheme 'MD5-CRYPT'"):
        hash_password("x", "MD5-CRYPT")


@pytest.mark.parametrize(
    ("scheme", "options", "message"),
    [
        ("SHA512-CRYPT", {"cost": 4}, "cost applies to BLF-CRYPT only, not SHA512-CRYPT"),
        ("BLF-CRYPT", {"time_cost": 1}, "time_cost applies to Argon2 schemes only, not BLF-CRYPT"),
        ("BLF-CRYPT", {"cost": 3}, "bcrypt cost must be 4-31, got 3"),
    ],
)
def test_hash_password_rejects_options(scheme: str, options: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        hash_password("x", scheme, **options)
    assert str(caught.value) == message


@pytest.mark.parametrize("password", ["", "a\0b"])
def test_hash_password_rejects_unusable_passwords(password: str) -> None:
    with pytest.raises(ValueError):
        hash_password(password, "PLAIN")
