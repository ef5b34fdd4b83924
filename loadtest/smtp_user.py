"""An SMTP submission user for Locust: one session per task, one request event per step.

The steps reported are ``connect`` (TCP, banner, EHLO, and STARTTLS with its
second EHLO when used), ``AUTH``, ``MAIL``, ``RCPT`` and ``DATA``, under the
request type ``SMTP``. A step whose reply is not the success reply fails
with :class:`SmtpReplyError`, whose text is the reply with the session id
written ``{sid}`` ("550 5.1.0 {sid} policy violation", so Locust's failure
table counts refusals by kind); a broken connection fails the step it broke
with the exception.
Every event carries a context (session id from the banner, account, source
address, message token) so a listener can match replies with what a sink
received.

Locust gevent-patches the process when it is imported, so this module is
only ever imported in a process of its own (the ``locust`` command, or the
Locust half of a scenario), never next to an asyncio server.
"""

from __future__ import annotations

import base64
import csv
import ipaddress
import itertools
import random
import re
import secrets
import smtplib
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust import User, constant, task

REQUEST_TYPE = "SMTP"
TLS_MODES = ("none", "starttls", "implicit")
TOKEN_HEADER = "X-Load-Token"
# The session id is the last word of a sendguard banner (SPEC §1); other servers have none.
_SID = re.compile(r"ESMTP sendguard ([A-Za-z0-9]{22})\s*$")
# Tokens stay unique when several Locust processes feed one sink.
_RUN = secrets.token_hex(3)
_FILLER = b"The quarterly report is attached as we agreed on the phone call.\r\n"


