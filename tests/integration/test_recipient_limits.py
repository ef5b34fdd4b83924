"""Recipient limits stay exact across two workers, per account and per address, and a
shadow limit beside them counts and logs without refusing."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from clusterproc import Cluster
from gateway import TENANTS, message_from

pytestmark = pytest.mark.integration

ACCOUNT = "rcpt@nowak.pl"
BULK = "bulk@nowak.pl"
LIMIT_TENANTS = TENANTS + f"""
[accounts."{ACCOUNT}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 20, count = "recipients"}},
          {{window = "1h", max = 2, mode = "shadow"}}]

[accounts."{BULK}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 1000}}]
"""
# Every address: 1000 messages, but only 14 recipients, an hour.
IP_LIMITS = [{"window": "1h", "max": 1000},
             {"window": "1h", "max": 14, "count": "recipients"}]


def race(cluster: Cluster, jobs: list[tuple[str, str]], recipients: int) -> list[int]:
    """Every session gets to DATA with its recipients, then all send at once."""
    gate = threading.Barrier(len(jobs), timeout=60)

    def one(job: tuple[str, str]) -> int:
        source, user = job
        client = cluster.login(source, user)
        try:
            code, text = client.mail(user)
            for n in range(recipients):
                if code == 250:
                    code, text = client.rcpt(f"r{n}@example.org")
            gate.wait()  # the reservations race, after every MAIL check passed
            if code == 250:
                code, text = client.data(message_from(user))
            assert code == 250 or (code == 550 and text.endswith(b" policy violation")), text
            return code
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def counts(cluster: Cluster, kind: str, subject: str) -> dict[tuple[str, str, float], tuple[
        int, int | None]]:
    done = cluster.admin("inspect", kind, subject, "--json")
    assert done.returncode == 0, done.stderr
    return {(r["key"], r["series"], r["window"]): (r["count"], r["limit"])
            for r in json.loads(done.stdout)["rows"] if r["series"] in ("msg", "rcpt")}


def test_recipient_limits_are_exact_across_workers(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, tenants=LIMIT_TENANTS, limits=IP_LIMITS).start()

    # The account: 20 recipients. Six messages of 3 fit (18), a seventh would make 21;
    # then two of the five 1-recipient messages fit, exactly to 20.
    first = race(cluster, [(f"127.0.1.{i}", ACCOUNT) for i in range(1, 13)], 3)
    assert first.count(250) == 6
    second = race(cluster, [(f"127.0.1.{i}", ACCOUNT) for i in range(20, 25)], 1)
    assert second.count(250) == 2
    assert counts(cluster, "account", ACCOUNT) == {
        (f"acct:{ACCOUNT}", "rcpt", 3600.0): (20, 20),
        (f"acct:{ACCOUNT}", "msg", 3600.0): (8, None),  # the shadow limit's count
    }

    # One address, another account: 14 recipients. Four of 3 (12), then two of 1.
    third = race(cluster, [("127.0.2.1", BULK)] * 10, 3)
    assert third.count(250) == 4
    fourth = race(cluster, [("127.0.2.1", BULK)] * 5, 1)
    assert fourth.count(250) == 2
    assert counts(cluster, "ip", "127.0.2.1") == {
        ("ip:127.0.2.1", "rcpt", 3600.0): (14, 14),
        ("ip:127.0.2.1", "msg", 3600.0): (6, 1000),
    }

    lines = cluster.log_lines()
    spread = {line["process"] for line in lines if line.get("event") == "connect"}
    assert spread == {"w0", "w1"}, spread  # the races crossed processes

    # The shadow limit (2 messages an hour) never refused: in the first race it would
    # have refused the 3rd to the 6th message accepted, at their end of DATA; in the
    # second, every session at MAIL.
    shadow = [line for line in lines if line.get("verdict") == "shadow"]
    assert all(line["key"] == f"acct:{ACCOUNT}" and line["max"] == 2 and line["count"] >= 2
               for line in shadow)
    assert sorted(line["count"] for line in shadow if line["stage"] == "DATA") == [2, 3, 4, 5]
    assert [line["count"] for line in shadow if line["stage"] == "MAIL"] == [6] * 5

    # And `why` shows it, from the workers' memory.
    sid = shadow[0]["sid"]
    why = cluster.admin("why", sid, "--json")
    assert why.returncode == 0, why.stderr
    [remembered] = [d for d in json.loads(why.stdout)["decisions"] if d["verdict"] == "shadow"]
    assert remembered["reply"] == f"550 5.1.0 {sid} policy violation"
    assert (remembered["key"], remembered["max"]) == (f"acct:{ACCOUNT}", 2)
