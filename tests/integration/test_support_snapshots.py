"""Support changes as small snapshots in a running cluster of 2 workers.

A suspension refuses the next MAIL on every worker (each session is traced to
the worker process holding it, from /proc) and reached them as a support-only
snapshot; a worker killed and restarted after several support changes holds
the current state; a tenant change after support changes still reaches every
worker, and support changes apply on top of it.
"""

from __future__ import annotations

import os
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from clusterproc import Cluster, close_session, wait_for
from gateway import TENANTS

pytestmark = pytest.mark.integration

JAN = "jan@kowalski.pl"
ANNA = "anna@nowak.pl"
POLISH = "127.0.2.1"
GERMAN = "127.0.0.42"
AMERICAN = "127.0.0.66"   # kowalski.pl allows PL and DE


def holder(cluster: Cluster, client: smtplib.SMTP, pids: set[int]) -> int | None:
    """The worker process holding the server side of ``client``'s connection."""
    port = client.sock.getsockname()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if (state == "01" and int(local.rsplit(":", 1)[1], 16) == cluster.port
                        and int(remote.rsplit(":", 1)[1], 16) == port):
                    inodes.add(f"socket:[{inode}]")
    for pid in pids:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:
            continue
    return None


def sessions_on_every_worker(cluster: Cluster, user: str,
                             source: str = POLISH) -> dict[int, smtplib.SMTP]:
    """One logged-in session per worker process (the kernel spreads connections)."""
    pids = set(cluster.worker_pids().values())
    sessions: dict[int, smtplib.SMTP] = {}
    extra = []
    for _ in range(60):
        client = cluster.login(source, user)
        pid = holder(cluster, client, pids)
        if pid is None or pid in sessions:
            extra.append(client)
        else:
            sessions[pid] = client
        if len(sessions) == len(pids):
            break
    for client in extra:
        close_session(client)
    assert set(sessions) == pids, f"sessions on {sorted(sessions)}, workers {sorted(pids)}"
    return sessions


def mail_on_every_worker(cluster: Cluster, user: str, source: str = POLISH) -> set[int]:
    """MAIL's reply code in a new session on each worker."""
    sessions = sessions_on_every_worker(cluster, user, source)
    try:
        return {client.mail(user)[0] for client in sessions.values()}
    finally:
        for client in sessions.values():
            close_session(client)


def cli(cluster: Cluster, *args: str) -> str:
    done = cluster.admin(*args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def all_current(cluster: Cluster) -> bool:
    status = cluster.status()
    return all(w["snapshot_version"] == status["config_version"] for w in status["workers"])


def test_a_suspension_refuses_the_next_mail_on_every_worker_as_a_small_snapshot(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    # A coordinator's first publication is whole; the ones after it are small.
    cli(cluster, "account", "suspend", ANNA, "--reason", "spam", "--by", "ops")
    wait_for(lambda: all_current(cluster), 20, "every worker on the first change")
    sessions = sessions_on_every_worker(cluster, JAN)
    for client in sessions.values():
        assert client.mail(JAN)[0] == 250
        client.rset()

    cli(cluster, "account", "suspend", JAN, "--reason", "password leaked", "--by", "anna")
    version = cluster.status()["config_version"]

    def refused(client: smtplib.SMTP) -> bool:
        code = client.mail(JAN)[0]
        if code == 250:
            client.rset()
        return code == 550

    for pid, client in sessions.items():
        wait_for(lambda c=client: refused(c), 10, f"MAIL refused on worker {pid}", every=0.1)
        close_session(client)
    workers = {w["name"] for w in cluster.status()["workers"]}

    def applied_small() -> set[str]:
        return {line["process"] for line in cluster.log_lines()
                if line.get("event") == "snapshot" and line.get("version") == version
                and line.get("support_only") and line.get("process") in workers}
    wait_for(lambda: applied_small() == workers, 10, "every worker's log of the small snapshot")
    assert not [line for line in cluster.log_lines() if line.get("event") == "snapshot_skipped"]


def test_a_restarted_worker_and_a_tenant_change_after_support_changes(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    cli(cluster, "account", "suspend", JAN, "--reason", "leak", "--by", "ops")
    cli(cluster, "tenant", "allow-country", "kowalski.pl", "US", "--for", "1h",
        "--reason", "conference", "--by", "ops")
    cli(cluster, "account", "suspend", ANNA, "--reason", "spam", "--by", "ops")
    cli(cluster, "account", "unsuspend", JAN, "--by", "ops")
    wait_for(lambda: all_current(cluster), 20, "every worker on the last change")

    before = cluster.worker_pids()
    victim = sorted(before)[0]
    os.kill(before[victim], signal.SIGKILL)

    def restarted() -> bool:
        pids = cluster.worker_pids()
        return pids.get(victim) not in (None, before[victim]) and \
            cluster.serving(2) is not None and all_current(cluster)
    wait_for(restarted, 60, f"{victim} restarted and serving")
    assert mail_on_every_worker(cluster, JAN, AMERICAN) == {250}   # exception, unsuspended
    assert mail_on_every_worker(cluster, ANNA) == {550}
    assert mail_on_every_worker(cluster, JAN, GERMAN) == {250}

    # A tenant change after those: kowalski.pl no longer allows DE.
    tenants: Path = cluster.tenants_path
    temp = tenants.with_suffix(".new")
    temp.write_text(TENANTS.replace('countries = ["PL", "DE"]', 'countries = ["PL"]'))
    os.replace(temp, tenants)
    wait_for(lambda: mail_on_every_worker(cluster, JAN, GERMAN) == {550}, 20,
             "the tenant change on every worker")
    assert mail_on_every_worker(cluster, ANNA) == {550}
    assert mail_on_every_worker(cluster, JAN, AMERICAN) == {250}

    # And a support change on top of it.
    cli(cluster, "account", "unsuspend", ANNA, "--by", "ops")
    wait_for(lambda: mail_on_every_worker(cluster, ANNA) == {250}, 10,
             "the unsuspension on every worker")
    assert mail_on_every_worker(cluster, JAN, GERMAN) == {550}
