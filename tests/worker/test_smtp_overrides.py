"""The aiosmtpd overrides of worker/smtp.py and worker/smtp_speedups.py, one test each.

The replies themselves (banner, 550 before AUTH, SIZE before AUTH, 552 after
DATA, AUTH verdicts, 421 on shutdown) are asserted over real SMTP in
test_smtp_replies.py and test_shutdown.py; these tests pin what the
overrides rely on in aiosmtpd 1.4.6.
"""

from __future__ import annotations

import asyncio
import importlib.metadata

import aiosmtpd.smtp
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


def test_aiosmtpd_is_the_pinned_version() -> None:
    assert importlib.metadata.version("aiosmtpd") == "1.4.6"


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
