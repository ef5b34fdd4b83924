"""Limits stay exact across workers: races, a worker killed, a change of worker count."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from clusterproc import Cluster, listeners, wait_for
from gateway import TENANTS, message_from

from cluster.ring import Ring

pytestmark = pytest.mark.integration

ACCOUNT = "race@nowak.pl"
BULK = "bulk@nowak.pl"
RACE_TENANTS = TENANTS + f"""
[accounts."{ACCOUNT}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 10}}]

[accounts."{BULK}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 1000}}]
"""
# The per-address limit: the account above has its own, higher or lower.
IP_LIMIT = [{"window": "1h", "max": 12}]


def race(cluster: Cluster, jobs: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """Every session authenticates and gets to DATA, then all send their message at once."""
    gate = threading.Barrier(len(jobs), timeout=60)

    def one(job: tuple[str, str]) -> tuple[int, str]:
        source, user = job
        client = cluster.login(source, user)
        try:
            code, text = client.mail(user)
            if code == 250:
                code, text = client.rcpt("someone@example.org")
            gate.wait()  # the DATA reservations race, after every MAIL check passed
            if code == 250:
                code, text = client.data(message_from(user))
            return code, text.decode()
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def warm_logins(cluster: Cluster, source: str, user: str) -> None:
    """Log in until every worker has verified ``user``'s password once."""
    for _ in range(60):
        cluster.login(source, user).quit()
        workers = {line["process"] for line in cluster.log_lines()
                   if line.get("stage") == "AUTH" and line.get("account") == user
                   and line.get("verdict") == "accept"}
        if workers == {"w0", "w1"}:
            return
    raise AssertionError(f"logins reached only {sorted(workers)}")


def accepted(replies: list[tuple[int, str]]) -> int:
    refused = [(c, t) for c, t in replies if c != 250]
    # Exactness means refusals for the limit only: no tempfail of a lost owner.
    assert all(c == 550 and t.endswith(" policy violation") for c, t in refused), refused
    return len(replies) - len(refused)


def sessions_per_worker(cluster: Cluster) -> Counter[str]:
    return Counter(line["process"] for line in cluster.log_lines() if line["event"] == "connect")


def test_racing_sessions_on_several_workers_accept_exactly_the_limit(
        make_cluster: Callable[..., Cluster]) -> None:
    # 24 sessions from one address: more than the default connection cap.
    cluster = make_cluster(workers=2, tenants=RACE_TENANTS, limits=IP_LIMIT,
                           server={"max_connections_per_ip": 30}).start()
    # One account from 24 addresses, then one address for 24 sessions of another account.
    one_account = race(cluster, [(f"127.0.1.{i}", ACCOUNT) for i in range(1, 25)])
    # 24 first logins from one address at once would hold more failure slots
    # than auth.max_failures while their hashes run (SPEC §3.1): a busy client
    # has logged in before, and every worker knows its password from its cache.
    warm_logins(cluster, "127.0.2.1", BULK)
    one_address = race(cluster, [("127.0.2.1", BULK)] * 24)
    assert accepted(one_account) == 10
    assert accepted(one_address) == 12
    spread = sessions_per_worker(cluster)
    assert set(spread) == {"w0", "w1"}, spread  # the race crossed processes


def test_a_killed_worker_is_replaced_and_its_counts_survive(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, tenants=RACE_TENANTS, limits=IP_LIMIT).start()
    assert accepted(race(cluster, [(f"127.0.3.{i}", ACCOUNT) for i in range(1, 6)])) == 5
    pids = cluster.worker_pids()
    owner = Ring(["w0", "w1"]).owner(f"acct:{ACCOUNT}")
    os.kill(pids[owner], signal.SIGKILL)

    wait_for(lambda: cluster.serving(2) and cluster.worker_pids().get(owner) not in (
        None, pids[owner]), 30, f"{owner} replaced", every=0.2)
    assert set(listeners(cluster.port)) == set(cluster.worker_pids().values())
    # The other half of the limit, exactly, whoever owns the key now.
    assert accepted(race(cluster, [(f"127.0.4.{i}", ACCOUNT) for i in range(1, 11)])) == 5
    assert cluster.send_one("127.0.4.99", BULK)[0] == 250


def test_scaling_to_three_workers_keeps_counts_exact(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, tenants=RACE_TENANTS, limits=IP_LIMIT).start()
    assert accepted(race(cluster, [(f"127.0.5.{i}", ACCOUNT) for i in range(1, 5)])) == 4

    done = cluster.admin("scale", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scaling to 3 workers (was 2)"
    status = cluster.wait_serving(3)
    assert status["ring"] == ["w0", "w1", "w2"]
    assert len(listeners(cluster.port)) == 3

    assert accepted(race(cluster, [(f"127.0.6.{i}", ACCOUNT) for i in range(1, 11)])) == 6
    inspect = cluster.admin("inspect", "account", ACCOUNT, "--json")
    assert inspect.returncode == 0, inspect.stderr
    rows = json.loads(inspect.stdout)["rows"]
    assert [(r["key"], r["series"], r["window"], r["count"], r["limit"]) for r in rows] == [
        (f"acct:{ACCOUNT}", "msg", 3600.0, 10, 10)]
    table = cluster.admin("inspect", "ip", "127.0.6.1")
    assert table.returncode == 0
    assert "ip:127.0.6.1" in table.stdout and "bounce:127.0.6.1" in table.stdout

    # And back to two: the retired worker hands its keys over and exits 0.
    assert cluster.admin("scale", "2").returncode == 0
    cluster.wait_serving(2)
    assert accepted(race(cluster, [("127.0.7.1", ACCOUNT)] * 2)) == 0
    # w2 leaves on the ring that no longer lists it; its exit may come after.
    retired = wait_for(lambda: [line for line in cluster.log_lines()
                                if line["event"] == "process_retired"], 60, "w2 retired")
    assert [(line["process_name"], line["exit_code"]) for line in retired] == [("w2", 0)]
