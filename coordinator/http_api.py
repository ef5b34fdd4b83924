"""The HTTP admin API and support console (``[admin] listen``), served by the coordinator.

aiohttp, on the coordinator's own event loop: the admin commands are
coroutines there already (:meth:`coordinator.admin_router.AdminRouter.call`),
so a request is one await away from the same code the CLI reaches over
the admin socket, and answers the same JSON. aiohttp is already installed
with geoip2 and parses HTTP properly; the standard library has no asyncio
HTTP server.

Every request needs HTTP Basic credentials of ``admin.users_file``
(401 otherwise); the authenticated name is the ``by`` of every change.
A POST to the API must be ``application/json``: a browser sends that
cross-site only after a CORS preflight, which this server never grants,
so another site cannot make a logged-in browser change anything. The
console's forms carry a token instead (:mod:`coordinator.console`).

    GET  /api/sessions/{sid}                  as ``sendguard why SID --json``
    GET  /api/accounts/{user}                 counters with clears_at, suspension
    POST /api/accounts/{user}/suspend         {"reason": ..., "for": "12h"}
    POST /api/accounts/{user}/unsuspend       {"reason": ...} (optional)
    GET  /api/ips/{addr}                      as ``sendguard inspect ip ADDR --json``
    GET  /api/domains/{domain}                countries and time-limited exceptions
    POST /api/domains/{domain}/countries      {"country", "for", "reason"}; "allow": false
                                              takes a country away
    GET  /api/domains/{domain}/history        as ``sendguard tenant history --json``
    GET  /                                    the support console
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from cluster import admin_wire as aw
from cluster.logjson import log_event
from coordinator.console import Console
from coordinator.errors import AdminError
from coordinator.http_users import AdminUsers
from coordinator.support import duration, text

AdminCall = Callable[[aw.AdminRequestMessage], Awaitable[aw.AdminReplyMessage]]
MAX_BODY = 64 * 1024
REALM = 'Basic realm="sendguard admin", charset="UTF-8"'


class _ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse (a line too long, a bad header) as an error
    with a traceback; it is the client's mistake, answered with a 400: one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            said = record.getMessage()
            record.msg, record.args = "%s: %s %s", (said, error.code, type(error).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_SERVER_LOG = logging.getLogger("aiohttp.server.admin")
_SERVER_LOG.addFilter(_ClientMistakes())


def build_app(call: AdminCall, users: AdminUsers) -> web.Application:
    app = web.Application(middlewares=[_authenticate(users), _headers],
                          client_max_size=MAX_BODY)
    api = _Api(call)
    app.router.add_get("/api/sessions/{sid}", api.session)
    app.router.add_get("/api/accounts/{user}", api.account)
    app.router.add_post("/api/accounts/{user}/suspend", api.suspend)
    app.router.add_post("/api/accounts/{user}/unsuspend", api.unsuspend)
    app.router.add_get("/api/ips/{addr}", api.address)
    app.router.add_get("/api/domains/{domain}", api.domain)
    app.router.add_post("/api/domains/{domain}/countries", api.countries)
    app.router.add_get("/api/domains/{domain}/history", api.history)
    Console(call).add_routes(app.router)
    return app


async def serve(call: AdminCall, users: AdminUsers, host: str, port: int) -> web.AppRunner:
    """Listening once this returns (raises OSError when the address is taken)."""
    runner = web.AppRunner(build_app(call, users), access_log=None, handle_signals=False,
                           logger=_SERVER_LOG)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log_event("admin_http_listening", address=f"{host}:{port}")
    return runner


def user_of(request: web.Request) -> str:
    return str(request["user"])


# -- middleware --------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _authenticate(users: AdminUsers) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        name, password = _credentials(request.headers.get("Authorization", ""))
        if name is None or not await users.check(name, password):
            if name is not None:
                log_event("admin_http_refused", logging.WARNING, user=name,
                          client_ip=request.remote)
            raise web.HTTPUnauthorized(text="401: credentials required\n",
                                       headers={"WWW-Authenticate": REALM})
        request["user"] = name
        return await handler(request)

    return middleware


def _credentials(header: str) -> tuple[str | None, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None, ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    name, colon, password = decoded.partition(":")
    return (name, password) if colon and name else (None, "")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    # Not "no-referrer": with it a browser sends "Origin: null" on our own forms.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


# -- the JSON API ----------------------------------------------------------------------

class _Api:
    def __init__(self, call: AdminCall) -> None:
        self._call = call

    async def session(self, request: web.Request) -> web.Response:
        return await self._answer(lambda: aw.WhyRequest(request.match_info["sid"]))

    async def account(self, request: web.Request) -> web.Response:
        return await self._answer(
            lambda: aw.InspectSubjectRequest("account", request.match_info["user"]))

    async def address(self, request: web.Request) -> web.Response:
        return await self._answer(
            lambda: aw.InspectSubjectRequest("ip", request.match_info["addr"]))

    async def suspend(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return await self._answer(lambda: aw.SuspendRequest(
            request.match_info["user"], user_of(request), reason=_text(body, "reason"),
            lasting=_text(body, "for")))

    async def unsuspend(self, request: web.Request) -> web.Response:
        body = await _json(request, required=False)
        return await self._answer(lambda: aw.UnsuspendRequest(
            request.match_info["user"], user_of(request), reason=_text(body, "reason")))

    async def domain(self, request: web.Request) -> web.Response:
        return await self._answer(lambda: aw.CountriesRequest(request.match_info["domain"]))

    async def countries(self, request: web.Request) -> web.Response:
        body = await _json(request)
        change = (aw.DisallowCountryRequest if body.get("allow", True) is False
                  else aw.AllowCountryRequest)
        return await self._answer(lambda: change(
            request.match_info["domain"], _country(body), user_of(request),
            reason=_text(body, "reason"), lasting=_text(body, "for")))

    async def history(self, request: web.Request) -> web.Response:
        return await self._answer(lambda: aw.HistoryRequest(request.match_info["domain"]))

    async def _answer(self, make: Callable[[], aw.AdminRequestMessage]) -> web.Response:
        try:
            reply = await self._call(make())
        except AdminError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=exc.status)
        return web.json_response(reply.to_json(), dumps=_dumps)


async def _json(request: web.Request, required: bool = True) -> dict[str, Any]:
    # Checked even when no body is needed: the type is the protection against CSRF.
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="415: send application/json\n")
    raw = await request.read()
    if not raw.strip() and not required:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="400: the body is not JSON\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="400: the body must be a JSON object\n")
    return body


def _text(body: dict[str, Any], name: str) -> str | None:
    """A string field of the body; None when absent or null. Any other JSON value is
    refused with the sentence the coordinator has for a bad one."""
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    if name == "for":
        return str(duration(value, name))  # raises: a number is not a duration like "12h"
    return text(value, name)  # raises: not one line of text


def _country(body: dict[str, Any]) -> str | None:
    value = body.get("country")
    if value is None or isinstance(value, str):
        return value
    raise AdminError(f'{value!r} is not a two-letter country code like "PL"')


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True)
