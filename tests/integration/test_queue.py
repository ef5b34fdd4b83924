"""Queue and delivery through the whole cluster (SPEC §3.6, §4, §6 ``queue``).

``sendguard run`` as real processes, clients over SMTP on loopback, the
DNS server pointing every MX at 127.0.0.1 and ``delivery.port`` at one
aiosmtpd sink in this process. The sink answers by recipient: domain
``bounce.test`` gets 550, a local part starting with ``later`` gets 451
while ``sink.defer_later`` is set, and everything gets 451 while
``sink.defer_all`` is set. Messages are matched to the ``250 ... queued
as ID`` that acknowledged them by the ``id ID`` of the gateway's
``Received:`` header.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clusterproc import Cluster, serving, wait_for
from dnsserver import TestDNSServer

from cluster.admin import AdminFailure
from worker.spool import Spool, SpoolRecord
from worker.spool.adoption import adopt_orphans

pytestmark = pytest.mark.integration

SENDER = "jan@kowalski.pl"
HEADERS = (b"From: Jan <jan@kowalski.pl>\r\nTo: <ok@dest.test>\r\nSubject: Invoice 42\r\n"
           b"Message-ID: <m42@kowalski.pl>\r\n")
BODY = (b"Hello,\r\n.a line that starts with a dot\r\n.\r\n..two dots\r\n"
        b"Za\xc5\xbc\xc3\xb3\xc5\x82\xc4\x87 g\xc4\x99\xc5\x9bl\xc4\x85 ja\xc5\xba\xc5\x84.\r\n")
MESSAGE = HEADERS + b"\r\n" + BODY
RECEIVED_ID = re.compile(rb"\bwith ESMTPSA id ([A-Za-z0-9]{1,32})")
POLICY_VIOLATION = re.compile(r"5\.1\.0 [A-Za-z0-9]{22} policy violation")


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def is_dsn(self) -> bool:
        return self.mail_from in ("", "<>")  # aiosmtpd keeps the brackets of <>

    @property
    def queue_id(self) -> str | None:
        found = RECEIVED_ID.search(self.content)
        return found.group(1).decode() if found else None


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Delivered] = []
        self.defer_all = False
        self.defer_later = True

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        local, _, domain = address.rpartition("@")
        if domain.lower() == "bounce.test":
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        if self.defer_all or (self.defer_later and local.startswith("later")):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.content))
        return "250 2.0.0 Ok: queued"

    def mail(self, dsn: bool = False) -> list[Delivered]:
        """What arrived from the clients, or (``dsn``) the DSNs."""
        with self.lock:
            return [m for m in self.messages if m.is_dsn == dsn]

    def queue_ids(self) -> set[str]:
        return {m.queue_id for m in self.mail() if m.queue_id}


@pytest.fixture
def sink(dns: TestDNSServer) -> Iterator[tuple[Sink, int]]:
    for domain in ("dest.test", "bounce.test", "kowalski.pl"):
        dns.add_mx(domain, f"mx.{domain}", 10)
        dns.add_a(f"mx.{domain}", "127.0.0.1")
    handler = Sink()
    with serving(handler) as port:
        yield handler, port


def start(make_cluster: Callable[..., Cluster], port: int, **overrides: Any) -> Cluster:
    delivery = {"port": port, "retry": ["1h"]}
    delivery.update(overrides.pop("delivery", {}))
    return make_cluster(workers=2, delivery=delivery, **overrides).start()


def submit(cluster: Cluster, rcpts: list[str], source: str = "127.0.0.5") -> str:
    """One session, one message; the queue id of its 250."""
    client = cluster.login(source)
    try:
        code, text = client.mail(SENDER, ["BODY=8BITMIME"])
        assert code == 250, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(MESSAGE)
        assert code == 250, text
        found = re.fullmatch(r"2\.0\.0 Ok: queued as ([A-Za-z0-9]{1,32})", text.decode())
        assert found, text
        return found.group(1)
    finally:
        client.quit()


def mail_reply(cluster: Cluster, source: str) -> tuple[int, str]:
    client = cluster.login(source)
    code, text = client.mail(SENDER)
    client.quit()
    return code, text.decode()


def queue_list(cluster: Cluster) -> dict[str, Any] | None:
    """The merged list, or None while some worker cannot answer (starting, leaving)."""
    try:
        data = cluster.request("queue", action="list")
    except AdminFailure:
        return None
    return None if data["unanswered"] else data


def holders(cluster: Cluster) -> dict[str, str]:
    """queue id -> the worker that holds it."""
    data = wait_for(lambda: queue_list(cluster), 15, "every worker to answer queue list")
    assert data is not None
    return {m["queue_id"]: m["worker"] for m in data["messages"]}


def fill_both_workers(cluster: Cluster, rcpt: str) -> list[str]:
    """Submit over new connections until w0 and w1 each hold a message (SO_REUSEPORT
    spreads connections by a hash, so a few are nearly always enough)."""
    sent: list[str] = []
    for index in range(40):
        sent.append(submit(cluster, [rcpt], source=f"127.0.1.{10 + index % 8}"))
        if len(sent) >= 4 and set(holders(cluster).values()) == {"w0", "w1"}:
            return sent
    raise AssertionError(f"every message went to one worker: {holders(cluster)}")


def kill_cluster(cluster: Cluster) -> None:
    """kill -9 of the supervisor, the coordinator and every worker, all frozen first."""
    status = cluster.status()
    pids = [status["supervisor_pid"], status["coordinator_pid"],
            *(w["pid"] for w in status["workers"])]
    for signum in (signal.SIGSTOP, signal.SIGKILL):  # none can react to another's death
        for pid in pids:
            os.kill(pid, signum)
    assert cluster.process is not None
    assert cluster.process.wait(10) == -signal.SIGKILL
    wait_for(lambda: all(_dead(pid) for pid in pids), 10, "every process of the cluster to die")


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"  # a zombie is dead too
    except FileNotFoundError:
        return True


def adopted_from(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [line for line in cluster.log_lines()
            if line.get("event") == "spool_adopted" and line.get("from_worker") == name]


def test_delivered_intact_and_queue_list_flush_delete(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    cluster = start(make_cluster, port)

    rcpts = ["ok1@dest.test", "Ok.Two@DEST.test"]
    first = submit(cluster, rcpts)
    [got] = wait_for(lambda: [m for m in handler.mail() if m.queue_id == first], 20,
                     "the message at the sink")
    assert got.mail_from == SENDER and got.rcpt_tos == rcpts
    head, _, body = got.content.partition(b"\r\n\r\n")
    assert body == BODY
    assert head.startswith(b"Received: from client.test ([127.0.0.5])\r\n")
    assert f"id {first}\r\n".encode() in head
    original = HEADERS.split(b"\r\n")[:-1]
    lines = head.split(b"\r\n")
    assert [line for line in lines if line in original] == original  # all kept, in order
    assert any(line.startswith(b"Date: ") for line in lines)  # added: the client sent none

    # Deferred mail on both workers: 451 from the sink, next try in an hour.
    waiting = [submit(cluster, [f"later{n}@dest.test"], source=f"127.0.0.{6 + n}")
               for n in range(3)]

    def all_tried() -> dict[str, Any] | None:
        data = queue_list(cluster)
        if data is None or {m["queue_id"] for m in data["messages"]} != set(waiting):
            return None
        settled = all(m["attempts"] == 1 and m["state"] == "deferred" for m in data["messages"])
        return data if settled else None

    listed = wait_for(all_tried, 20, "three deferred messages in the queue")
    assert listed is not None
    for message in listed["messages"]:
        assert message["worker"] in ("w0", "w1") and message["sender"] == SENDER
        assert "said: 451 4.3.0 Try again later" in message["last_error"]
        assert 3000 < message["next_try_in"] <= 3600
        assert [r["status"] for r in message["recipients"]] == ["deferred"]

    table = cluster.admin("queue", "list")
    assert table.returncode == 0, table.stderr
    for text in ("QUEUE ID", "LAST ERROR", "later0@dest.test (deferred)", "3 messages", *waiting):
        assert text in table.stdout
    as_json = json.loads(cluster.admin("queue", "list", "--json").stdout)
    assert sorted(m["queue_id"] for m in as_json["messages"]) == sorted(waiting)

    gone, kept = waiting[0], waiting[1:]
    deleted = cluster.admin("queue", "delete", gone)
    assert deleted.returncode == 0 and f"deleted {gone}" in deleted.stdout, deleted.stderr
    assert sorted(holders(cluster)) == sorted(kept)
    again = cluster.admin("queue", "delete", gone)
    assert again.returncode == 1 and f"no queued message has the id {gone}" in again.stderr
    assert cluster.admin("queue", "delete", "not-a-queue-id!").returncode == 2

    handler.defer_later = False
    assert json.loads(cluster.admin("queue", "flush", "--json").stdout)["started"] == 2
    wait_for(lambda: set(kept) <= handler.queue_ids(), 20, "the flushed messages at the sink")
    wait_for(lambda: (data := queue_list(cluster)) is not None and not data["messages"], 10,
             "an empty queue")
    assert gone not in handler.queue_ids()
    assert "the queue is empty" in cluster.admin("queue", "list").stdout


def test_kill_9_of_the_whole_cluster_loses_nothing(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    handler.defer_all = True
    cluster = start(make_cluster, port, delivery={"retry": ["1s"]})
    acknowledged = fill_both_workers(cluster, "someone@dest.test")
    kill_cluster(cluster)
    assert not handler.mail()

    # Back with one worker fewer: w0 replays its own folder and adopts w1's, whose
    # name is no longer run.
    handler.defer_all = False
    cluster.config_path.write_text(cluster.config_path.read_text().replace("workers = 2",
                                                                           "workers = 1"))
    cluster.workers = 1
    cluster.start()
    wait_for(lambda: set(acknowledged) <= handler.queue_ids(), 30,
             "every acknowledged message at the sink")
    assert handler.queue_ids() == set(acknowledged)
    assert [line["worker"] for line in adopted_from(cluster, "w1")] == ["w0"]
    wait_for(lambda: (data := queue_list(cluster)) is not None and not data["messages"], 10,
             "an empty queue")


def test_a_restarted_worker_keeps_its_queue_and_a_retired_one_is_adopted(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    handler.defer_all = True
    cluster = start(make_cluster, port)
    acknowledged = fill_both_workers(cluster, "someone@dest.test")
    before = holders(cluster)
    on_w1 = sorted(q for q, worker in before.items() if worker == "w1")

    # A crash: the supervisor starts w1 again, and the new process replays w1's folder.
    old_pid = cluster.worker_pids()["w1"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: cluster.serving(2) and cluster.worker_pids().get("w1", old_pid) != old_pid,
             30, "a new w1 serving")
    assert holders(cluster) == before
    assert not adopted_from(cluster, "w1")

    # Scaled down for good: w1 drains and exits, w0 adopts what it left.
    assert cluster.admin("scale", "1").returncode == 0

    def all_on_w0() -> bool:
        data = queue_list(cluster)
        return data is not None and data["workers"] == ["w0"] and \
            {m["queue_id"]: m["worker"] for m in data["messages"]} == \
            dict.fromkeys(acknowledged, "w0")

    wait_for(all_on_w0, 30, "w1's messages listed on w0")
    [adopted] = adopted_from(cluster, "w1")
    assert adopted["worker"] == "w0" and adopted["messages"] == len(on_w1)

    handler.defer_all = False
    assert cluster.admin("queue", "flush").returncode == 0
    wait_for(lambda: set(acknowledged) <= handler.queue_ids(), 20,
             "every acknowledged message at the sink")
    assert handler.queue_ids() == set(acknowledged)


def test_bounce_ratio_refuses_an_ip_whose_mail_bounces_and_not_one_whose_mail_arrives(
        make_cluster: Callable[..., Cluster], sink: tuple[Sink, int]) -> None:
    handler, port = sink
    cluster = start(make_cluster, port,
                    bounce={"window": "2m", "min_messages": 4, "max_ratio": 0.5})
    bouncer, good = "127.0.2.1", "127.0.2.2"
    bounced = [submit(cluster, [f"user{n}@bounce.test"], source=bouncer) for n in range(4)]
    delivered = [submit(cluster, [f"user{n}@dest.test"], source=good) for n in range(4)]

    wait_for(lambda: len(handler.mail(dsn=True)) == 4, 20, "four DSNs at the sender's MX")
    dsns = handler.mail(dsn=True)
    assert all(d.rcpt_tos == [SENDER] and b"report-type=delivery-status" in d.content
               for d in dsns)
    assert all(any(q.encode() in d.content for d in dsns) for q in bounced)
    wait_for(lambda: set(delivered) <= handler.queue_ids(), 20, "the good IP's mail")

    # Outcomes reach the owner of each IP's counter through the ring.
    def refused() -> str | None:
        code, text = mail_reply(cluster, bouncer)
        return text if code == 550 else None

    text = wait_for(refused, 10, "MAIL from the bouncing IP to be refused", every=0.2)
    assert text is not None
    assert POLICY_VIOLATION.fullmatch(text), text
    assert mail_reply(cluster, good)[0] == 250
    refusals = [line for line in cluster.log_lines() if line.get("policy") == "bounce_ratio"
                and line.get("verdict") == "reject"]
    assert refusals and {line["client_ip"] for line in refusals} == {bouncer}
    assert refusals[-1]["reply"] == f"550 {text}"


# -- adoption, on the spool itself ------------------------------------------------------


def record(n: int) -> SpoolRecord:
    return SpoolRecord.new(session_id="piWs1j0010jifNx01iWsdh", client_ip="192.0.2.10",
                           account=SENDER, helo="laptop.test", mail_from=SENDER,
                           rcpt_tos=[f"r{n}@dest.test"], message=b"Subject: %d\r\n\r\nx" % n)


async def spool_of(folder: Path, name: str, records: list[SpoolRecord]) -> Spool:
    spool = Spool(folder, name)
    spool.load_all()
    for item in records:
        await spool.store(item)
    return spool


async def test_adoption_while_storing_takes_only_orphans_and_loses_nothing(
        tmp_path: Path) -> None:
    theirs = [record(n) for n in range(40)]
    await (await spool_of(tmp_path, "w7", theirs[:30])).aclose()
    # w5 died while merging a claim of w9's queue: that batch is w5's to hand on.
    await (await spool_of(tmp_path, "w9", theirs[30:])).aclose()
    dying = await spool_of(tmp_path, "w5", [])
    dying._claim(tmp_path / "w9")
    await dying.aclose()
    alive = await spool_of(tmp_path, "w8", [record(99)])  # its owner still runs
    on_w1 = record(98)
    await (await spool_of(tmp_path, "w1", [on_w1])).aclose()
    ours = await spool_of(tmp_path, "w0", [])
    mine = [record(100 + n) for n in range(200)]

    async def store(chunk: list[SpoolRecord]) -> None:
        for item in chunk:
            await ours.store(item)
    writers = [asyncio.create_task(store(mine[n::8])) for n in range(8)]
    await asyncio.sleep(0)  # every writer has a store in flight
    taken: list[SpoolRecord] = []
    result = await adopt_orphans(ours, ["w0", "w1"], taken.append)
    await asyncio.gather(*writers)
    assert result == {"adopted": {"w5": 10, "w7": 30}, "busy": ["w8"]}
    assert sorted(r.queue_id for r in taken) == sorted(r.queue_id for r in theirs)
    assert await adopt_orphans(ours, ["w0", "w1"], taken.append) == {"adopted": {},
                                                                      "busy": ["w8"]}
    await ours.aclose()
    await alive.aclose()

    for name, left in (("w0", mine + theirs), ("w7", []), ("w9", []), ("w5", []),
                       ("w1", [on_w1])):
        spool = Spool(tmp_path, name)  # an old name opens fine, and empty unless kept
        try:
            assert {r.queue_id for r in spool.load_all()} == {r.queue_id for r in left}
        finally:
            spool.close()
