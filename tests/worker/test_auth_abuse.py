"""SPEC §3.1 under attack, over real SMTP: racing AUTHs, abandoned AUTHs, unknown users,
a full hashing queue, a foreign authorization id, and an internal error during AUTH."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import PASSWORD, Gateway, plain_auth, reply, running_gateway

from cluster.passwords import cost_of, hash_password
from worker.auth import PasswordVerifier

SID = r"[A-Za-z0-9]{22}"
# bcrypt at cost 10 takes ~70 ms here: slow enough for twelve AUTHs to overlap.
SLOW = hash_password(PASSWORD, "BLF-CRYPT", cost=10)
TENANTS = f"""
[domains."kowalski.pl"]
[accounts."jan@kowalski.pl"]
password = "{SLOW}"
[accounts."ewa@kowalski.pl"]
password = "{hash_password(PASSWORD, "BLF-CRYPT", cost=10)}"
"""


class CountingVerifier(PasswordVerifier):
    """The real verifier, noting the cost of every hash it computes."""

    def __init__(self, *args: Any, gate: threading.Event | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.costs: list[str] = []
        self.gate = gate
        self._lock = threading.Lock()

    def _verify_blocking(self, stored: str, password: str) -> bool:
        if self.gate is not None:
            self.gate.wait(20)
        with self._lock:
            self.costs.append(cost_of(stored))
        return super()._verify_blocking(stored, password)


class BrokenVerifier(PasswordVerifier):
    """A hashing library that fails in an unforeseen way."""

    def _verify_blocking(self, stored: str, password: str) -> bool:
        raise RuntimeError("the hashing library fell over")


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, tenants_text=TENANTS,
                         auth={"max_failures": 3, "failure_window": "1m",
                               "max_pending": 1}) as gw:
        yield gw


def use_verifier(gateway: Gateway, verifier: PasswordVerifier) -> None:
    engine = gateway.parts.engine
    gateway.call(setattr, engine, "verifier", verifier)


def decisions(gateway: Gateway, **match: Any) -> list[dict[str, Any]]:
    return [line for line in gateway.log_lines() if line.get("event") == "decision"
            and all(line.get(k) == v for k, v in match.items())]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def code_of(client: smtplib.SMTP, line: str) -> int:
    return reply(client, line)[0]


def test_racing_auths_get_no_more_verifications_than_max_failures(gateway: Gateway) -> None:
    verifier = CountingVerifier(4)
    use_verifier(gateway, verifier)
    clients = [gateway.connect("127.0.0.90") for _ in range(12)]
    barrier = threading.Barrier(len(clients))
    codes: list[int] = []

    def guess(client: smtplib.SMTP) -> None:
        barrier.wait(30)
        codes.append(code_of(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess")))

    threads = [threading.Thread(target=guess, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == [454] * 9 + [535] * 3
    assert len(verifier.costs) == 3  # nine were turned away before any hashing
    assert len(decisions(gateway, stage="AUTH", detail="wrong password")) == 3
    for client in clients:
        client.close()


def _abandon_auth(gateway: Gateway, source: str) -> None:
    """STARTTLS, then AUTH with a wrong password, and hang up without waiting."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", gateway.port), 30,
                                  source_address=(source, 0)) as raw:
        stream = raw.makefile("rb")
        stream.readline()
        raw.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        while not stream.readline().startswith(b"220 "):
            pass
        with context.wrap_socket(raw, server_hostname="mx.test") as tls:
            lines = tls.makefile("rb")
            tls.sendall(b"EHLO client.test\r\n")
            while not lines.readline().startswith(b"250 "):
                pass
            tls.sendall(b"AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess").encode()
                        + b"\r\n")
        # Closed at once: the server is still hashing.


def test_an_abandoned_auth_counts_as_a_failure(gateway: Gateway) -> None:
    gate = threading.Event()  # the hashes wait until every client has hung up
    use_verifier(gateway, CountingVerifier(4, gate=gate))
    for _ in range(3):
        _abandon_auth(gateway, "127.0.0.91")
    wait_for(lambda: len(decisions(gateway, stage="AUTH", detail="abandoned during the check"))
             == 3, "three abandoned AUTHs")
    gate.set()
    client = gateway.connect("127.0.0.91")
    # Even the right password: the address has used its three failures.
    assert reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[0] == 454
    client.quit()


