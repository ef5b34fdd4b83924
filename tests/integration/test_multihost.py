"""Two hosts form one cluster over tcp:// with CURVE; a host whose key is not listed cannot join.

Each "host" is its own ``sendguard run`` with its own configuration,
runtime folder, spool, SMTP port and loopback address: A runs the
coordinator (``cluster.bind``), B joins it (``cluster.coordinator``), C
joins it too but A does not list C's public key.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from clusterproc import ROOT, Cluster, listeners, wait_for
from gateway import TENANTS, message_from

from cluster import wire
from cluster.admin import AdminFailure, request
from cluster.hosts import uplink_for
from cluster.settings import load_settings

pytestmark = pytest.mark.integration

ACCOUNT = "race@nowak.pl"
OTHER = "other@nowak.pl"
RACE_TENANTS = TENANTS + f"""
[accounts."{ACCOUNT}"]
password = "{{PLAIN}}correct horse"
limits = [{{window = "1h", max = 10}}]

[accounts."{OTHER}"]
password = "{{PLAIN}}correct horse"
"""
ADDRESSES = {"hosta": "127.0.0.2", "hostb": "127.0.0.3", "hostc": "127.0.0.4"}
PORTS_PER_HOST = 2 + 4  # the coordinator's two, then a counter socket per worker


def free_base_port() -> int:
    """A port P with P .. P+5 free on every host's address, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        held: list[socket.socket] = []
        try:
            for address in ADDRESSES.values():
                for port in range(base, base + PORTS_PER_HOST):
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((address, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError("no free block of ports on loopback")


class Host(Cluster):
    """One host: its keys made with ``sendguard keygen``, its peers' public keys in ``peers/``."""

    def __init__(self, folder: Path, dns: Any, name: str, base: int, coordinator: str = "",
                 **kwargs: Any) -> None:
        folder.mkdir()
        self.name = name
        self.bind = f"tcp://{ADDRESSES[name]}:{base}"
        made = subprocess.run([sys.executable, "-m", "cluster.cli", "keygen",
                               str(folder / "keys"), "--name", name],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        (folder / "peers").mkdir()
        cluster = {"bind": self.bind, "coordinator": coordinator,
                   "curve_secret_key": f"keys/{name}.key_secret", "curve_public_keys": "peers"}
        super().__init__(folder, dns, cluster=cluster, **kwargs)

    def trust(self, other: Host) -> None:
        shutil.copy(other.folder / "keys" / f"{other.name}.key", self.folder / "peers")

    def keys(self) -> tuple[bytes, bytes]:
        return zmq.auth.load_certificate(self.folder / "keys" / f"{self.name}.key_secret")

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        uplink = uplink_for(load_settings(self.config_path))
        return request(self.runtime_dir, command, args, timeout=5, uplink=uplink)

    def status_json(self) -> dict[str, Any]:
        done = self.admin("status", "--json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


def serving(a: Host, hosts: dict[Host, int]) -> dict[str, Any] | None:
    """A's status once every host runs its count of workers, all serving in one ring."""
    for host in hosts:
        host.check_alive()
    try:
        status = a.status()
    except AdminFailure:
        return None
    ready = [w["name"] for w in status["workers"] if w["member"] and w["phase"] == "serving"
             and w["ring_epoch"] == status["ring_epoch"]]
    for host, count in hosts.items():
        names = {f"{host.name}-w{i}" for i in range(count)}
        if set(status["ring"]) & names != names or not names <= set(ready):
            return None
        if len(listeners(host.port)) != count:
            return None
    return status if len(status["ring"]) == sum(hosts.values()) else None


def reply_of(exc: smtplib.SMTPResponseException) -> tuple[int, str]:
    error = exc.smtp_error
    return exc.smtp_code, error.decode() if isinstance(error, bytes) else error


def decided(host: Host, source: str, user: str) -> tuple[int, str]:
    """One message, sent again while the answer is a tempfail for an owner busy with a
    hand-off (several hosts scaling at once means back-to-back epochs): that under-admits,
    and the test is about what is finally admitted."""
    deadline = time.monotonic() + 30
    while True:
        try:
            code, text = host.send_one(source, user)
        except smtplib.SMTPResponseException as exc:  # refused at AUTH
            code, text = reply_of(exc)
        if not (code == 451 and " 4.3.0 " in f" {text} ") or time.monotonic() > deadline:
            return code, text


def race(jobs: list[tuple[Host, str, str]]) -> list[tuple[int, str]]:
    """Every session gets to DATA on its host, then all send their message at once;
    a session tempfailed during a hand-off tries again afterwards."""
    gate = threading.Barrier(len(jobs), timeout=60)

    def one(job: tuple[Host, str, str]) -> tuple[int, str]:
        host, source, user = job
        try:
            client = host.login(source, user)
        except smtplib.SMTPResponseException as exc:  # refused at AUTH
            gate.wait()
            return reply_of(exc)
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
        replies = list(pool.map(one, jobs))
    return [decided(*job) if code == 451 else (code, text)
            for job, (code, text) in zip(jobs, replies, strict=True)]


def accepted(replies: list[tuple[int, str]]) -> int:
    refused = [(c, t) for c, t in replies if c != 250]
    assert all(c == 550 and t.endswith(" policy violation") for c, t in refused), refused
    return len(replies) - len(refused)


def ask(endpoint: str, keys: tuple[bytes, bytes], server_key: bytes, message: wire.Message,
        wait_ms: int) -> wire.Message | None:
    """One frame to a CURVE server as a client with ``keys``; its answer or None."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.curve_serverkey = server_key
    try:
        sock.connect(endpoint)
        sock.send(wire.encode(message))
        return wire.decode(sock.recv()) if sock.poll(wait_ms) else None
    finally:
        sock.close()
        context.term()


@pytest.fixture
def hosts(dns: Any) -> Iterator[tuple[Host, Host, Host]]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="sgm"))
    base = free_base_port()
    common = {"workers": 2, "tenants": RACE_TENANTS}
    a = Host(root / "a", dns, "hosta", base, **common)
    b = Host(root / "b", dns, "hostb", base, coordinator=a.bind, **common)
    c = Host(root / "c", dns, "hostc", base, coordinator=a.bind, **common)
    a.trust(b)
    b.trust(a)
    c.trust(a)  # but A does not list C
    made = (a, b, c)
    try:
        yield made
    finally:
        try:
            for host in (c, b, a):
                host.stop()
        finally:
            if not os.environ.get("SENDGUARD_KEEP_TEST_FILES"):
                shutil.rmtree(root, ignore_errors=True)


def test_two_hosts_form_one_cluster_and_a_stranger_cannot_join(
        hosts: tuple[Host, Host, Host]) -> None:
    a, b, c = hosts
    a.start(wait=False)
    b.start(wait=False)
    wait_for(lambda: serving(a, {a: 2, b: 2}), 45, "2 + 2 workers serving in one ring",
             every=0.2)
    status = a.status_json()
    assert sorted(w["name"] for w in status["workers"]) == [
        "hosta-w0", "hosta-w1", "hostb-w0", "hostb-w1"]
    assert all(w["member"] for w in status["workers"])
    assert b.status_json()["ring"] == status["ring"]  # B's CLI reaches A over tcp too

    # One account, sessions spread over both hosts' ports: exactly the limit.
    jobs = [(a if i % 2 else b, f"127.0.1.{i}", ACCOUNT) for i in range(1, 21)]
    assert accepted(race(jobs)) == 10
    spread = Counter(line["process"] for host in (a, b) for line in host.log_lines()
                     if line["event"] == "connect")
    assert {name.split("-")[0] for name in spread} == {"hosta", "hostb"}, spread

    # Scaling from A's CLI scales every host; the counts survive the hand-off.
    done = a.admin("scale", "3")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: serving(a, {a: 3, b: 3}), 45, "3 + 3 workers serving", every=0.2)
    assert accepted(race([(b, "127.0.2.1", ACCOUNT), (a, "127.0.2.2", ACCOUNT)])) == 0
    inspect = a.admin("inspect", "account", ACCOUNT, "--json")
    assert inspect.returncode == 0, inspect.stderr
    rows = json.loads(inspect.stdout)["rows"]
    assert [(r["key"], r["window"], r["count"], r["limit"]) for r in rows] == [
        (f"acct:{ACCOUNT}", 3600.0, 10, 10)]

    # C is refused by A's coordinator: it never starts a worker, and nothing it sends is heard.
    c.start(wait=False)
    wait_for(lambda: any(line["event"] == "coordinator_unreachable" and line["key_refused"]
                         for line in c.log_lines()), 30, "C refused by A")
    a_public = a.keys()[0]
    probe = wire.AdminRequest("status", {})
    assert ask(a.bind, c.keys(), a_public, probe, 2000) is None
    assert isinstance(ask(a.bind, b.keys(), a_public, probe, 10000), wire.AdminReply)
    counter = f"tcp://{ADDRESSES['hosta']}:{int(a.bind.rsplit(':', 1)[1]) + 2}"  # hosta-w0
    peek = wire.InspectRequest("peek", f"acct:{ACCOUNT}")
    assert ask(counter, c.keys(), a_public, peek, 2000) is None
    assert isinstance(ask(counter, b.keys(), a_public, peek, 10000), wire.InspectReply)
    c.check_alive()
    assert listeners(c.port) == {}

    # A's cluster goes on as before, with no worker of C in it.
    assert decided(b, "127.0.3.1", OTHER)[0] == 250
    assert decided(a, "127.0.3.2", OTHER)[0] == 250
    final = a.status()
    assert sorted(final["ring"]) == sorted(f"{h}-w{i}" for h in ("hosta", "hostb")
                                           for i in range(3))
    assert not [w for w in final["workers"] if w["name"].startswith("hostc")]


def test_a_restarted_coordinator_gets_the_other_host_back(
        hosts: tuple[Host, Host, Host]) -> None:
    a, b, _ = hosts
    a.start(wait=False)
    b.start(wait=False)
    before = wait_for(lambda: serving(a, {a: 2, b: 2}), 45, "2 + 2 workers serving", every=0.2)
    assert before is not None
    os.kill(before["coordinator_pid"], signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        status = serving(a, {a: 2, b: 2})
        return status if status and status["coordinator_pid"] != before["coordinator_pid"] \
            else None

    after = wait_for(back, 45, "a new coordinator with 2 + 2 workers", every=0.2)
    assert after is not None
    assert after["ring"] == before["ring"]
    # B's supervisor introduced itself again: a scale from A's CLI reaches it.
    done = a.admin("scale", "1")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: serving(a, {a: 1, b: 1}), 45, "1 + 1 workers serving", every=0.2)
    assert decided(b, "127.0.4.1", OTHER)[0] == 250
