"""Support actions against a running cluster of 2 workers (SPEC §3.9, §6).

``why`` from the workers' memory with the log on stderr, suspensions that
reach open sessions, survive a restart of the whole gateway and lapse,
time-limited countries, counter resets that reach the key's replica, queue
hold/release/purge, and the audit history of all of it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from clusterproc import Cluster, close_session, wait_for
from test_queue import Sink, queue_list, sink, submit  # noqa: F401

from cluster.ring import Ring

pytestmark = pytest.mark.integration

JAN = "jan@kowalski.pl"
ANNA = "anna@nowak.pl"
AMERICAN = "127.0.0.66"     # US in the test database; kowalski.pl allows PL and DE
POLICY_VIOLATION = re.compile(r"5\.1\.0 ([A-Za-z0-9]{22}) policy violation")


def refused_sid(reply: tuple[int, str]) -> str:
    code, text = reply
    found = POLICY_VIOLATION.fullmatch(text)
    assert code == 550 and found, reply
    return found.group(1)


def mail_code(cluster: Cluster, source: str = "127.0.0.5", user: str = JAN) -> int:
    """A new session's answer to MAIL."""
    client = cluster.login(source, user)
    try:
        return client.mail(user)[0]
    finally:
        close_session(client)


def cli(cluster: Cluster, *args: str, code: int = 0) -> str:
    done = cluster.admin(*args)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    return done.stdout if code == 0 else done.stderr


def as_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cli(cluster, *args, "--json"))


def moment(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def history(cluster: Cluster, domain: str) -> list[dict[str, Any]]:
    return list(as_json(cluster, "tenant", "history", domain)["entries"])


def test_why_with_the_log_on_stderr_and_a_reset_that_reaches_the_replica(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, log={"file": ""},
                           limits=[{"window": "1h", "max": 1}]).start()
    assert cluster.send_one("127.0.0.5")[0] == 250
    before = time.time()
    sid = refused_sid(cluster.send_one("127.0.0.5"))

    table = cli(cluster, "why", sid)
    assert table.startswith(f"session {sid}: client 127.0.0.5 (PL), account {JAN}, worker w")
    assert f"550 5.1.0 {sid} policy violation" in table and "rate_limit" in table
    assert "MAIL refusal: ip:127.0.0.5 has 1 of 1 in 1h; room again at " in table
    decisions = as_json(cluster, "why", sid)["decisions"]
    assert [(d["stage"], d["policy"], d["verdict"]) for d in decisions] == [
        ("AUTH", "auth", "accept"), ("MAIL", "rate_limit", "reject")]
    refusal = decisions[-1]
    assert {k: refusal[k] for k in ("sid", "client_ip", "country", "account", "reply", "key",
                                    "window", "count", "max", "sender")} == {
        "sid": sid, "client_ip": "127.0.0.5", "country": "PL", "account": JAN,
        "reply": f"550 5.1.0 {sid} policy violation", "key": "ip:127.0.0.5", "window": "1h",
        "count": 1, "max": 1, "sender": JAN}
    # The window frees up when the first message's bucket (1/60 of the hour) leaves it.
    assert before + 3540 < moment(refusal["clears_at"]) <= before + 3600 + 61
    assert before - 1 < moment(refusal["ts"]) < time.time() + 1
    assert not cluster.log_path.exists()  # nothing but stderr: why did not need a log file

    assert "no decision of session" in cli(cluster, "why", "A" * 22, code=1)
    assert cli(cluster, "why", "not-a-session", code=2)

    inspected = as_json(cluster, "inspect", "ip", "127.0.0.5")
    assert inspected["auth_failures"] == {"count": 0, "max": 10, "window": 600.0,
                                          "locked": False, "clears_at": None}
    assert inspected["bounce"]["accepted"] == 1 and not inspected["bounce"]["refusing"]
    [row] = [r for r in inspected["rows"] if r["key"] == "ip:127.0.0.5"]
    assert (row["count"], row["limit"], row["clears_at"]) == (1, 1, refusal["clears_at"])

    # The reset clears the owner and its replica: with the owner killed right after, the
    # replica takes over with nothing counted, and the limit holds again from there.
    # (Anna: her account's own key is empty, the address's is what is full.)
    refused_sid(cluster.send_one("127.0.0.5", ANNA))
    workers = sorted(cluster.worker_pids())
    owner = Ring(workers).owner("ip:127.0.0.5")
    assert Ring(workers).replica("ip:127.0.0.5") not in (None, owner)
    done = cli(cluster, "counters", "reset", "ip", "127.0.0.5", "--by", "anna",
               "--reason", "false alarm")
    assert done.startswith("reset ") and "ip:127.0.0.5" in done
    pid = cluster.worker_pids()[owner]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: cluster.serving(2) and cluster.worker_pids().get(owner) not in (None, pid),
             30, f"{owner} replaced", every=0.2)
    assert cluster.send_one("127.0.0.5", ANNA)[0] == 250
    refused_sid(cluster.send_one("127.0.0.5", ANNA))

    # An account reset is in the tenant's history.
    assert "acct:" + JAN in cli(cluster, "counters", "reset", "account", JAN, "--by", "anna")
    [entry] = history(cluster, "kowalski.pl")
    assert (entry["action"], entry["subject"], entry["by"]) == ("counters-reset", JAN, "anna")


