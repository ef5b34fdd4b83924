"""The support console: one server-rendered page at ``GET /`` of the HTTP admin API.

Support pastes the customer's error text (the session id is found in it)
and sees the session's decisions; looks up an account (counters and when
they clear, suspend or unsuspend it) or a domain (countries, time-limited
exceptions, history). No script and no front-end build: HTML forms, a
Jinja2 template with autoescaping, and a redirect after every change.

The forms that change something POST with a token bound to the signed-in
name and its time (HMAC with a key made at start, valid ``TOKEN_TTL``), and
a request whose ``Origin`` is another site is refused: HTTP Basic
credentials are sent by the browser with any request to this host, so
neither alone would stop another page from submitting a form here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from cluster.admin import compromise_text, window_text
from coordinator.errors import AdminError

AdminCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
TOKEN_TTL = 12 * 3600.0
# A session id follows the status code in our replies and "sendguard" in the banner.
_SID_AFTER_REPLY = re.compile(r"\b[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ([A-Za-z0-9]{22})\b")
_SID_IN_BANNER = re.compile(r"\bsendguard ([A-Za-z0-9]{22})\b")
_SID_ANYWHERE = re.compile(r"(?<![A-Za-z0-9])([A-Za-z0-9]{22})(?![A-Za-z0-9])")

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
)
_TEMPLATES.filters["window"] = window_text


def session_ids(text: str) -> list[str]:
    """Candidate session ids in a pasted text, the likeliest first."""
    found: list[str] = []
    for pattern in (_SID_AFTER_REPLY, _SID_IN_BANNER, _SID_ANYWHERE):
        for match in pattern.finditer(text):
            if match.group(1) not in found:
                found.append(match.group(1))
    return found


class Console:
    def __init__(self, call: AdminCall, clock: Callable[[], float] = time.time) -> None:
        self._call = call
        self._clock = clock
        self._key = secrets.token_bytes(32)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.page)
        router.add_post("/console/suspend", self.suspend)
        router.add_post("/console/unsuspend", self.unsuspend)
        router.add_post("/console/allow-country", self.allow_country)
        router.add_post("/console/disallow-country", self.disallow_country)

    # -- the page --------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        query = request.query
        user = str(request["user"])
        view: dict[str, Any] = {
            "user": user, "token": self._token(user), "notice": query.get("notice", ""),
            "problem": query.get("problem", ""), "text": query.get("text", ""),
            "account": query.get("account", "").strip(),
            "domain": query.get("domain", "").strip(),
            "session": None, "session_error": "", "inspect": None, "account_error": "",
            "countries": None, "history": None, "domain_error": "", "compromise": "",
        }
        if view["text"].strip():
            view["session"], view["session_error"] = await self._session(view["text"])
            if view["session"] and not view["account"]:
                accounts = [d["account"] for d in view["session"]["decisions"] if d.get("account")]
                view["account"] = accounts[-1] if accounts else ""
        if view["account"]:
            try:
                view["inspect"] = await self._call("inspect", {"kind": "account",
                                                               "subject": view["account"]})
            except AdminError as exc:
                view["account_error"] = str(exc)
            if view["inspect"] and view["inspect"].get("compromise"):
                view["compromise"] = compromise_text(view["inspect"]["compromise"])
            if not view["domain"] and "@" in view["account"]:
                view["domain"] = view["account"].rpartition("@")[2]
        if view["domain"]:
            try:
                view["countries"] = await self._call("countries", {"domain": view["domain"]})
                view["history"] = await self._call("history", {"domain": view["domain"]})
            except AdminError as exc:
                view["domain_error"] = str(exc)
        html = _TEMPLATES.get_template("console.html").render(**view)
        return web.Response(text=html, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "form-action 'self'; frame-ancestors 'none'"})

    async def _session(self, text: str) -> tuple[dict[str, Any] | None, str]:
        candidates = session_ids(text)
        if not candidates:
            return None, "no session id (22 letters and digits) in that text"
        last = ""
        for sid in candidates[:5]:
            try:
                return await self._call("why", {"sid": sid}), ""
            except AdminError as exc:
                last = str(exc)
        return None, last

    # -- the forms ---------------------------------------------------------------------

    async def suspend(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        account = form.get("account", "")
        return await self._change(request, "suspend", {
            "account": account, "reason": form.get("reason", ""),
            "for": form.get("for", "") or None}, {"account": account},
            f"{account} suspended")

    async def unsuspend(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        account = form.get("account", "")
        return await self._change(request, "unsuspend", {"account": account,
                                                         "reason": form.get("reason", "")},
                                  {"account": account}, f"{account} unsuspended")

    async def allow_country(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        domain, country = form.get("domain", ""), form.get("country", "").upper()
        lasting = form.get("for", "") or None
        return await self._change(request, "allow-country", {
            "domain": domain, "country": country, "for": lasting,
            "reason": form.get("reason", "")}, {"domain": domain},
            f"{country} allowed for {domain}" + (f" for {lasting}" if lasting else ""))

    async def disallow_country(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        domain, country = form.get("domain", ""), form.get("country", "").upper()
        return await self._change(request, "disallow-country", {
            "domain": domain, "country": country, "reason": form.get("reason", "")},
            {"domain": domain}, f"{country} no longer allowed for {domain}")

    async def _change(self, request: web.Request, command: str, args: dict[str, Any],
                      back: dict[str, str], done: str) -> web.Response:
        args["by"] = str(request["user"])
        try:
            await self._call(command, args)
            back["notice"] = done
        except AdminError as exc:
            back["problem"] = str(exc)
        raise web.HTTPSeeOther("/?" + urlencode(back))

    async def _form(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            raise web.HTTPForbidden(text="403: a form from another site\n")
        data = await request.post()
        form = {name: value for name, value in data.items() if isinstance(value, str)}
        if not self._token_ok(str(request["user"]), form.get("token", "")):
            raise web.HTTPForbidden(text="403: the form is stale or not ours; load the page "
                                         "again\n")
        return {name: value.strip() for name, value in form.items()}

    # -- tokens ------------------------------------------------------------------------

    def _token(self, user: str) -> str:
        issued = str(int(self._clock()))
        return f"{issued}.{self._mac(user, issued)}"

    def _token_ok(self, user: str, token: str) -> bool:
        issued, _, mac = token.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(mac, self._mac(user, issued)):
            return False
        return 0 <= self._clock() - int(issued) <= TOKEN_TTL

    def _mac(self, user: str, issued: str) -> str:
        message = f"{user}\0{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()