def test_a_success_gives_its_reserved_failure_back(gateway: Gateway) -> None:
    for _ in range(3):
        gateway.login("127.0.0.92").quit()
    # Three successes left nothing behind: three wrong guesses are still 535, then 454.
    client = gateway.connect("127.0.0.92")
    codes = [code_of(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess"))
             for _ in range(4)]
    assert codes == [535, 535, 535, 454]
    # The right password, which the verifier has cached: still locked out.
    assert code_of(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD)) == 454
    client.quit()


def test_an_unknown_user_costs_one_verification_like_a_known_one(gateway: Gateway) -> None:
    verifier = CountingVerifier(2)
    use_verifier(gateway, verifier)
    client = gateway.connect("127.0.0.93")
    code, text = reply(client, "AUTH PLAIN " + plain_auth("nobody@kowalski.pl", "guess"))
    assert code == 535 and text.endswith("authentication failed")
    assert verifier.costs == [cost_of(SLOW)]  # a decoy of the accounts' scheme and cost
    code, text = reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess"))
    assert code == 535
    assert verifier.costs == [cost_of(SLOW)] * 2
    client.quit()
    unknown, known = decisions(gateway, stage="AUTH", verdict="reject")[-2:]
    assert (unknown["detail"], known["detail"]) == ("unknown user", "wrong password")
    assert unknown["reply"] == known["reply"].replace(known["sid"], unknown["sid"])


def test_verifications_waiting_for_a_thread_are_capped(gateway: Gateway) -> None:
    gate = threading.Event()
    verifier = CountingVerifier(1, gate=gate)  # one hashing thread, held shut
    use_verifier(gateway, verifier)
    clients = [gateway.connect(f"127.0.0.{94 + n}") for n in range(3)]
    results: dict[int, int] = {}

    def auth(index: int) -> None:
        results[index] = code_of(clients[index],
                                 "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess"))

    first = threading.Thread(target=auth, args=(0,))
    first.start()
    wait_for(lambda: verifier.in_flight == 1, "the first AUTH in the thread")
    second = threading.Thread(target=auth, args=(1,))
    second.start()
    wait_for(lambda: verifier.waiting == 1, "the second AUTH waiting")
    # auth.max_pending = 1: a third one is turned away, and not counted as a failure.
    auth(2)
    assert results[2] == 454
    gate.set()
    first.join(30)
    second.join(30)
    assert (results[0], results[1]) == (535, 535)
    busy = decisions(gateway, stage="AUTH", policy="auth_throttle")
    assert busy and busy[-1]["detail"].startswith("hashing queue full")
    assert code_of(clients[2], "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD)) == 235
    for client in clients:
        client.quit()


@pytest.mark.parametrize(("authzid", "code"), [
    ("", 235), ("jan@kowalski.pl", 235), ("jan@KOWALSKI.PL", 235),
    ("ewa@kowalski.pl", 535), ("admin", 535),
])
def test_plain_authorization_id(gateway: Gateway, authzid: str, code: int) -> None:
    client = gateway.connect("127.0.0.97")
    blob = base64.b64encode(f"{authzid}\0jan@kowalski.pl\0{PASSWORD}".encode()).decode()
    got, text = reply(client, "AUTH PLAIN " + blob)
    assert got == code, text
    if code == 535:
        assert text.endswith("authentication failed")
        assert decisions(gateway, stage="AUTH")[-1]["detail"] == (
            "authorization id names another user")
    client.quit()


def test_an_internal_error_during_auth_answers_451_and_counts_nothing(
        gateway: Gateway) -> None:
    use_verifier(gateway, BrokenVerifier(1))
    client = gateway.connect("127.0.0.98")
    for _ in range(4):  # more than max_failures: none of them is counted
        code, text = reply(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", "guess"))
        assert code == 451 and text.endswith(" temporary failure, try later"), text
        assert "Error" not in text and "RuntimeError" not in text
    line = decisions(gateway, stage="AUTH", policy="internal")[-1]
    assert line["level"] == "error" and "the hashing library fell over" in line["detail"]
    assert "Traceback" not in gateway.settings.log_file.read_text()  # type: ignore[union-attr]
    use_verifier(gateway, CountingVerifier(1))
    assert code_of(client, "AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD)) == 235
    client.quit()
