"""The aiosmtpd overrides of worker/smtp.py and worker/smtp_speedups.py, one test each.

The replies themselves (banner, 550 before AUTH, SIZE before AUTH, 552 after
DATA, AUTH verdicts, 421 on shutdown) are asserted over real SMTP in
test_smtp_replies.py and test_shutdown.py; these tests pin what the
overrides rely on in the aiosmtpd releases pyproject.toml admits.
"""

from __future__ import annotations

import asyncio
import importlib.metadata

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP

from cluster.demo import bundled_examples
from cluster.settings import load_settings
from worker import smtp_speedups
from worker.handler import GatewayHandler
from worker.smtp import GatewaySMTP

EXAMPLE = bundled_examples() / "sendguard.toml"


class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        return responses

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        return "250 OK"


def test_aiosmtpd_is_a_release_the_overrides_were_checked_against() -> None:
    assert importlib.metadata.version("aiosmtpd") in smtp_speedups.CHECKED_RELEASES
    assert smtp_speedups.install()


def test_the_speedups_are_not_installed_by_importing_the_protocol() -> None:
    import subprocess
    import sys

    code = ("import inspect, aiosmtpd.smtp, worker.smtp, worker.handler, worker.server;"
            "assert aiosmtpd.smtp.inspect is inspect;"
            "from worker import smtp_speedups; assert smtp_speedups.install();"
            "assert aiosmtpd.smtp.inspect is not inspect")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_texts_we_replace_are_still_aiosmtpd_texts() -> None:
    import inspect

    source = inspect.getsource(aiosmtpd.smtp.SMTP)
    assert "'552 Error: Too much mail data'" in source
    assert "self.__ident__" in source
    assert "async def check_auth_needed(self, caller_method: str)" in source


async def test_cached_introspection_finds_what_aiosmtpd_finds() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(aiosmtpd.smtp.inspect, type(aiosmtpd.smtp.inspect))
    smtp_speedups.install()  # idempotent
    cached = SMTP(Handler(), hostname="x", loop=loop)
    names = dir(SMTP)
    assert sorted(cached._smtp_methods) == sorted(
        n.replace("smtp_", "") for n in names if n.startswith("smtp_"))
    assert sorted(cached._handle_hooks) == ["DATA", "EHLO"]
    assert sorted(cached._auth_methods) == ["LOGIN", "PLAIN"]
    assert cached._ehlo_hook_ver == "new"


def _protocol(handler: object, loop: asyncio.AbstractEventLoop) -> GatewaySMTP:
    settings = load_settings(EXAMPLE).server
    return GatewaySMTP(handler, sessions=None, server_settings=lambda: settings,  # type: ignore[arg-type]
                       trusted=lambda ip: False, hostname="x", loop=loop, auth_required=True)


async def test_the_handlers_auth_mechanisms_replace_aiosmtpds() -> None:
    protocol = _protocol(GatewayHandler(None), asyncio.get_running_loop())  # type: ignore[arg-type]
    for mechanism in ("PLAIN", "LOGIN"):
        method = protocol._auth_methods[mechanism]
        assert not method.is_builtin
        assert method.method.__func__ is getattr(GatewayHandler, f"auth_{mechanism}")


async def test_every_command_runs_through_the_session() -> None:
    """aiosmtpd dispatches through ``_smtp_methods.get``; HELP reads it as a table."""
    protocol = _protocol(Handler(), asyncio.get_running_loop())
    for command in ("MAIL", "NOSUCH"):
        runner = protocol._smtp_methods.get(command)
        assert runner.func == protocol._run and runner.args == (command,)
    protocol._running = True
    assert protocol._smtp_methods.get("MAIL") == protocol.smtp_MAIL
    assert protocol._smtp_methods.get("NOSUCH") is None
    assert ("QUIT", protocol.smtp_QUIT) in list(protocol._smtp_methods.items())


def test_the_loop_we_hook_is_still_aiosmtpds() -> None:
    import inspect

    source = inspect.getsource(aiosmtpd.smtp.SMTP._handle_client)
    assert "method = self._smtp_methods.get(command)" in source
    assert "status = await self.handle_exception(error)" in source
    assert "self._reset_timeout()\n                await method(arg)" in source
    assert "self._timeout_cb" in inspect.getsource(aiosmtpd.smtp.SMTP._reset_timeout)


