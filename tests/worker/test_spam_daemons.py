"""The rspamd and spamd backends against the real daemons (issue 6 items 1-3), over real SMTP.

Each daemon is started once per module, on a free loopback port, with a
private configuration in a temporary folder, and stopped at the end:

- rspamd: a hand-written minimal configuration (a normal worker only, no
  Redis, no rules that need the network, DNS pointed at a dead loopback
  port), so nothing leaves 127.0.0.0/8; ``enable_test_patterns`` turns on
  the GTUBE variants for the "add header" and "rewrite subject" actions;
- spamd: Debian's rules with ``--local`` (no network tests) and no user
  configuration, as ``nobody`` when the tests run as root.

The daemons come from ``.ci/services.sh``. A missing daemon skips these tests
only on a developer's machine; with ``CI`` set it is a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gateway import GTUBE, MESSAGE, Gateway, running_gateway
from test_policies_e2e import find_record

SPAM = b"Subject: offer\r\n\r\n" + GTUBE + b"\r\n"
STARTUP_DEADLINE = 90.0


def daemon_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is not None:
        return path
    message = f"{name} is not installed: run .ci/services.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(port: int, request: bytes) -> bytes:
    """One request on a fresh connection; the whole answer ("" when nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer
    except OSError:
        return b""


@dataclass
class Daemon:
    backend: str
    url: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def log(self) -> str:
        return (self.folder / "daemon.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: see start()
                self.process.wait(10)


RSPAMD_CONF = """
options {{
    pidfile = "{folder}/rspamd.pid";
    dbdir = "{folder}/db";
    hs_cache_dir = "{folder}/db/";
    cache_file = "{folder}/db/symbols.cache";
    tempdir = "{folder}/db";
    url_tld = "{folder}/tld.dat";
    # Nothing may leave loopback: a dead loopback port answers every lookup.
    dns {{ nameserver = ["127.0.0.1:{dead_port}"]; timeout = 200ms; retransmits = 1; }}
    enable_test_patterns = true;
    task_timeout = 8s;
}}
logging {{ type = "console"; level = "notice"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; mime = true; }}
"""


def start_rspamd(folder: Path) -> Daemon:
    binary = daemon_binary("rspamd")
    port = free_port()
    (folder / "db").mkdir()
    # The public-suffix list takes rspamd ~20 s to compile; the tests need only these.
    (folder / "tld.dat").write_text("com\nnet\norg\npl\ntest\n")
    (folder / "rspamd.conf").write_text(RSPAMD_CONF.format(folder=folder, port=port,
                                                          dead_port=free_port()))
    command = [binary, "-f", "-c", str(folder / "rspamd.conf")]
    if os.geteuid() == 0:
        command.append("--insecure")  # it refuses to run workers as root otherwise
    daemon = _spawn("rspamd", f"http://127.0.0.1:{port}", port, folder, command)
    _wait_until(daemon, b"GET /ping HTTP/1.0\r\n\r\n", b"pong")
    return daemon


def start_spamd(folder: Path) -> Daemon:
    binary = daemon_binary("spamd")
    port = free_port()
    site = folder / "site"
    site.mkdir()
    # Debian's plugin list (.pre files), without its site-wide local.cf.
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site)
    (site / "local.cf").write_text("use_bayes 0\nbayes_auto_learn 0\n")
    folder.chmod(0o755)  # its children run as nobody
    command = [binary, f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1",
               "--nouser-config", "--local", f"--helper-home-dir={folder}",
               f"--siteconfigpath={site}", "--max-children=2", "--min-children=1",
               f"--pidfile={folder / 'spamd.pid'}", "--syslog=stderr"]
    if os.geteuid() == 0:
        command.append("--username=nobody")
    daemon = _spawn("spamd", f"127.0.0.1:{port}", port, folder, command)
    _wait_until(daemon, b"PING SPAMC/1.5\r\n\r\n", b"PONG")
    return daemon


def _spawn(backend: str, url: str, port: int, folder: Path, command: list[str]) -> Daemon:
    with open(folder / "daemon.log", "wb") as log:
        # A session of its own, so a daemon that ignores SIGTERM is killed with its children.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Daemon(backend, url, port, folder, process)


def _wait_until(daemon: Daemon, request: bytes, answer: bytes) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    while answer not in ask(daemon.port, request):
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            pytest.fail(f"{daemon.backend} did not start:\n{daemon.log}")
        time.sleep(0.1)


STARTERS = {"rspamd": start_rspamd, "spamd": start_spamd}


@contextlib.contextmanager
def running_daemon(backend: str) -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix=f"sg-{backend}-", dir="/tmp") as folder:
        daemon = STARTERS[backend](Path(folder))
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def rspamd_daemon() -> Iterator[Daemon]:
    with running_daemon("rspamd") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def spamd_daemon() -> Iterator[Daemon]:
    with running_daemon("spamd") as daemon:
        yield daemon