class SmtpReplyError(Exception):
    """A reply other than the step's success reply; ``str()`` is the reply as sent."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    sender: str

    @property
    def authenticates(self) -> bool:
        return bool(self.user and self.password)


def read_accounts(path: str | Path) -> list[Account]:
    """CSV lines ``user,password[,sender]``; the sender defaults to the user."""
    accounts = []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            fields = [field.strip() for field in row]
            if not fields or not fields[0] or fields[0].startswith("#"):
                continue
            if len(fields) not in (2, 3):
                raise ValueError(f"{path}:{number}: expected user,password[,sender] "
                                 f"(got {len(fields)} fields)")
            sender = fields[2] if len(fields) == 3 and fields[2] else fields[0]
            accounts.append(Account(fields[0], fields[1], sender))
    if not accounts:
        raise ValueError(f"{path}: no accounts")
    return accounts


def address_range(text: str) -> list[str]:
    """``127.0.0.2-127.0.0.120`` (or one address) as the list of its addresses."""
    first, _, last = text.partition("-")
    start = ipaddress.ip_address(first.strip())
    end = ipaddress.ip_address(last.strip()) if last else start
    if start.version != end.version or int(end) < int(start):
        raise ValueError(f"not an address range: {text!r}")
    if int(end) - int(start) >= 65536:
        raise ValueError(f"address range too large: {text!r}")
    return [str(ipaddress.ip_address(value)) for value in range(int(start), int(end) + 1)]


def parse_host(host: str | None) -> tuple[str, int]:
    """``smtp://HOST:PORT`` (port 587 when omitted) as (host, port)."""
    if not host:
        raise ValueError("no host: pass --host smtp://HOST:PORT")
    parts = urlsplit(host if "://" in host else f"smtp://{host}")
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(f"not an smtp:// address: {host!r}")
    return parts.hostname, parts.port or (465 if parts.scheme == "smtps" else 587)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def make_message(sender: str, recipient: str, token: str, size: int) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: load test {token}\r\n"
            f"Message-ID: <{token}@loadtest.invalid>\r\n{TOKEN_HEADER}: {token}\r\n\r\n"
            ).encode()
    body = (_FILLER * (size // len(_FILLER) + 1))[: max(0, size - len(head))]
    return head + body


_user_numbers = itertools.count()
_class_numbers: dict[type, itertools.count[int]] = {}


class SmtpUser(User):
    """Sends ``messages_per_session`` messages per session, as fast as replies come.

    Subclasses set the class attributes (the locustfile does it from its
    command-line options). Source addresses are spread over users; accounts
    rotate per session, so every account is used from many connections.
    """

    abstract = True
    wait_time = constant(0)
    accounts: list[Account] = []
    source_ips: list[str] = []
    rcpt_domain = "example.org"
    tls = "starttls"
    messages_per_session = 1
    message_size = 1024
    timeout = 60.0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.number = next(_user_numbers)  # unique in this process: message tokens
        # Counted per class, so each class spreads over all of its own addresses.
        self.index = next(_class_numbers.setdefault(type(self), itertools.count()))
        self.endpoint = parse_host(self.host)
        self.source = self.source_ips[self.index % len(self.source_ips)] \
            if self.source_ips else None
        self.sessions = 0
        self.sent = 0
        self._context = ssl.create_default_context()
        self._context.check_hostname = False
        self._context.verify_mode = ssl.CERT_NONE

    def account(self) -> Account:
        if not self.accounts:
            return Account("", "", f"loadtest@{self.rcpt_domain}")
        return self.accounts[(self.index + self.sessions) % len(self.accounts)]

    @task
    def session(self) -> None:
        account = self.account()
        self.sessions += 1
        SmtpSession(self, account).run()


class SmtpSession:
    """One connection of one user; reports each step to the user's environment."""

    def __init__(self, user: SmtpUser, account: Account) -> None:
        self.user = user
        self.account = account
        self.sid = ""
        self.client: smtplib.SMTP | None = None

    def run(self) -> None:
        try:
            if not self._connect():
                return
            if self.account.authenticates and not self._auth():
                return
            for _ in range(self.user.messages_per_session):
                if not self._message():
                    return
            self.client.quit()  # type: ignore[union-attr]
        except (smtplib.SMTPException, OSError):
            pass  # already reported by the step that broke
        finally:
            if self.client is not None:
                self.client.close()

    # -- steps --------------------------------------------------------------------

    def _connect(self) -> bool:
        user = self.user
        host, port = user.endpoint
        source = (user.source, 0) if user.source else None
        started = time.perf_counter()
        try:
            if user.tls == "implicit":
                self.client = smtplib.SMTP_SSL(local_hostname="loadtest.invalid",
                                               timeout=user.timeout, context=user._context,
                                               source_address=source)
            else:
                self.client = smtplib.SMTP(local_hostname="loadtest.invalid",
                                           timeout=user.timeout, source_address=source)
            # Only the constructor records the name STARTTLS sends as SNI, and
            # the constructor would swallow the banner, which carries the session id.
            self.client._host = host  # type: ignore[attr-defined]
            code, banner = self.client.connect(host, port)
            text = banner.decode("utf-8", "replace")
            match = _SID.search(text)
            self.sid = match.group(1) if match else ""
            if code == 220:
                code, reply = self.client.ehlo()
                text = reply.decode("utf-8", "replace")
            if code == 250 and user.tls == "starttls":
                try:
                    code, reply = self.client.starttls(context=user._context)
                    text = _text(reply)
                except smtplib.SMTPResponseException as exc:  # a reply other than 220
                    code, text = exc.smtp_code, _text(exc.smtp_error)
                if code == 220:
                    code, reply = self.client.ehlo()
                    text = reply.decode("utf-8", "replace")
        except (smtplib.SMTPException, OSError) as exc:
            self._report("connect", started, exc)
            raise
        return self._check("connect", started, code, text, (220, 250))

    def _auth(self) -> bool:
        assert self.client is not None
        secret = f"\0{self.account.user}\0{self.account.password}".encode()
        started = time.perf_counter()
        code, text = self._command(
            "AUTH", started, lambda: self.client.docmd(  # type: ignore[union-attr]
                "AUTH", "PLAIN " + base64.b64encode(secret).decode()))
        return self._check("AUTH", started, code, text, (235,))

    def _message(self) -> bool:
        """One transaction; False when the session cannot go on."""
        client = self.client
        assert client is not None
        user = self.user
        user.sent += 1
        token = f"{_RUN}.{user.number}.{user.sent}"
        recipient = f"{random.getrandbits(48):012x}@{user.rcpt_domain}"
        extra = {"token": token}
        started = time.perf_counter()
        code, text = self._command("MAIL", started,
                                   lambda: client.mail(self.account.sender), extra)
        if not self._check("MAIL", started, code, text, (250,), extra):
            return code != 421  # a refused MAIL leaves the session open (SPEC §2)
        started = time.perf_counter()
        code, text = self._command("RCPT", started, lambda: client.rcpt(recipient), extra)
        if not self._check("RCPT", started, code, text, (250, 251), extra):
            if code == 421:
                return False
            client.rset()
            return True
        body = make_message(self.account.sender, recipient, token, user.message_size)
        started = time.perf_counter()
        try:
            code, reply = client.data(body)
            text = reply.decode("utf-8", "replace")
        except smtplib.SMTPDataError as exc:  # refused at the DATA command itself
            code, text = exc.smtp_code, _text(exc.smtp_error)
        except (smtplib.SMTPException, OSError) as exc:
            self._report("DATA", started, exc, extra, len(body))
            raise
        self._check("DATA", started, code, text, (250,), extra, len(body))
        return code != 421

    # -- reporting ------------------------------------------------------------------

    def _command(self, step: str, started: float, call: Any,
                 extra: dict[str, str] | None = None) -> tuple[int, str]:
        try:
            code, reply = call()
        except (smtplib.SMTPException, OSError) as exc:
            self._report(step, started, exc, extra)
            raise
        return code, reply.decode("utf-8", "replace")

    def _check(self, step: str, started: float, code: int, text: str, good: tuple[int, ...],
               extra: dict[str, str] | None = None, length: int = 0) -> bool:
        ok = code in good
        # The failure names the session id "{sid}", so Locust's failure table groups
        # refusals by kind; the reply as sent stays in the event's context.
        error = None if ok else SmtpReplyError(code, text.replace(self.sid, "{sid}")
                                               if self.sid else text)
        self._report(step, started, error, extra, length or len(text), reply=f"{code} {text}")
        return ok

    def _report(self, step: str, started: float, exception: BaseException | None,
                extra: dict[str, str] | None = None, length: int = 0, reply: str = "") -> None:
        context = {"sid": self.sid, "account": self.account.user, "sender": self.account.sender,
                   "source": self.user.source or "", "reply": reply, **(extra or {})}
        self.user.environment.events.request.fire(
            request_type=REQUEST_TYPE, name=step,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length, exception=exception, context=context)
