"""STARTTLS on the event loop's own TLS (worker/starttls.py), over real SMTP on loopback."""

from __future__ import annotations

import asyncio.sslproto
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import MESSAGE, PASSWORD, Gateway, running_gateway

SID = r"[A-Za-z0-9]{22}"


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns) as gw:
        yield gw


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One whole SMTP reply (every line up to the one without a dash)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def _open_sessions(gateway: Gateway) -> list[Any]:
    return list(gateway.call(lambda: list(gateway.parts.server.sessions._open)))


def _wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_session_runs_on_the_loops_tls_and_keeps_its_id(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        banner = _reply(raw).decode()
        sid = re.search(rf"sendguard ({SID})", banner).group(1)  # type: ignore[union-attr]
        raw.sendall(b"EHLO client.test\r\n")
        assert b"STARTTLS" in _reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith(b"220 ")
        with _client_context().wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            features = _reply(tls)
            assert b"STARTTLS" not in features and b"AUTH" in features
            transports = gateway.call(
                lambda: [type(s.transport) for s in gateway.parts.server.sessions._open])
            assert transports and asyncio.sslproto._SSLProtocolTransport not in transports
            assert all(session.client.tls for session in _open_sessions(gateway))
            # Before AUTH, MAIL is refused with the banner's session id: the id survived.
            tls.sendall(b"MAIL FROM:<jan@kowalski.pl>\r\n")
            assert _reply(tls).decode() == f"550 5.1.0 {sid} authentication failed\r\n"


def test_a_multi_line_reply_is_one_tls_record(gateway: Gateway) -> None:
    # OpenSSL returns one record per read: a reply written line by line would
    # come back as its first line alone.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        _reply(raw)
        raw.sendall(b"EHLO client.test\r\n")
        assert _reply(raw).startswith(b"250-")
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith(b"220 ")
        with _client_context().wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"EHLO client.test\r\n")
            _wait_until(lambda: tls.pending() or _readable(tls), "the EHLO reply")
            time.sleep(0.2)  # every record of the reply is in by now
            lines = tls.recv(65536).split(b"\r\n")
            assert len(lines) > 3 and lines[0].startswith(b"250-"), lines
            assert lines[-2].startswith(b"250 ") and lines[-1] == b""


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_a_message_goes_through_after_starttls(gateway: Gateway) -> None:
    client = gateway.login()  # STARTTLS, then AUTH PLAIN
    assert gateway.send(client, body=MESSAGE)[0] == 250
    client.quit()


def test_plaintext_sent_after_starttls_is_discarded(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        _reply(raw)
        raw.sendall(b"EHLO client.test\r\n")
        _reply(raw)
        # An injected command behind STARTTLS, in the same segment (RFC 3207 §4.2).
        raw.sendall(b"STARTTLS\r\nAUTH PLAIN AGphbkBrb3dhbHNraS5wbABjb3JyZWN0IGhvcnNl\r\n")
        assert _reply(raw).startswith(b"220 ")
        with _client_context().wrap_socket(raw, server_hostname="mx.test") as tls:
            tls.sendall(b"NOOP\r\n")
            assert _reply(tls).startswith(b"250 ")  # the answer to NOOP, nothing before it
            tls.sendall(b"EHLO client.test\r\n")
            _reply(tls)
            tls.sendall(b"MAIL FROM:<jan@kowalski.pl>\r\n")
            assert _reply(tls).startswith(b"550 5.1.0 ")  # not authenticated


def test_failed_handshake_ends_the_session_with_one_log_line(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        sid = re.search(rf"sendguard ({SID})", _reply(raw).decode()).group(1)  # type: ignore[union-attr]
        raw.sendall(b"EHLO client.test\r\n")
        _reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith(b"220 ")
        raw.sendall(b"this is not a TLS client hello\r\n" * 4)
        raw.settimeout(30)
        while raw.recv(4096):  # perhaps a TLS alert, then the close
            pass
    _wait_until(lambda: not _open_sessions(gateway), "the session to end")
    _wait_until(lambda: any(line.get("event") == "tls_failed" and line.get("sid") == sid
                            for line in gateway.log_lines()), "the tls_failed line")
    failed = [line for line in gateway.log_lines() if line.get("sid") == sid
              and line.get("event") == "tls_failed"]
    assert len(failed) == 1 and failed[0]["client_ip"] == "127.0.0.1"
    assert not [line for line in gateway.log_lines() if line.get("level") == "error"]
    # The worker carries on.
    client = gateway.login(password=PASSWORD)
    client.quit()


def test_client_gone_during_the_handshake(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:
        _reply(raw)
        raw.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        data = b""
        while b"220 " not in data:
            data += raw.recv(4096)
    _wait_until(lambda: not _open_sessions(gateway), "the session to end")
