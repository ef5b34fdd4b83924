"""Compromise detection against a running cluster of 2 workers (SPEC §3.10).

Logins from several countries (client addresses mapped to countries by a
test GeoIP database), spam (GTUBE with the builtin scanner), trusted
networks and unknown countries not counted, the suspension's reason in
``why``, ``inspect`` and the history, one suspension per incident, a
lapsed one made again while the signals continue, and the notification
POSTed to an HTTP receiver on loopback that fails the first time.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from clusterproc import Cluster, close_session, free_port, wait_for
from gateway import COUNTRIES, GTUBE, UNKNOWN_IP
from geoipdb import write_country_db
from test_admin_http import start
from test_support import ANNA, JAN, as_json, cli, history, mail_code, moment, refused_sid

pytestmark = pytest.mark.integration

POLAND, GERMANY, AMERICA, CHINA, FRANCE = (
    "127.0.0.5", "127.0.0.42", "127.0.0.66", "127.0.0.77", "127.0.0.88")


class Receiver(BaseHTTPRequestHandler):
    """The provider's endpoint: answers 503 to the first ``failures`` POSTs, then 204."""

    failures = 0
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).bodies.append(body)
            failing = type(self).failures > 0
            type(self).failures -= 1
        self.send_response(503 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[type[Receiver], str]]:
    handler = type("TestReceiver", (Receiver,), {"bodies": [], "failures": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/sendguard?token=t0k3n"
    server.shutdown()
    server.server_close()


def log_in(cluster: Cluster, source: str, user: str = JAN) -> None:
    close_session(cluster.login(source, user))


def send_spam(cluster: Cluster, source: str, user: str = ANNA) -> tuple[int, str]:
    client = cluster.login(source, user)
    try:
        assert client.mail(user)[0] == 250
        assert client.rcpt("someone@example.org")[0] == 250
        code, text = client.data(b"From: <" + user.encode() + b">\r\nSubject: offer\r\n\r\n"
                                 + GTUBE + b"\r\n")
        return code, text.decode()
    finally:
        close_session(client)


def evidence(cluster: Cluster, user: str) -> dict[str, Any]:
    return dict(as_json(cluster, "inspect", "account", user)["compromise"])


def auto_suspensions(cluster: Cluster, domain: str) -> list[dict[str, Any]]:
    return [e for e in history(cluster, domain) if e["action"] == "suspend"]


def test_countries_and_spam_suspend_once_tell_the_provider_and_show_why(
        make_cluster: Callable[..., Cluster], receiver: tuple[type[Receiver], str]) -> None:
    handler, url = receiver
    handler.failures = 1  # the first notification is refused once, then retried
    metrics_port = free_port()
    cluster = make_cluster(
        workers=2,
        server={"trusted_networks": [f"{CHINA}/32"]},
        spam={"grace": 1},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        compromise={"window": "1h", "countries": 3, "spam_messages": 3, "suspend_for": "1h",
                    "notify_url": url})
    write_country_db(cluster.geoip_path, {**COUNTRIES, f"{FRANCE}/32": "FR"})
    cluster.start()

    # A trusted network (the webmail, here in CN) and an unplaceable address are no evidence;
    # Poland and Germany are two countries of three.
    for source in (CHINA, UNKNOWN_IP, POLAND, GERMANY):
        log_in(cluster, source)
    wait_for(lambda: evidence(cluster, JAN)["countries"].keys() == {"DE", "PL"}, 20,
             "logins from PL and DE noted")
    assert mail_code(cluster, POLAND) == 250
    assert auto_suspensions(cluster, "kowalski.pl") == []

    # The third country suspends the account, on every worker, with the evidence as reason.
    log_in(cluster, AMERICA)
    reason = "compromise: logins from 3 countries within 1h: DE, PL, US"

    def refused() -> str | None:
        client = cluster.login(POLAND)
        try:
            code, text = client.mail(JAN)
            return refused_sid((code, text.decode())) if code != 250 else None
        finally:
            close_session(client)

    sid = str(wait_for(refused, 20, "MAIL refused once suspended", every=0.1))
    [suspended] = auto_suspensions(cluster, "kowalski.pl")
    assert (suspended["by"], suspended["subject"], suspended["reason"]) == ("auto", JAN, reason)
    assert suspended["details"]["countries"] == ["DE", "PL", "US"]
    assert 3599 < moment(suspended["until"]) - moment(suspended["ts"]) <= 3600.001
    refusal = as_json(cluster, "why", sid)["decisions"][-1]
    assert (refusal["policy"], refusal["verdict"]) == ("suspension", "reject")
    assert refusal["detail"] == f"suspended by auto until {suspended['until']}: {reason}"
    inspected = as_json(cluster, "inspect", "account", JAN)
    assert (inspected["suspension"]["by"], inspected["suspension"]["reason"]) == ("auto", reason)
    text = cli(cluster, "inspect", "account", JAN)
    assert f"SUSPENDED until {suspended['until']}, by auto at " in text
    assert "compromise evidence in 1h: logins from 3 of 3 countries (DE, PL, US), " \
           "0 of 3 spam messages" in text
    assert "countries DE, PL, US" in cli(cluster, "tenant", "history", "kowalski.pl")

    # The provider is told, after one refused attempt: the same object twice.
    wait_for(lambda: len(handler.bodies) == 2, 30, "the notification retried and delivered")
    first, second = handler.bodies
    assert first == second
    assert {k: first[k] for k in ("account", "reason", "until", "ts", "by", "signal")} == {
        "account": JAN, "reason": reason, "until": suspended["until"],
        "ts": inspected["suspension"]["at"], "by": "auto", "signal": "countries"}
    assert first["evidence"]["countries"] == ["DE", "PL", "US"]

    # More evidence while the suspension is in force makes no second one.
    log_in(cluster, FRANCE)
    wait_for(lambda: "FR" in evidence(cluster, JAN)["countries"], 20, "the login from FR noted")

    # Spam: one accepted within the IP's grace, two refused as spam, all three count.
    assert send_spam(cluster, "127.0.1.1")[0] == 250
    assert send_spam(cluster, "127.0.1.1")[0] == 550
    assert send_spam(cluster, "127.0.1.1")[0] == 550
    wait_for(lambda: mail_code(cluster, "127.0.1.2", ANNA) == 550, 20, "anna suspended")
    [spam] = auto_suspensions(cluster, "nowak.pl")
    assert (spam["by"], spam["reason"]) == ("auto", "compromise: 3 spam messages within 1h")
    assert spam["details"]["messages"] == 3 and len(spam["details"]["spam"]) == 3
    wait_for(lambda: len(handler.bodies) == 3, 30, "anna's notification")
    assert (handler.bodies[2]["account"], handler.bodies[2]["signal"]) == (ANNA, "spam")

    expected = {'sendguard_compromise_suspensions_total{signal="countries"} 1.0',
                'sendguard_compromise_suspensions_total{signal="spam"} 1.0',
                'sendguard_compromise_notifications_total{result="delivered"} 2.0',
                'sendguard_compromise_notifications_total{result="retried"} 1.0',
                'sendguard_compromise_notifications_total{result="failed"} 0.0'}

    def metrics() -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            return set(response.read().decode().splitlines())

    # The receiver has the body before the coordinator has its answer: wait for the count.
    wait_for(lambda: expected <= metrics(), 20, "the metrics of both suspensions")

    # Still one suspension of jan, and one notification (sent twice), for one incident.
    assert len(auto_suspensions(cluster, "kowalski.pl")) == 1
    assert [b["account"] for b in handler.bodies] == [JAN, JAN, ANNA]

    # Support lifts it: the evidence is forgotten, so the next spam does not suspend again.
    cli(cluster, "account", "unsuspend", ANNA, "--by", "anna", "--reason", "password reset")
    assert evidence(cluster, ANNA)["spam_messages"] == 0
    wait_for(lambda: mail_code(cluster, "127.0.1.3", ANNA) == 250, 20, "anna's mail again")


def test_a_lapsed_suspension_is_made_again_while_the_signals_continue(
        make_cluster: Callable[..., Cluster], receiver: tuple[type[Receiver], str]) -> None:
    handler, url = receiver
    cluster, http = start(make_cluster, compromise={"countries": 0, "spam_messages": 2,
                                                    "suspend_for": "4s", "notify_url": url})
    # Logins from three countries are not watched with countries = 0.
    for source in (POLAND, GERMANY, AMERICA):
        log_in(cluster, source, ANNA)
    assert send_spam(cluster, "127.0.1.1")[0] == 250
    assert send_spam(cluster, "127.0.1.2")[0] == 250

    wait_for(lambda: len(auto_suspensions(cluster, "nowak.pl")) == 1, 20, "anna suspended")
    wait_for(lambda: any(e["action"] == "suspension-lapsed"
                         for e in history(cluster, "nowak.pl")), 30, "the suspension lapsed")
    wait_for(lambda: mail_code(cluster, "127.0.1.3", ANNA) == 250, 20, "anna's mail again")
    # One more spam message: two are in the window again, so she is suspended again.
    assert send_spam(cluster, "127.0.1.3")[0] == 250
    wait_for(lambda: len(auto_suspensions(cluster, "nowak.pl")) == 2, 20, "anna suspended again")
    assert [(e["action"], e["by"]) for e in history(cluster, "nowak.pl")] == [
        ("suspend", "auto"), ("suspension-lapsed", "sendguard"), ("suspend", "auto")]
    wait_for(lambda: len(handler.bodies) == 2, 30, "a notification for each suspension")
    assert [b["signal"] for b in handler.bodies] == ["spam", "spam"]
    assert handler.bodies[0]["ts"] != handler.bodies[1]["ts"]
    assert evidence(cluster, ANNA)["countries"] == {}

    # The HTTP API and the support console show the evidence as inspect does.
    status, data = http("GET", f"/api/accounts/{ANNA}")
    assert status == 200 and data["compromise"]["spam_messages"] == 2
    assert data["suspension"]["by"] == "auto"
    status, page = http("GET", "/?account=" + ANNA)
    assert status == 200
    assert ('<p id="compromise">compromise evidence in 1h: 2 of 2 spam messages</p>'
            in page), page
