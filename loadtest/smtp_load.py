"""An SMTP submission client for benchmarks: full transactions, many sessions, bounded.

Each client process runs ``concurrency`` sessions on one event loop with
aiosmtplib: connect, EHLO, STARTTLS, AUTH, then ``per_session`` messages
(MAIL, RCPT, DATA), QUIT. Sources rotate over 127.0.0.x addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib


@dataclass
class LoadSpec:
    host: str
    port: int
    messages: int
    per_session: int
    concurrency: int
    user: str = ""
    password: str = ""
    sender: str = "jan@kowalski.pl"
    recipient_domain: str = "example.org"
    size: int = 1024
    starttls: bool = True
    sources: list[str] = field(default_factory=lambda: [f"127.0.0.{i}" for i in range(2, 60)])
    deadline: float = 120.0


@dataclass
class LoadResult:
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str = ""


def message(size: int, sender: str = "jan@kowalski.pl") -> bytes:
    # The header From: is the envelope sender: the gateway checks they align.
    head = f"From: <{sender}>\r\nTo: <a@example.org>\r\nSubject: load\r\n\r\n".encode()
    line = b"The quarterly report is attached as we agreed on the phone call.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head))]
    return head + body


async def _session(spec: LoadSpec, source: str, count: int, body: bytes,
                   result: LoadResult, context: ssl.SSLContext) -> None:
    client = aiosmtplib.SMTP(hostname=spec.host, port=spec.port, local_hostname="load.test",
                             source_address=(source, 0), start_tls=False, timeout=60,
                             tls_context=context)
    try:
        await client.connect()
        if spec.starttls:
            await client.starttls()
        if spec.user:
            await client.login(spec.user, spec.password)
        for index in range(count):
            errors, _ = await client.sendmail(
                spec.sender, [f"u{index}@{spec.recipient_domain}"], body)
            if errors:
                result.refused += 1
            else:
                result.accepted += 1
        await client.quit()
    except aiosmtplib.SMTPResponseException as exc:
        result.refused += 1
        result.first_error = result.first_error or f"{exc.code} {exc.message}"
        client.close()
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        result.errors += 1
        result.first_error = result.first_error or repr(exc)
        client.close()


async def run_load(spec: LoadSpec) -> LoadResult:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    body = message(spec.size, spec.sender)
    result = LoadResult()
    sessions = spec.messages // spec.per_session
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(sessions):
        queue.put_nowait(index)
    started = time.perf_counter()
    end = started + spec.deadline

    async def runner() -> None:
        while not queue.empty() and time.perf_counter() < end:
            index = queue.get_nowait()
            source = spec.sources[index % len(spec.sources)]
            await _session(spec, source, spec.per_session, body, result, context)

    await asyncio.gather(*(runner() for _ in range(spec.concurrency)))
    result.seconds = time.perf_counter() - started
    return result


def run_load_process(spec: LoadSpec) -> LoadResult:
    """Entry point for a client process."""
    import uvloop

    return uvloop.run(run_load(spec))


def add_load_arguments(parser: argparse.ArgumentParser, messages: int) -> None:
    """The client options every benchmark on this client shares."""
    parser.add_argument("--messages", type=int, default=messages,
                        help="messages per run at 1 message per session (x4 at 100)")
    parser.add_argument("--concurrency", type=int, default=20, help="sessions in flight")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--spool-dir", default="/var/tmp",
                        help="where the spool lives (the filesystem matters)")