def test_a_suspension_reaches_open_sessions_survives_a_restart_and_lapses(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    open_session = cluster.login("127.0.0.5")
    assert open_session.mail(JAN)[0] == 250
    open_session.rset()

    done = cli(cluster, "account", "suspend", JAN, "--reason", "password leaked",
               "--by", "anna")
    assert done.startswith(f"{JAN}: SUSPENDED until lifted, by anna at ")

    def refused_in_open_session() -> str | None:
        code, text = open_session.mail(JAN)
        if code == 250:
            open_session.rset()
            return None
        return refused_sid((code, text.decode()))

    sid = wait_for(refused_in_open_session, 10, "the open session refused at MAIL", every=0.1)
    close_session(open_session)
    refusal = as_json(cluster, "why", sid)["decisions"][-1]
    assert (refusal["policy"], refusal["verdict"]) == ("suspension", "reject")
    assert refusal["detail"] == "suspended by anna: password leaked"
    assert mail_code(cluster, user=ANNA) == 250  # another account is not touched
    assert "SUSPENDED until lifted, by anna" in cli(cluster, "inspect", "account", JAN)

    # A restart of the whole gateway keeps it.
    assert cluster.stop() == 0
    cluster.start()
    assert mail_code(cluster) == 550
    assert as_json(cluster, "inspect", "account", JAN)["suspension"]["reason"] == \
        "password leaked"

    assert cli(cluster, "account", "unsuspend", JAN, "--by", "bob").strip() == \
        f"{JAN}: suspension lifted"
    wait_for(lambda: mail_code(cluster) == 250, 10, "mail accepted again")
    assert cli(cluster, "account", "unsuspend", JAN).strip() == f"{JAN}: was not suspended"

    # --for: refused now, accepted once it has run out, without anyone lifting it.
    until = time.time() + 5
    cli(cluster, "account", "suspend", JAN, "--reason", "cool down", "--for", "5s",
        "--by", "anna")
    wait_for(lambda: mail_code(cluster) == 550, 4, "the short suspension in force", every=0.1)
    wait_for(lambda: time.time() > until and mail_code(cluster) == 250, 20,
             "the suspension lapsed", every=0.2)
    wait_for(lambda: history(cluster, "kowalski.pl")[-1]["action"] == "suspension-lapsed", 10,
             "the lapse in the history")
    entries = history(cluster, "kowalski.pl")
    assert [(e["action"], e["by"], e["reason"]) for e in entries] == [
        ("suspend", "anna", "password leaked"), ("unsuspend", "bob", ""),
        ("suspend", "anna", "cool down"), ("suspension-lapsed", "sendguard", "cool down")]
    assert entries[2]["until"] is not None and entries[0]["until"] is None
    table = cli(cluster, "tenant", "history", "kowalski.pl")
    assert table.splitlines()[0].split() == ["WHEN", "BY", "ACTION", "SUBJECT", "WHAT", "UNTIL",
                                             "REASON"]


def test_queue_hold_survives_a_restart_release_delivers_purge_bounces(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:  # noqa: F811
    handler, port = sink
    handler.defer_all = True
    cluster = make_cluster(workers=2, delivery={"port": port, "retry": ["1h"]}).start()
    jans = [submit(cluster, ["held@dest.test"], source=f"127.0.1.{n}") for n in (1, 2, 3)]
    annas = [submit_as(cluster, ANNA, "127.0.1.9")]

    def queued(ids: list[str], state: str | None = None) -> bool:
        data = queue_list(cluster)
        if data is None:
            return False
        found = {m["queue_id"]: m["state"] for m in data["messages"]}
        return set(ids) <= set(found) and (state is None or all(found[i] == state for i in ids))

    wait_for(lambda: queued(jans + annas, "deferred"), 20, "every message tried once")
    held = cli(cluster, "queue", "hold", "--account", JAN, "--by", "anna",
               "--reason", "checking")
    assert held.startswith("held 3 messages")
    assert queued(jans, "held")

    # Held across a restart of the whole gateway, and skipped by a flush.
    assert cluster.stop() == 0
    handler.defer_all = False
    cluster.start()
    wait_for(lambda: queued(jans, "held"), 15, "the held messages listed after the restart")
    assert json.loads(cli(cluster, "queue", "flush", "--json"))["started"] == 1
    wait_for(lambda: set(annas) <= handler.queue_ids(), 20, "anna's message delivered")
    assert queued(jans, "held") and not set(jans) & handler.queue_ids()

    released = as_json(cluster, "queue", "release", jans[0], "--by", "anna")
    assert released["touched"] == 1
    wait_for(lambda: jans[0] in handler.queue_ids(), 20, "the released message delivered")
    assert cli(cluster, "queue", "release", "--account", JAN).startswith("released 2 messages")
    wait_for(lambda: set(jans) <= handler.queue_ids(), 20, "every released message delivered")

    # A purge drops an account's queue; --bounce tells the sender first.
    handler.defer_all = True
    doomed = [submit(cluster, ["spam@dest.test"], source=f"127.0.2.{n}") for n in (1, 2)]
    from_ip = submit_as(cluster, ANNA, "127.0.2.9")
    wait_for(lambda: queued(doomed + [from_ip], "deferred"), 20, "the new mail tried once")
    purged = as_json(cluster, "queue", "purge", "--account", JAN, "--bounce", "--by", "anna")
    assert purged["touched"] == 2 and sorted(m["queue_id"] for m in purged["messages"]) == \
        sorted(doomed)
    assert cli(cluster, "queue", "purge", "--ip", "127.0.2.9").startswith("purged 1 message ")
    handler.defer_all = False
    cli(cluster, "queue", "flush")  # the DSNs were tried, and deferred, meanwhile
    wait_for(lambda: len(handler.mail(dsn=True)) == 2, 20, "a DSN for each purged message")
    assert all(d.rcpt_tos == [JAN] and b"cancelled by the postmaster" in d.content
               for d in handler.mail(dsn=True))
    wait_for(lambda: (data := queue_list(cluster)) is not None and not data["messages"], 20,
             "an empty queue")
    assert not (set(doomed) | {from_ip}) & handler.queue_ids()
    assert cli(cluster, "queue", "purge", "--account", "nobody", code=2)

    actions = [(e["action"], e["details"].get("messages")) for e in history(cluster,
                                                                             "kowalski.pl")]
    assert actions == [("queue-hold", 3), ("queue-release", 1), ("queue-release", 2),
                       ("queue-purge", 2)]
    assert [e["action"] for e in history(cluster, "nowak.pl")] == ["queue-purge"]


def submit_as(cluster: Cluster, user: str, source: str) -> str:
    client = cluster.login(source, user)
    try:
        assert client.mail(user)[0] == 250
        assert client.rcpt("someone@dest.test")[0] == 250
        code, text = client.data(b"From: <" + user.encode() + b">\r\nSubject: x\r\n\r\nhi\r\n")
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]
    finally:
        close_session(client)
