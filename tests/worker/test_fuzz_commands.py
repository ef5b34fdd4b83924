"""A bounded fuzz of the SMTP command parser over a real socket.

Random bytes and mutated valid commands (flipped and inserted bytes, NULs,
bytes that are not UTF-8, bare CRs, overlong lines, odd AUTH exchanges),
a few hundred lines over fresh sessions, within a time budget. Whatever
arrives, the worker must answer with SMTP replies (never ``500`` carrying
Python's text), log one line of JSON per event with no traceback and no
internal error, and go on serving: a normal message is accepted afterwards.
The seed is fixed so a failure can be replayed; ``SENDGUARD_FUZZ_SEED``
picks another.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import PASSWORD, Gateway, plain_auth, running_gateway

LINES = 1500
BUDGET = 15.0  # seconds of fuzzing at most
REPLY = re.compile(rb"^[2-5]\d\d[ -]")

VALID = [
    b"EHLO client.test", b"HELO client.test", b"NOOP", b"RSET", b"HELP", b"HELP MAIL",
    b"VRFY <jan@kowalski.pl>", b"EXPN staff", b"MAIL FROM:<jan@kowalski.pl>",
    b"MAIL FROM:<jan@kowalski.pl> SIZE=100 BODY=8BITMIME", b"MAIL FROM:<> SMTPUTF8",
    b"RCPT TO:<someone@example.org>", b"RCPT TO:<a@zaz\xc3\xb3\xc5\x82\xc4\x87.pl>",
    b"DATA", b".", b"AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD).encode(),
    b"AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess").encode(), b"AUTH LOGIN",
    b"AUTH PLAIN", b"AUTH CRAM-MD5", b"*", base64.b64encode(b"jan@kowalski.pl"),
    b"BDAT 10 LAST", b"STARTTLS", b"From: jan@kowalski.pl", b"",
]
NASTY = [b"\x00", b"\xff", b"\xfe", b"\r", b"\x1b[31m", b"%s%n", b"<", b">", b"@", b":",
         b"\xc3", b"\xed\xa0\x80", b"=", b" ", b"\t", b"\\", b'"', b"SIZE=-1", b"SIZE=99999999999"]


def mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        position = rng.randint(0, len(data))
        if choice < 0.3 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.6:
            data[position:position] = rng.choice(NASTY)
        elif choice < 0.75:
            del data[position:position + rng.randint(1, 8)]
        elif choice < 0.85:
            data = data.swapcase() if hasattr(data, "swapcase") else data
        elif choice < 0.95:
            data[position:position] = data[:rng.randint(0, 40)] * rng.randint(1, 60)
        else:
            data = bytearray(rng.randbytes(rng.randint(1, 3000)))
    return bytes(data).replace(b"\n", b"")


def fuzz_line(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.15:
        return rng.randbytes(rng.randint(0, 200)).replace(b"\n", b"")
    if roll < 0.55:
        return rng.choice(VALID)
    return mutate(rng, rng.choice(VALID))


def _complete(received: bytes) -> bool:
    """Ends with the last line of a reply (``250 ...``, not ``250-...``)."""
    if not received.endswith(b"\r\n"):
        return False
    last = received[:-2].rpartition(b"\r\n")[2]
    return last[3:4] == b" " or len(last) == 3


def drain(sock: socket.socket, wait: float) -> bytes:
    """The server's answer: up to a complete reply, or what came within ``wait`` seconds."""
    received = b""
    while True:
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            return received
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, OSError):
            return received + b"<closed>"
        if not chunk:
            return received + b"<closed>"
        received += chunk
        if _complete(received):
            return received


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, server={"require_tls_for_auth": False,
                                                 "command_timeout": "3s"}) as gw:
        yield gw


def test_the_command_parser_survives_a_fuzz(gateway: Gateway) -> None:
    rng = random.Random(int(os.environ.get("SENDGUARD_FUZZ_SEED", "20261205")))
    deadline = time.monotonic() + BUDGET
    transcript: list[tuple[bytes, bytes]] = []
    sent = 0
    while sent < LINES and time.monotonic() < deadline:
        source = f"127.0.{rng.randint(1, 200)}.{rng.randint(1, 250)}"
        with socket.create_connection(("127.0.0.1", gateway.port), 10,
                                      source_address=(source, 0)) as sock:
            banner = drain(sock, 5.0)
            assert banner.startswith(b"220 "), banner
            for _ in range(rng.randint(1, 40)):
                line = fuzz_line(rng)
                try:
                    sock.sendall(line + (b"\r\n" if rng.random() < 0.9 else b"\n"))
                except OSError:
                    break
                sent += 1
                answer = drain(sock, 0.05)
                transcript.append((line, answer))
                if answer.endswith(b"<closed>"):
                    break
    assert sent >= 100, f"only {sent} lines in {BUDGET:g} s"

    for line, answer in transcript:
        for reply in answer.removesuffix(b"<closed>").split(b"\r\n")[:-1]:
            assert REPLY.match(reply), (line, reply)
            assert not reply.startswith(b"500 Error: ("), (line, reply)
            assert b"Traceback" not in reply and b"Error: (" not in reply, (line, reply)

    # The worker still serves, normally.
    client = gateway.login("127.0.0.250")
    assert gateway.send(client)[0] == 250
    client.quit()

    assert gateway.settings.log_file is not None
    log = gateway.settings.log_file.read_text(encoding="utf-8")
    assert "Traceback" not in log
    events = [json.loads(line) for line in log.splitlines()]
    problems = [e for e in events if e.get("level") in ("error", "critical")
                or e.get("policy") == "internal" or e.get("event") == "session_task_failed"]
    assert problems == [], json.dumps(problems[:5])
