"""A real sendguard worker on loopback for tests, with its DNS server and GeoIP database.

The worker runs its own uvloop event loop in a thread (as it would in its own
process); tests talk to it with smtplib over TCP from chosen 127.0.0.x source
addresses.
"""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dnsserver import TestDNSServer
from geoipdb import write_country_db

from cluster.selfsigned import write_self_signed
from cluster.settings import load_settings

PASSWORD = "correct horse"
TENANTS = """
[domains."kowalski.pl"]
aliases = ["kowalski.com.pl", "zażółć.pl"]
countries = ["PL", "DE"]

[domains."nowak.pl"]

[accounts."jan@kowalski.pl"]
password = "{PLAIN}correct horse"
alternate_sender = "jan.kowalski@gmail.com"

[accounts."anna@nowak.pl"]
password = "{PLAIN}correct horse"
"""

# 127.0.0.0/16 is Poland, with a few addresses elsewhere for the GeoIP policy.
COUNTRIES = {
    "127.0.0.0/16": "PL",
    "127.0.0.42/32": "DE",
    "127.0.0.66/32": "US",
    "127.0.0.77/32": "CN",
    "::1/128": "PL",
}
UNKNOWN_IP = "127.9.0.1"  # outside every network of the database below
MESSAGE = (b"From: Jan <jan@kowalski.pl>\r\nTo: <a@example.org>\r\nSubject: Hello\r\n\r\n"
           b"An ordinary message about the invoice we discussed.\r\n")


def message_from(sender: str) -> bytes:
    """MESSAGE with a header From: naming ``sender`` (SPEC §3.8 checks it)."""
    return MESSAGE.replace(b"<jan@kowalski.pl>", f"<{sender}>".encode())


GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_document(sections: dict[str, Any]) -> str:
    lines = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
        else:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


