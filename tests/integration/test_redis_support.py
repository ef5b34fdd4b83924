"""Support actions across hosts that share one Redis (``[counters] backend = "redis"``).

Two independent gateways (own configuration, port, spool, runtime and state
folders) and a real redis-server: a suspension or a country exception made
on one host is in force on the other, in sessions already open too; a lapse
is recorded once; history and inspect read the same from both; with Redis
stopped the suspensions stay in force and support commands fail in one line.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from clusterproc import Cluster, close_session, wait_for
from redisserver import RedisServer
from test_compromise import evidence, log_in, send_spam
from test_support import JAN, as_json, cli, history, mail_code, moment, refused_sid

pytestmark = pytest.mark.integration

ANNA = "anna@nowak.pl"
AMERICAN = "127.0.0.66"     # US in the test database; kowalski.pl allows PL and DE
STORE_DOWN = "sendguard: the state store cannot be reached: redis: "


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def two_hosts(make_cluster: Callable[..., Cluster], redis: RedisServer,
              **overrides: Any) -> tuple[Cluster, Cluster]:
    made = [make_cluster(workers=1, counters={"backend": "redis", "redis_url": redis.url},
                         **overrides) for _ in range(2)]
    for host in made:
        host.start(wait=False)
    for host in made:
        host.wait_serving(1)
    return made[0], made[1]


def events(host: Cluster, name: str, since: float = 0.0) -> list[dict[str, Any]]:
    return [line for line in host.log_lines()
            if line.get("event") == name and line.get("process") == "coordinator"
            and moment(line["ts"]) >= since]


def refused_at_mail(session: smtplib.SMTP, user: str) -> str | None:
    """The refusal's session id once MAIL is refused in this open session, else None."""
    code, text = session.mail(user)
    if code == 250:
        session.rset()
        return None
    return refused_sid((code, text.decode()))


def test_a_suspension_made_on_one_host_holds_on_the_other_and_outlives_a_redis_outage(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, redis)
    on_b = b.login("127.0.0.5")
    assert on_b.mail(JAN)[0] == 250
    on_b.rset()

    done = cli(a, "account", "suspend", JAN, "--reason", "password leaked", "--by", "anna")
    assert done.startswith(f"{JAN}: SUSPENDED until lifted, by anna at ")
    # Host B's coordinator reads it from Redis within a tick; its worker refuses
    # MAIL in the session that was already open.
    sid = wait_for(lambda: refused_at_mail(on_b, JAN), 15,
                   "host B refusing the open session at MAIL", every=0.1)
    assert sid is not None
    refusal = as_json(b, "why", sid)["decisions"][-1]
    assert (refusal["policy"], refusal["detail"]) == (
        "suspension", "suspended by anna: password leaked")
    assert mail_code(b) == 550 and mail_code(b, user=ANNA) == 250
    for host in (a, b):
        assert as_json(host, "inspect", "account", JAN)["suspension"]["by"] == "anna"

    # Lifted on B: in force on A; both hosts read one history.
    assert cli(b, "account", "unsuspend", JAN, "--by", "bob").strip() == \
        f"{JAN}: suspension lifted"
    wait_for(lambda: mail_code(a) == 250, 15, "host A accepting jan again")
    assert cli(a, "account", "unsuspend", JAN).strip() == f"{JAN}: was not suspended"
    entries = history(a, "kowalski.pl")
    assert [(e["action"], e["by"]) for e in entries] == [("suspend", "anna"), ("unsuspend", "bob")]
    assert history(b, "kowalski.pl") == entries

    # Redis stops: what each host read last stays in force (open sessions logged in
    # before: a suspended account is refused for its suspension, before the
    # counters, which need Redis, answer 451), and support commands fail in one line.
    on_a = {user: a.login("127.0.0.6", user) for user in (JAN, ANNA)}
    cli(b, "account", "suspend", JAN, "--reason", "again", "--by", "anna", "--for", "1h")
    for session in (on_b, on_a[JAN]):
        wait_for(partial(refused_at_mail, session, JAN), 15,
                 "both hosts refusing jan again", every=0.1)
    stopped = time.time()
    redis.stop()
    try:
        assert on_a[JAN].mail(JAN)[0] == 550
        assert on_b.mail(JAN)[0] == 550
        code, text = on_a[ANNA].mail(ANNA)
        assert code == 451 and text.decode().endswith("temporary policy failure, try later")
        for args in (("account", "unsuspend", JAN), ("tenant", "history", "kowalski.pl"),
                     ("account", "suspend", ANNA, "--reason", "x"),
                     ("tenant", "allow-country", "kowalski.pl", "US", "--for", "1d"),
                     ("inspect", "account", ANNA), ("counters", "reset", "ip", "127.0.0.5")):
            # The coordinator's own answer (not the CLI giving up after 10 s), in one line.
            failed = b.admin(*args)
            assert failed.returncode == 1, (args, failed.stdout, failed.stderr)
            assert failed.stderr.startswith(STORE_DOWN) and failed.stderr.count("\n") == 1, \
                failed.stderr
        for host in (a, b):
            wait_for(partial(events, host, "state_store_failed", stopped), 15,
                     "the coordinator logging that the store failed")
    finally:
        for session in (*on_a.values(), on_b):
            close_session(session)
    redis.start()
    for host in (a, b):
        wait_for(partial(events, host, "state_store_back", stopped), 15,
                 "the coordinator finding the store again")
        assert len(events(host, "state_store_failed", stopped)) == 1  # logged once, not per tick
    assert as_json(a, "inspect", "account", JAN)["suspension"]["reason"] == "again"
    cli(a, "account", "unsuspend", JAN, "--by", "bob")
    wait_for(lambda: mail_code(b) == 250, 15, "host B accepting jan once lifted on A")


