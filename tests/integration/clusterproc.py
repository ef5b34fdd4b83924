"""A real sendguard cluster for tests: ``sendguard run`` as a subprocess on loopback.

Writes a configuration (like tests/gateway.py) with a free port chosen here,
starts the supervisor, and waits until every worker is in the ring and
serving. Tests talk to it with smtplib from chosen 127.0.0.x addresses and
with the ``sendguard`` admin commands, also as subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.controller import Controller
from gateway import COUNTRIES, PASSWORD, TENANTS, message_from, toml_document
from geoipdb import write_country_db

from cluster.admin import AdminFailure, request
from cluster.admin_wire import AdminRequestMessage
from cluster.selfsigned import write_self_signed

_REQUESTS = {cls.COMMAND: cls for cls in AdminRequestMessage.__subclasses__()}
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(handler: Any) -> Iterator[int]:
    """An aiosmtpd ``handler`` listening on loopback (a next hop); yields its port."""
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def close_session(client: smtplib.SMTP) -> None:
    """QUIT, or just close when the gateway has already closed the connection."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def listeners(port: int) -> dict[int, int]:
    """pid -> number of LISTEN sockets on 127.0.0.1:``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    holders: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    holders[int(pid)] = holders.get(int(pid), 0) + 1
        except OSError:
            continue
    return holders


class Cluster:
    def __init__(self, folder: Path, dns: Any, workers: int = 2,
                 tenants: str = TENANTS, **overrides: Any) -> None:
        self.folder = folder
        self.workers = workers
        self.dns_address = dns.address
        self.port = free_port()
        write_self_signed(folder / "cert.pem", folder / "key.pem", "mx.test")
        self.geoip_path = write_country_db(folder / "country.mmdb", COUNTRIES)
        self.tenants_path = folder / "tenants.toml"
        self.tenants_path.write_text(tenants)
        sections: dict[str, Any] = {
            "server": {"hostname": "mx.test", "listen": [f"127.0.0.1:{self.port}"],
                       "tls_cert": "cert.pem", "tls_key": "key.pem", "workers": workers,
                       "drain_timeout": "5s"},
            "tenants": {"file": "tenants.toml"},
            "cluster": {"runtime_dir": "run", "request_timeout": "1s", "state_dir": "state"},
            "geoip": {"database": "country.mmdb", "default_countries": ["PL"],
                      "unknown": "reject"},
            "dns": {"nameservers": [dns.address], "timeout": "2s"},
            "delivery": {"spool": "spool"},
            "log": {"file": "sendguard.log"},
        }
        for name, values in overrides.items():
            if isinstance(values, list):
                sections[name] = values
            else:
                sections.setdefault(name, {}).update(values)
        self.runtime_dir = folder / "run"
        self.config_path = folder / "sendguard.toml"
        self.config_path.write_text(toml_document(sections))
        self.log_path = folder / "sendguard.log"
        self.stderr_path = folder / "stderr.txt"
        self.process: subprocess.Popen[bytes] | None = None

    # -- processes ---------------------------------------------------------------

    def start(self, wait: bool = True) -> Cluster:
        self.process = self.run_command("run")
        if wait:
            self.wait_serving(self.workers)
        return self

    def run_command(self, *args: str) -> subprocess.Popen[bytes]:
        with open(self.stderr_path, "ab") as stderr:
            return subprocess.Popen([sys.executable, "-m", "cluster.cli", args[0], "-c",
                                     str(self.config_path), *args[1:]], cwd=ROOT,
                                    stderr=stderr)

    def admin(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``sendguard ARGS -c CONFIG`` (the config goes last, after any subcommand)."""
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "-c",
                               str(self.config_path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """An admin request from this process (the CLI's own code, without its start-up),
        by command name; its reply as ``--json`` prints it."""
        message = _REQUESTS[command](**args)
        return request(self.runtime_dir, message).to_json()

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def serving(self, count: int) -> dict[str, Any] | None:
        self.check_alive()
        try:
            status = self.status()
        except AdminFailure:
            return None
        workers = [w for w in status["workers"] if w["member"] and w["phase"] == "serving"
                   and w["ring_epoch"] == status["ring_epoch"]]
        if len(status["ring"]) == count and len(workers) == count:
            return dict(status)
        return None

    def wait_serving(self, count: int, timeout: float = 30) -> dict[str, Any]:
        status = wait_for(lambda: self.serving(count), timeout,
                          f"{count} workers serving in one ring", every=0.2)
        wait_for(lambda: len(listeners(self.port)) == count, 10,
                 f"{count} processes listening on port {self.port}")
        return status

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sendguard run exited {self.process.returncode}: "
                                 f"{self.stderr_path.read_text()[-2000:]}")

    def worker_pids(self) -> dict[str, int]:
        return {w["name"]: w["pid"] for w in self.status()["workers"]}

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    # -- clients -------------------------------------------------------------------

    def connect(self, source: str = "127.0.0.5") -> smtplib.SMTP:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test",
                              source_address=(source, 0), timeout=30)
        client.ehlo()
        client.starttls(context=context)
        client.ehlo()
        return client

    def login(self, source: str = "127.0.0.5", user: str = "jan@kowalski.pl") -> smtplib.SMTP:
        client = self.connect(source)
        client.login(user, PASSWORD)
        return client

    def send_one(self, source: str = "127.0.0.5", user: str = "jan@kowalski.pl",
                 sender: str | None = None,
                 recipient: str = "someone@example.org") -> tuple[int, str]:
        """One session, one message: the reply that ended the transaction."""
        client = self.login(source, user)
        try:
            code, text = client.mail(sender or user)
            if code != 250:
                return code, text.decode()
            code, text = client.rcpt(recipient)
            if code != 250:
                return code, text.decode()
            code, text = client.data(message_from(sender or user))
            return code, text.decode()
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines
