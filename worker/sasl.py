"""SASL PLAIN and LOGIN (RFC 4616, draft-murchison-sasl-login): what the client says.

aiosmtpd's built-in mechanisms drop the PLAIN authorization identity; SPEC
refuses one that names another user, so the exchange is read here and the
verdict is the engine's. Each reader returns the :class:`Credentials`, None
when aiosmtpd has already answered the client (``*`` to abort), or raises
:class:`SaslRefused` for what cannot be read (bad base64, a PLAIN message
without its two NULs, an answer too long), whose reply the handler has the
engine log and send.

Bytes that are not UTF-8 are kept as lone surrogates: such a login names no
account and such a password matches no hash, and neither turns into
another user's name by replacement.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP

BAD_BASE64 = "501 5.5.2 Can't decode base64"
BAD_PLAIN = "501 5.5.2 Can't split auth value"
TOO_LONG = "500 5.5.6 Authentication exchange line is too long"  # RFC 4954 §4


class SaslRefused(Exception):
    """The client's answer cannot be read: ``reply`` is what it gets, ``detail`` why."""

    def __init__(self, reply: str, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Credentials:
    mechanism: str
    login: str
    password: str = ""
    authzid: str = ""

    def __repr__(self) -> str:  # never the password, not even in a debugger's log
        return f"Credentials({self.mechanism}, {self.login!r}, authzid={self.authzid!r})"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


async def _challenge(server: SMTP, challenge: str) -> bytes | None:
    try:
        answer = await server.challenge_auth(challenge)
    except ValueError:  # the answer overran the stream's line limit
        raise SaslRefused(TOO_LONG, "answer longer than a line may be") from None
    return None if answer is MISSING else answer  # type: ignore[return-value]


async def _initial_or_challenge(server: SMTP, args: list[str], challenge: str) -> bytes | None:
    if len(args) == 1:
        return await _challenge(server, challenge)
    try:
        return b64decode(args[1].encode(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslRefused(BAD_BASE64, "initial response is not base64") from None


async def read_plain(server: SMTP, args: list[str]) -> Credentials | None:
    message = await _initial_or_challenge(server, args, "")
    if message is None:
        return None
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslRefused(BAD_PLAIN, "PLAIN message without its two NULs")
    authzid, login, password = parts
    return Credentials("PLAIN", _text(login), _text(password), _text(authzid))


async def read_login(server: SMTP, args: list[str]) -> Credentials | None:
    login = await _initial_or_challenge(server, args, server.AuthLoginUsernameChallenge)
    if login is None:
        return None
    password = await _challenge(server, server.AuthLoginPasswordChallenge)
    if password is None:
        return None
    return Credentials("LOGIN", _text(login), _text(password))