ADDRESS_FORMS = [
    "<jan@kowalski.pl>", "<jan@kowalski.pl> SIZE=100 BODY=8BITMIME", "<Jan.K+tag@Ex-ample.COM>",
    "<>", '<"quoted local"@x.pl>', "jan@x.pl", "<jan@[127.0.0.1]>", "<a..b@x.pl>", "<.a@x.pl>",
    "<jan@zażółć.pl>", "<jan@x.pl>SIZE=1", "<@route:jan@x.pl>", " <jan@x.pl>", "<jan@-x.pl>",
    "<jan@x.pl.>", "<j@x>", "<jan@kowalski.pl>  SMTPUTF8", "<a b@x.pl>", "<jan@x.pl",
]


async def test_fast_address_parsing_matches_aiosmtpd() -> None:
    smtp_speedups.install()
    protocol = SMTP(Handler(), hostname="x", loop=asyncio.get_running_loop())
    for form in ADDRESS_FORMS:
        assert protocol._getaddr(form) == smtp_speedups._original_getaddr(protocol, form), form


# -- DATA (worker/smtp_data.py, GatewaySMTP.smtp_DATA) ---------------------------


def test_smtp_data_replaces_a_method_whose_checks_we_repeat() -> None:
    import inspect

    source = inspect.getsource(aiosmtpd.smtp.SMTP.smtp_DATA)
    for text in ("await self.check_helo_needed()", 'await self.check_auth_needed("DATA")',
                 "'503 Error: need RCPT command'", "'501 Syntax: DATA'",
                 "'354 End data with <CR><LF>.<CR><LF>'", "self._set_post_data_state()",
                 "_call_handler_hook('DATA')"):
        assert text in source, text
    # The only reply of _handle_client to a line it cannot take, which push() rewrites.
    assert inspect.getsource(aiosmtpd.smtp.SMTP._handle_client).count(
        "await self.push('500 Command line too long')") == 2


async def read_all(chunks: list[bytes], limit: int | None = None,
                   reader_limit: int = SMTP.line_length_limit) -> tuple[bytes, bytes]:
    """What read_data returns from a StreamReader fed ``chunks``, and what it left unread."""
    from worker.smtp_data import read_data

    reader = asyncio.StreamReader(limit=reader_limit)

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    raw = await read_data(reader, limit)
    await feeding
    return raw, await reader.read()


async def test_data_ends_only_at_crlf_dot_crlf_and_leaves_what_follows() -> None:
    assert await read_all([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")
    assert await read_all([b"a\r\n.\r\nQUIT\r\n"]) == (b"a\r\n", b"QUIT\r\n")
    # Smuggling attempts stay content; the real end comes later.
    for fake in (b"a\n.\r\n", b"a\r\n.\n", b"a\r.\r\n", b"a\n.\n", b".\n"):
        raw, rest = await read_all([fake + b"MAIL FROM:<x@y>\r\n", b"\r\n.\r\nNOOP\r\n"])
        assert (raw, rest) == (fake + b"MAIL FROM:<x@y>\r\n\r\n", b"NOOP\r\n"), fake


async def test_data_end_split_across_reads_and_lines_longer_than_the_reader_limit() -> None:
    body = b"x" * 5000 + b"\r\nshort.\r\n" + b"y" * 3000
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)] + [b"\r", b"\n", b".", b"\r",
                                                               b"\nRSET\r\n"]
    assert await read_all(chunks) == (body + b"\r\n", b"RSET\r\n")
    assert await read_all([body + b"\r\n.\r\n"], reader_limit=64) == (body + b"\r\n", b"")


async def test_data_over_the_limit_is_read_to_its_end_and_dropped() -> None:
    from worker.smtp_data import TooMuchData

    with pytest.raises(TooMuchData):
        await read_all([b"z" * 10_000, b"\r\n.\r\nQUIT\r\n"], limit=4096)
    assert await read_all([b"z" * 4094 + b"\r\n.\r\n"], limit=4096) == (b"z" * 4094 + b"\r\n",
                                                                      b"")


def test_unstuffing_after_any_line_end_and_crlf_only() -> None:
    from worker.smtp_data import unstuff

    assert unstuff(b"..a\r\n..b\n..c\r\nplain\r\n") == b".a\r\n.b\r\n.c\r\nplain\r\n"
    # A dot alone on a line did not end DATA: it stays, as sent.
    assert unstuff(b"x\n.\r\ny\r\n.\nz\r\n") == b"x\r\n.\r\ny\r\n.\r\nz\r\n"
    assert unstuff(b".\rbare cr\r\n") == b"\rbare cr\r\n"
    assert unstuff(b"") == b""
