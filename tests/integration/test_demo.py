"""The README's first quick-start command: `sendguard demo` serves the bundled example.

A message goes in on the example's submission port and comes out as a file
under the example folder's ``mail/``, written by the demo's catch-all sink.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from dnsserver import TestDNSServer

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (b"From: Jan <jan@example.com>\r\nTo: <someone@example.org>\r\nSubject: demo\r\n\r\n"
           b"It went in on port 2587 and came out in examples/mail/.\r\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_banner(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220 "):
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no banner on {port}")


def wait_for_files(folder: Path, timeout: float = 60.0) -> list[Path]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        files = sorted(folder.glob("*.eml")) if folder.is_dir() else []
        if files:
            return files
        time.sleep(0.1)
    raise AssertionError(f"nothing was written to {folder}")


def test_demo_serves_the_example_account_and_shows_what_it_delivers(
        short_tmp: Path, dns: TestDNSServer) -> None:
    folder = short_tmp / "examples"
    shutil.copytree(ROOT / "examples", folder,
                    ignore=shutil.ignore_patterns("tls", "spool", "state", "mail"))
    port, tls_port, sink_port = free_port(), free_port(), free_port()
    config = folder / "sendguard.toml"
    text = config.read_text().replace("127.0.0.1:2587", f"127.0.0.1:{port}")
    text = text.replace("127.0.0.1:2465", f"127.0.0.1:{tls_port}")
    text = text.replace("127.0.0.1:2525", f"127.0.0.1:{sink_port}")
    # As the README says to on a host without a resolver of its own.
    text = text.replace("nameservers = []", f'nameservers = ["{dns.address}"]')
    assert "\n[cluster]\n" in text
    config.write_text(text.replace("\n[cluster]\n",
                                   f'\n[cluster]\nruntime_dir = "{short_tmp}/run"\n'))
    log = (short_tmp / "stderr.txt").open("w")
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "demo", "--dir", str(folder)],
                               stderr=log)
    try:
        wait_for_banner(port, process)
        assert (folder / "tls" / "cert.pem").exists()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
            client.starttls(context=context)
            client.login("jan@example.com", "demo-password")
            assert client.mail("jan@example.com")[0] == 250
            assert client.mail("jan@example.com")[0] == 503  # nested MAIL: the first stands
            assert client.rcpt("someone@example.org")[0] == 250
            assert client.data(MESSAGE)[0] == 250
        [written] = wait_for_files(folder / "mail")
        content = written.read_bytes()
        assert content.startswith(b"Return-Path: <jan@example.com>\r\n"
                                  b"Delivered-To: someone@example.org\r\n")
        assert content.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1])
        assert b"Received: from client.test" in content
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, local_hostname="client.test", timeout=30,
                              context=context) as client:
            client.login("jan@example.com", "demo-password")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        log.close()
    assert code == 0, (short_tmp / "stderr.txt").read_text()[-3000:]