@pytest.fixture(params=["rspamd", "spamd"])
def daemon(request: pytest.FixtureRequest) -> Daemon:
    return request.getfixturevalue(f"{request.param}_daemon")  # type: ignore[no-any-return]


def spam_gateway(folder: Path, dns: Any, backend: str, url: str, **spam: Any
                 ) -> contextlib.AbstractContextManager[Gateway]:
    settings = {"backend": backend, "url": url, "grace": 1, "window": "1m", "timeout": "10s",
                "on_error": "tempfail", **spam}
    return running_gateway(folder, dns, spam=settings)


def data_lines(gateway: Gateway, sid: str) -> list[dict[str, Any]]:
    return [line for line in gateway.log_lines()
            if line.get("sid") == sid and line.get("stage") == "DATA"]


def headers_of(gateway: Gateway, reply_text: str) -> str:
    record = find_record(gateway, reply_text.rsplit(" ", 1)[1])
    return record.message.split(b"\r\n\r\n", 1)[0].decode()


# -- verdicts ----------------------------------------------------------------------

def test_gtube_is_accepted_within_the_grace_then_refused(short_tmp: Path, dns: Any,
                                                         daemon: Daemon) -> None:
    with spam_gateway(short_tmp, dns, daemon.backend, daemon.url) as gateway:
        client = gateway.login("127.0.0.41")
        code, text = gateway.send(client, body=SPAM)
        assert code == 250, text
        headers = headers_of(gateway, text)
        assert f"\r\nX-Spam-Scan: {daemon.backend}; spam=yes; score=" in headers
        assert "\r\nX-Spam-Flag: YES\r\n" in headers
        first, *rest = headers.split("\r\nX-Spam-Symbols:", 1)[1].split("\r\n")
        folded = ["X-Spam-Symbols:" + first, *itertools.takewhile(
            lambda line: line.startswith("\t"), rest)]
        assert "GTUBE" in "".join(folded) and max(map(len, folded)) <= 78, folded
        code, text = gateway.send(client, body=SPAM)
        sid = text.split()[1]
        assert (code, text) == (550, f"5.1.0 {sid} spam detected")
        refusal = data_lines(gateway, sid)[-1]
        assert refusal["backend"] == daemon.backend and "GTUBE" in refusal["symbols"]
        assert refusal["score"] >= 15 and refusal["policy"] == "spam"
        client.quit()


def test_clean_message_passes_with_its_score(short_tmp: Path, dns: Any, daemon: Daemon) -> None:
    with spam_gateway(short_tmp, dns, daemon.backend, daemon.url) as gateway:
        client = gateway.login("127.0.0.42")
        for _ in range(2):  # past the grace of 1: clean mail is never counted as spam
            code, text = gateway.send(client, body=MESSAGE)
            assert code == 250, text
        headers = headers_of(gateway, text)
        assert f"\r\nX-Spam-Scan: {daemon.backend}; spam=no; score=" in headers
        assert "X-Spam-Flag" not in headers
        accepted = [line for line in gateway.log_lines()
                    if line.get("stage") == "DATA" and line.get("verdict") == "accept"]
        assert len(accepted) == 2
        assert all(line["backend"] == daemon.backend and isinstance(line["symbols"], list)
                   and line["score"] < 5 for line in accepted)
        client.quit()


@pytest.mark.parametrize("actions, spam", [(["reject"], False), (["reject", "add header"], True)])
def test_rspamd_actions_that_count_as_spam(short_tmp: Path, dns: Any, rspamd_daemon: Daemon,
                                           actions: list[str], spam: bool) -> None:
    # rspamd's test pattern for "add header" (enable_test_patterns): score 6.
    body = SPAM.replace(b"XJS*", b"YJS*")
    with spam_gateway(short_tmp, dns, "rspamd", rspamd_daemon.url,
                      rspamd_spam_actions=actions) as gateway:
        client = gateway.login("127.0.0.43")
        code, text = gateway.send(client, body=body)
        assert code == 250
        assert "; action=add header" in headers_of(gateway, text)
        code, _text = gateway.send(client, body=body)
        assert code == (550 if spam else 250)
        client.quit()