def test_a_country_granted_on_one_host_holds_on_the_other_and_lapses_once(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, redis)
    assert mail_code(b, AMERICAN) == 550
    granted = time.time()
    until = granted + 6
    cli(a, "tenant", "allow-country", "kowalski.pl", "US", "--for", "6s", "--reason",
        "conference", "--by", "anna")
    assert [e["country"] for e in b.request("countries", domain="kowalski.pl")["exceptions"]] \
        == ["US"]
    wait_for(lambda: time.time() > until or mail_code(b, AMERICAN) == 250, 15,
             "host B allowing US")
    assert time.time() < until, "the machine is too slow to see the exception before it lapsed"
    wait_for(lambda: time.time() > until and mail_code(b, AMERICAN) == 550
             and mail_code(a, AMERICAN) == 550, 30, "US refused again on both hosts")

    def done_with_the_lapse(host: Cluster) -> bool:
        """This host no longer holds the exception: it lapsed it, or read that another did."""
        return bool(events(host, "country_exception_lapsed", granted)
                    or [line for line in events(host, "support_state_synced", until)
                        if line["exceptions"] == 0])

    for host in (a, b):
        wait_for(partial(done_with_the_lapse, host), 15,
                 "each coordinator done with the lapse")
    recorded = [line for host in (a, b) for line in events(host, "country_exception_lapsed")
                if line["recorded"]]
    assert len(recorded) == 1
    entries = history(b, "kowalski.pl")
    assert [(e["action"], e["by"], e["details"]["country"]) for e in entries] == [
        ("allow-country", "anna", "US"), ("exception-lapsed", "sendguard", "US")]
    assert history(a, "kowalski.pl") == entries


def test_a_suspension_lifted_on_another_host_forgets_this_hosts_evidence(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    # Support lifting the suspension on any host has dealt with it: the host that
    # made it must not suspend again on the evidence it saw.
    a, b = two_hosts(make_cluster, redis, compromise={
        "countries": 0, "spam_messages": 2, "suspend_for": "1h"})
    for source in ("127.0.1.1", "127.0.1.2"):
        send_spam(a, source)
    wait_for(lambda: [e["by"] for e in history(b, "nowak.pl")] == ["auto"], 20,
             "anna suspended by host A")
    assert evidence(a, ANNA)["spam_messages"] == 2

    cli(b, "account", "unsuspend", ANNA, "--by", "bob", "--reason", "password reset")
    wait_for(lambda: evidence(a, ANNA)["spam_messages"] == 0, 15,
             "host A forgetting the evidence of the lifted suspension")
    assert mail_code(a, user=ANNA) == 250
    send_spam(a, "127.0.1.3")
    wait_for(lambda: evidence(a, ANNA)["spam_messages"] == 1, 15, "the new spam noted on A")
    assert [(e["action"], e["by"]) for e in history(a, "nowak.pl")] == [
        ("suspend", "auto"), ("unsuspend", "bob")]
    assert as_json(a, "inspect", "account", ANNA)["suspension"] is None


def test_logins_from_countries_seen_by_different_hosts_add_up(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, redis, compromise={
        "countries": 3, "spam_messages": 0, "suspend_for": "1h"})
    log_in(a, "127.0.0.5")     # PL
    log_in(b, "127.0.0.42")    # DE
    for host in (a, b):        # either host shows both, whichever saw them
        wait_for(lambda h=host: evidence(h, JAN)["countries"].keys() == {"DE", "PL"}, 15,
                 "both logins in the shared evidence")
    assert mail_code(a) == 250
    log_in(a, AMERICAN)        # US, the third country: on A, which saw only PL itself
    wait_for(lambda: mail_code(b) == 550, 15, "jan suspended on both hosts")
    [made] = [e for e in history(b, "kowalski.pl") if e["action"] == "suspend"]
    assert (made["by"], made["details"]["countries"]) == ("auto", ["DE", "PL", "US"])
    assert made["reason"] == "compromise: logins from 3 countries within 1h: DE, PL, US"

    # Lifted on B: the shared evidence goes, so a fourth country starts from one.
    cli(b, "account", "unsuspend", JAN, "--by", "bob")
    wait_for(lambda: mail_code(a) == 250, 15, "jan accepted again on A")
    assert evidence(a, JAN)["countries"] == {}
    log_in(a, "127.0.0.42")    # (a worker tells a country once a minute: A has told PL, US)
    wait_for(lambda: evidence(b, JAN)["countries"].keys() == {"DE"}, 15, "the new login noted")
    assert [e["action"] for e in history(a, "kowalski.pl")] == ["suspend", "unsuspend"]
    # A reset of the account's counters on B clears it for A too, before it answers.
    cli(b, "counters", "reset", "account", JAN, "--by", "bob")
    assert evidence(a, JAN)["countries"] == {}