class Gateway:
    """Writes a configuration under ``folder`` and runs one worker on it in a thread."""

    def __init__(self, folder: Path, dns: TestDNSServer, **overrides: dict[str, Any]) -> None:
        self.folder = folder
        self.dns = dns
        folder.mkdir(parents=True, exist_ok=True)
        write_self_signed(folder / "cert.pem", folder / "key.pem", "mx.test")
        mapping = {k: v for k, v in COUNTRIES.items()}
        write_country_db(folder / "country.mmdb", mapping)
        self.tenants_path = folder / "tenants.toml"
        self.tenants_path.write_text(overrides.pop("tenants_text", TENANTS))  # type: ignore[arg-type]
        sections: dict[str, Any] = {
            "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0"],
                       "listen_tls": ["127.0.0.1:0"], "tls_cert": "cert.pem",
                       "tls_key": "key.pem", "drain_timeout": "5s"},
            "tenants": {"file": "tenants.toml"},
            "cluster": {"runtime_dir": "run"},
            "geoip": {"database": "country.mmdb", "default_countries": ["PL"],
                      "unknown": "reject"},
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            # Nothing listens on port 9 of loopback: mail waits in the queue.
            "delivery": {"spool": "spool", "port": 9},
            "log": {"file": "sendguard.log"},
        }
        for name, values in overrides.items():
            if isinstance(values, list):
                sections[name] = values
            else:
                sections.setdefault(name, {}).update(values)
        self.config_path = folder / "sendguard.toml"
        self.config_path.write_text(toml_document(sections))
        self.settings = load_settings(self.config_path)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parts: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self.tls_port = 0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Gateway:
        from cluster.logjson import open_log

        assert self.settings.log_file is not None
        open_log(self.settings.log_file, "w0")
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("gateway did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        import uvloop

        from worker.builder import build_worker

        async def main() -> None:
            try:
                self._stop = asyncio.Event()
                self.loop = asyncio.get_running_loop()
                self.parts = await build_worker(self.settings)
                await self.parts.start()
                for _host, port, implicit in self.parts.server.addresses:
                    if implicit:
                        self.tls_port = port
                    else:
                        self.port = port
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.parts.server.drain(self._drain_timeout)
            await self.parts.close(1.0)

        self._drain_timeout = self.settings.server.drain_timeout
        uvloop.run(main())

    def stop(self, drain_timeout: float | None = None) -> None:
        if self.loop is None or self._stop is None or self._thread is None:
            return
        if drain_timeout is not None:
            self._drain_timeout = drain_timeout
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        from cluster.logjson import close_log

        close_log()

    def call(self, func: Any, *args: Any) -> Any:
        """Run ``func(*args)`` on the gateway's loop and return its result (for inspection)."""
        assert self.loop is not None
        async def wrapper() -> Any:
            result = func(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def reload(self) -> bool:
        return bool(self.call(self.parts.source.reload))

    # -- clients -------------------------------------------------------------

    def connect(self, source: str = "127.0.0.5", *, implicit_tls: bool = False,
                starttls: bool = True) -> smtplib.SMTP:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client: smtplib.SMTP
        if implicit_tls:
            client = smtplib.SMTP_SSL("127.0.0.1", self.tls_port, local_hostname="client.test",
                                      source_address=(source, 0), timeout=30, context=context)
        else:
            client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                                  source_address=(source, 0), timeout=30)
        client.ehlo()
        if starttls and not implicit_tls:
            client.starttls(context=context)
            client.ehlo()
        return client

    def login(self, source: str = "127.0.0.5", user: str = "jan@kowalski.pl",
              password: str = PASSWORD, **kwargs: Any) -> smtplib.SMTP:
        client = self.connect(source, **kwargs)
        client.login(user, password)
        return client

    def send(self, client: smtplib.SMTP, sender: str = "jan@kowalski.pl",
             recipients: tuple[str, ...] = ("someone@example.org",),
             body: bytes | None = None) -> tuple[int, str]:
        """One full transaction; the reply that ended it (MAIL, RCPT or end of DATA).

        The default message's header From: is the envelope sender."""
        if body is None:
            body = message_from(sender)
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        accepted = 0
        last = (0, b"")
        for rcpt in recipients:
            last = client.rcpt(rcpt)
            accepted += last[0] == 250
        if not accepted:
            client.rset()
            return last[0], last[1].decode()
        code, text = client.data(body)
        return code, text.decode()

    def log_lines(self) -> list[dict[str, Any]]:
        import json

        from cluster.logjson import flush_log

        # The worker writes a loop turn's lines at the end of the turn; its reply
        # to the client may go out first. It runs in this process: flush now.
        flush_log()
        path = self.settings.log_file
        assert path is not None
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Raw:
    """A plain-text SMTP client on a bare socket: what it sends is exactly what goes."""

    def __init__(self, gateway: Gateway, source: str = "127.0.0.5") -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), 30,
                                             source_address=(source, 0))
        self.lines = self.sock.makefile("rb")
        self.banner = self.line()

    def line(self) -> str:
        return self.lines.readline().decode("utf-8", "replace").rstrip("\r\n")

    def reply(self) -> str:
        """The last line of the next (possibly multi-line) reply."""
        while True:
            line = self.line()
            if line[3:4] != "-":
                return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    @property
    def sid(self) -> str:
        match = re.search(r"sendguard ([A-Za-z0-9]{22})$", self.banner)
        assert match, self.banner
        return match.group(1)

    def closed(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def reply(client: smtplib.SMTP, line: str) -> tuple[int, str]:
    """Send a raw command line and read the reply."""
    client.putcmd(line)
    code, text = client.getreply()
    return code, text.decode()


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@contextmanager
def running_gateway(folder: Path, dns: TestDNSServer, **overrides: Any) -> Iterator[Gateway]:
    gateway = Gateway(folder, dns, **overrides).start()
    try:
        yield gateway
    finally:
        gateway.stop()