# -- failure modes -----------------------------------------------------------------

SCAN_UNAVAILABLE = "4.7.1 {sid} content scan unavailable, try later"


def assert_unavailable(gateway: Gateway, source: str) -> None:
    client = gateway.login(source)
    code, text = gateway.send(client)
    sid = text.split()[1]
    assert (code, text) == (451, SCAN_UNAVAILABLE.format(sid=sid))
    line = data_lines(gateway, sid)[-1]
    assert line["policy"] == "spam" and line["verdict"] == "tempfail"
    client.quit()


def assert_skipped(gateway: Gateway, source: str, reason: str) -> None:
    client = gateway.login(source)
    code, text = gateway.send(client)
    assert code == 250, text
    headers = headers_of(gateway, text)
    assert f"\r\nX-Spam-Scan: skipped ({reason}" in headers, headers
    client.quit()


@pytest.mark.parametrize("backend", ["rspamd", "spamd"])
def test_stopped_daemon(short_tmp: Path, dns: Any, backend: str) -> None:
    with running_daemon(backend) as daemon:
        with spam_gateway(short_tmp / "a", dns, backend, daemon.url) as gateway:
            client = gateway.login("127.0.0.44")
            assert gateway.send(client)[0] == 250  # it works while the daemon runs
            client.quit()
            daemon.stop()
            assert_unavailable(gateway, "127.0.0.44")
        with spam_gateway(short_tmp / "b", dns, backend, daemon.url,
                          on_error="accept") as gateway:
            assert_skipped(gateway, "127.0.0.45", f"{backend}: cannot connect")


class Blackhole:
    """A port that accepts connections and never answers (a hung scanner)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)
        for conn in self._held:
            conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.mark.parametrize("backend", ["rspamd", "spamd"])
def test_hung_scanner_times_out_without_stalling_other_sessions(
        short_tmp: Path, dns: Any, blackhole: Blackhole, backend: str) -> None:
    url = f"http://127.0.0.1:{blackhole.port}" if backend == "rspamd" else \
        f"127.0.0.1:{blackhole.port}"
    with spam_gateway(short_tmp / "a", dns, backend, url, timeout="2s") as gateway:
        stuck = gateway.login("127.0.0.46")
        result: list[tuple[int, str]] = []
        started = time.monotonic()
        sender = threading.Thread(target=lambda: result.append(gateway.send(stuck)))
        sender.start()
        assert blackhole.accepted.wait(10)
        # While that scan hangs, another session goes on at full speed.
        other = gateway.login("127.0.0.47")
        assert other.mail("jan@kowalski.pl")[0] == 250
        assert other.rcpt("a@example.org")[0] == 250
        assert sender.is_alive()
        other.quit()
        sender.join(30)
        assert time.monotonic() - started >= 1.9
        (code, text), = result
        sid = text.split()[1]
        assert (code, text) == (451, SCAN_UNAVAILABLE.format(sid=sid))
        assert "timeout after 2s" in data_lines(gateway, sid)[-1]["detail"]
        stuck.quit()
    with spam_gateway(short_tmp / "b", dns, backend, url, timeout="1s",
                      on_error="accept") as gateway:
        assert_skipped(gateway, "127.0.0.48", f"{backend}: timeout after 1s")


def test_malformed_answers_from_a_real_daemon(short_tmp: Path, dns: Any, rspamd_daemon: Daemon,
                                              spamd_daemon: Daemon) -> None:
    # spamd answers an HTTP request with a SPAMD error line; rspamd answers
    # an unknown path with HTTP 500.
    with spam_gateway(short_tmp / "a", dns, "rspamd", f"http://127.0.0.1:{spamd_daemon.port}"
                      ) as gateway:
        assert_unavailable(gateway, "127.0.0.49")
        detail = [line for line in gateway.log_lines() if line.get("stage") == "DATA"][-1]
        assert detail["detail"].startswith("rspamd: not an HTTP answer: b'SPAMD/1.0 76")
    with spam_gateway(short_tmp / "b", dns, "rspamd", f"{rspamd_daemon.url}/no/such/path",
                      on_error="accept") as gateway:
        assert_skipped(gateway, "127.0.0.50", "rspamd: HTTP 500")
