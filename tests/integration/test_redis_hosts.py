"""Several hosts share their limits through Redis (``[counters] backend = "redis"``).

Each "host" is its own ``sendguard run``: its own configuration file, port,
spool and runtime folder, no socket to the other one; the only thing they
share is a real redis-server (or a three-node Redis Cluster) started here.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clusterproc import Cluster, serving, wait_for
from dnsserver import TestDNSServer
from gateway import GTUBE, PASSWORD, TENANTS, message_from, plain_auth
from redisserver import RedisCluster, RedisServer
from test_queue import Sink

pytestmark = pytest.mark.integration

ACCOUNT = "race@nowak.pl"
BULK = "bulk@nowak.pl"
TENANTS_WITH_LIMITS = TENANTS + f"""
[accounts."{ACCOUNT}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 10}}]

[accounts."{BULK}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 1000}}]
"""
IP_LIMIT = [{"window": "1h", "max": 12}]
POLICY_TEMPFAIL = "451 4.3.0"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def two_hosts(make_cluster: Callable[..., Cluster], counters: dict[str, object],
              **overrides: object) -> tuple[Cluster, Cluster]:
    made = [make_cluster(workers=1, tenants=TENANTS_WITH_LIMITS, limits=IP_LIMIT,
                         counters=counters, **overrides) for _ in range(2)]
    for host in made:
        host.start(wait=False)
    for host in made:
        host.wait_serving(1)
    return made[0], made[1]


def race(jobs: list[tuple[Cluster, str, str]]) -> list[tuple[int, str]]:
    """Every session gets to DATA on its host, then all send their message at once."""
    gate = threading.Barrier(len(jobs), timeout=60)

    def one(job: tuple[Cluster, str, str]) -> tuple[int, str]:
        host, source, user = job
        client = host.login(source, user)
        try:
            code, text = client.mail(user)
            if code == 250:
                code, text = client.rcpt("someone@example.org")
            gate.wait()
            if code == 250:
                code, text = client.data(message_from(user))
            return code, text.decode()
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def accepted(replies: list[tuple[int, str]]) -> int:
    refused = [(c, t) for c, t in replies if c != 250]
    assert all(c == 550 and t.endswith(" policy violation") for c, t in refused), refused
    return len(replies) - len(refused)


def race_on_one_account_and_one_address(a: Cluster, b: Cluster) -> None:
    hosts = [a, b]
    by_account = race([(hosts[i % 2], f"127.0.1.{i}", ACCOUNT) for i in range(1, 25)])
    assert accepted(by_account) == 10
    by_address = race([(hosts[i % 2], "127.0.2.1", BULK) for i in range(24)])
    assert accepted(by_address) == 12
    for host in hosts:  # both hosts decided at DATA in both races
        decided = [line for line in host.log_lines() if line.get("event") == "decision"
                   and line.get("stage") == "DATA"]
        assert {line["account"] for line in decided} == {ACCOUNT, BULK}


def test_two_hosts_share_every_limit_through_one_redis(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, {"backend": "redis", "redis_url": redis.url})
    race_on_one_account_and_one_address(a, b)

    # Support sees and changes the same counts from either host.
    for host in (a, b):
        shown = host.request("inspect", kind="account", subject=ACCOUNT)
        assert shown["worker"] == "redis"
        assert [(r["series"], r["window"], r["count"], r["limit"]) for r in shown["rows"]] \
            == [("msg", 3600.0, 10, 10)]
        assert shown["rows"][0]["clears_at"].endswith("Z")  # ISO 8601, UTC
    done = b.admin("counters", "reset", "account", ACCOUNT, "--by", "support")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"reset 1 counters of acct:{ACCOUNT} (on redis)"
    assert a.request("inspect", kind="account", subject=ACCOUNT)["rows"] == []
    assert a.send_one("127.0.1.1", ACCOUNT)[0] == 250

    address = a.request("inspect", kind="ip", subject="127.0.2.1")["rows"]
    # Delivery outcomes may add a "bad" series; the counts of acceptance are exact.
    assert {(r["key"], r["series"], r["count"]) for r in address
            if r["series"] != "bad"} == {
        ("ip:127.0.2.1", "msg", 12), ("bounce:127.0.2.1", "acc", 12)}


def test_two_hosts_share_every_limit_through_a_redis_cluster(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path / "rc").start()
    try:
        a, b = two_hosts(make_cluster, {"backend": "redis", "redis_cluster": cluster.seeds[:2]})
        race_on_one_account_and_one_address(a, b)
    finally:
        cluster.stop()


def test_redis_stopped_mid_run_tempfails_then_resumes_without_over_admitting(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, {"backend": "redis", "redis_url": redis.url},
                     cluster={"runtime_dir": "run", "request_timeout": "300ms"})
    sent = [host.send_one(f"127.0.3.{i}", ACCOUNT) for i, host in enumerate((a, b, a, b))]
    assert [code for code, _ in sent] == [250] * 4

    # Sessions that logged in while Redis was up: one at MAIL, one already at DATA.
    at_mail = [host.login(f"127.0.3.{7 + i}", ACCOUNT) for i, host in enumerate((a, b))]
    at_data = b.login("127.0.3.9", ACCOUNT)
    try:
        assert at_data.mail(ACCOUNT)[0] == 250
        assert at_data.rcpt("someone@example.org")[0] == 250
        redis.stop()
        for client in at_mail:
            code, text = client.mail(ACCOUNT)
            assert code == 451, (code, text)
            assert text.decode().startswith(POLICY_TEMPFAIL[4:])
            assert text.decode().endswith("temporary policy failure, try later")
        code, text = at_data.data(message_from(ACCOUNT))  # refused there too, not queued
        assert code == 451 and text.decode().endswith("temporary policy failure, try later")
    finally:
        for client in (*at_mail, at_data):
            client.close()

    redis.start()  # from its AOF: the four messages still count
    after = [host.send_one(f"127.0.4.{i}", ACCOUNT) for i, host in enumerate((a, b) * 4)]
    assert [code for code, _ in after] == [250] * 6 + [550] * 2, after


def test_counts_survive_a_redis_crash_through_its_aof(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, {"backend": "redis", "redis_url": redis.url})
    for i in range(7):
        assert (a if i % 2 else b).send_one(f"127.0.5.{i}", ACCOUNT)[0] == 250
    redis.stop(kill=True)  # SIGKILL: what was written to the AOF before each reply stays
    redis.start()
    rows = b.request("inspect", kind="account", subject=ACCOUNT)["rows"]
    assert [r["count"] for r in rows] == [7]
    replies = [host.send_one(f"127.0.6.{i}", ACCOUNT)[0] for i, host in enumerate((a, b) * 2)]
    assert replies == [250, 250, 250, 550]


def test_a_reload_that_changes_the_counter_store_is_refused(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    host = make_cluster(workers=1, tenants=TENANTS_WITH_LIMITS, limits=IP_LIMIT,
                        counters={"backend": "redis", "redis_url": redis.url}).start()
    assert host.send_one("127.0.7.1", ACCOUNT)[0] == 250
    before = host.status()["config_version"]
    text = host.config_path.read_text()
    switched = text.replace('backend = "redis"', 'backend = "ring"').replace(
        f'redis_url = "{redis.url}"\n', "")
    assert switched.count('backend = "ring"') == 1 and redis.url not in switched
    host.config_path.write_text(switched)
    host.signal(signal.SIGHUP)
    [refusal] = wait_for(lambda: [line for line in host.log_lines()
                                  if line.get("event") == "reload_refused"], 15,
                         "the reload refused")
    assert refusal["error"] == (f"{host.config_path}: counters: changes only with a restart "
                                "of the gateway")
    assert host.status()["config_version"] == before
    # Still counted in Redis, where the first message is.
    assert host.send_one("127.0.7.2", ACCOUNT)[0] == 250
    shown = host.request("inspect", kind="account", subject=ACCOUNT)
    assert shown["worker"] == "redis" and [r["count"] for r in shown["rows"]] == [2]


def test_two_hosts_share_auth_failures_and_spam_grace(
        make_cluster: Callable[..., Cluster], redis: RedisServer) -> None:
    a, b = two_hosts(make_cluster, {"backend": "redis", "redis_url": redis.url},
                     auth={"max_failures": 3, "failure_window": "10m"}, spam={"grace": 2})

    def auth(host: Cluster, password: str) -> tuple[int, str]:
        client = host.connect("127.0.8.1")
        try:
            code, text = client.docmd("AUTH", "PLAIN " + plain_auth(BULK, password))
            return code, text.decode()
        finally:
            client.close()

    # Three failures between the two hosts use up the address's allowance on both.
    assert [auth(host, "wrong")[0] for host in (a, b, a)] == [535, 535, 535]
    for host in (b, a):
        code, text = auth(host, PASSWORD)
        assert code == 454 and text.endswith(" too many authentication failures, try later")

    # Spam: the address's grace of two is spent across the hosts, then refused on both.
    def spam(host: Cluster) -> tuple[int, str]:
        client = host.login("127.0.8.2", BULK)
        try:
            assert client.mail(BULK)[0] == 250
            assert client.rcpt("someone@example.org")[0] == 250
            code, text = client.data(message_from(BULK).replace(
                b"An ordinary message", GTUBE))
            return code, text.decode()
        finally:
            client.close()

    assert [spam(host)[0] for host in (a, b)] == [250, 250]
    for host in (a, b):
        code, text = spam(host)
        assert code == 550 and text.endswith(" spam detected"), (code, text)


@pytest.fixture
def bouncing_sink(dns: TestDNSServer) -> Iterator[tuple[Sink, int]]:
    """Every MX on loopback; the sink answers 550 to recipients at bounce.test."""
    for domain in ("bounce.test", "nowak.pl"):
        dns.add_mx(domain, f"mx.{domain}", 10)
        dns.add_a(f"mx.{domain}", "127.0.0.1")
    handler = Sink()
    with serving(handler) as port:
        yield handler, port


def test_two_hosts_share_an_addresss_bounce_ratio(
        bouncing_sink: tuple[Sink, int], redis: RedisServer,
        make_cluster: Callable[..., Cluster]) -> None:
    # The sink first: it stops after the hosts, whose delivery sessions it holds.
    handler, port = bouncing_sink
    a, b = two_hosts(make_cluster, {"backend": "redis", "redis_url": redis.url},
                     bounce={"window": "1h", "min_messages": 4, "max_ratio": 0.5},
                     delivery={"port": port, "retry": ["1h"]})
    bouncer = "127.0.9.1"
    # Two messages through each host, all bounced by the next hop.
    for host in (a, b, a, b):
        assert host.send_one(bouncer, BULK, recipient="nobody@bounce.test")[0] == 250
    wait_for(lambda: len(handler.mail(dsn=True)) == 4, 30, "four DSNs, two from each host")

    def refused(host: Cluster) -> str | None:
        code, text = host.send_one(bouncer, BULK)
        return text if code == 550 else None

    for host in (a, b):  # 4 of 4 bounced, counted in Redis: refused on both hosts
        text = wait_for(lambda h=host: refused(h), 20, "MAIL from the bouncing address refused")
        assert text is not None and text.endswith(" policy violation"), text
        [line] = [entry for entry in host.log_lines() if entry.get("policy") == "bounce_ratio"
                  and entry.get("verdict") == "reject"][-1:]
        assert line["client_ip"] == bouncer
    assert a.send_one("127.0.9.2", BULK)[0] == 250  # another address is not affected
