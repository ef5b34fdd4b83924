"""The supervisor, coordinator and workers as real processes: ports, status, stop, refusals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clusterproc import ROOT, Cluster, free_port, listeners, wait_for
from gateway import MESSAGE

pytestmark = pytest.mark.integration


def test_every_worker_listens_and_status_tells_who_is_who(
        make_cluster: Callable[..., Cluster]) -> None:
    metrics_port = free_port()
    cluster = make_cluster(workers=2, metrics={"listen": f"127.0.0.1:{metrics_port}"}).start()

    done = cluster.admin("status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    pids = {w["pid"] for w in status["workers"]}
    # Two processes, each with its own SO_REUSEPORT socket on the one port.
    assert listeners(cluster.port) == {pid: 1 for pid in pids}
    assert status["ring"] == ["w0", "w1"] and status["ring_epoch"] >= 2
    assert status["config_version"] >= 1
    assert len(status["tenants_version"]) == 12 and len(status["geoip_version"]) == 12
    assert status["supervisor_pid"] == cluster.process.pid
    assert {w["name"] for w in status["workers"]} == {"w0", "w1"}

    table = cluster.admin("status")
    assert table.returncode == 0
    assert f"ring epoch {status['ring_epoch']}: w0, w1" in table.stdout
    assert "WORKER" in table.stdout and "serving" in table.stdout

    # A second cluster on the same configuration would share the port silently.
    twin = subprocess.run([sys.executable, "-m", "cluster.cli", "run", "-c",
                           str(cluster.config_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert twin.returncode == 1
    assert "already running on this configuration" in twin.stderr
    assert listeners(cluster.port) == {pid: 1 for pid in pids}

    for source in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
        assert cluster.send_one(source)[0] == 250

    def metrics_once_all_counted() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = str(r.read().decode())
        return text if "sendguard_messages_accepted_total 3.0" in text else None

    # Reports arrive every second; the sum is over both workers.
    text = wait_for(metrics_once_all_counted, 10, "3 accepted messages in the metrics")
    assert "sendguard_sessions_total 3.0" in text
    assert "sendguard_counter_request_seconds_count" in text
    assert f"sendguard_ring_epoch {float(status['ring_epoch'])}" in text
    assert "sendguard_config_version" in text


def test_admin_commands_say_plainly_when_nothing_runs(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=1)
    done = cluster.admin("status")
    assert done.returncode == 1
    assert "no cluster is running for this configuration" in done.stderr
    as_json = cluster.admin("status", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False
    assert cluster.admin("scale", "0").returncode == 2
    assert cluster.admin("tenant", "allow-country", "nowak.pl", "DEU").returncode == 2
    assert cluster.admin("inspect", "ip", "not-an-ip").returncode == 2


def test_a_bad_geoip_database_stops_the_start_with_one_line(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2)
    cluster.geoip_path.write_bytes(b"this is not a MaxMind database")
    cluster.start(wait=False)
    assert cluster.process is not None
    assert cluster.process.wait(30) == 2
    stderr = cluster.stderr_path.read_text()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{cluster.config_path}: geoip.database: ")
    assert lines[0].endswith(f'(got "{cluster.geoip_path}")')
    assert listeners(cluster.port) == {}


def test_a_coordinator_that_cannot_start_stops_the_start_with_two_lines(
        make_cluster: Callable[..., Cluster]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cluster = make_cluster(workers=3, metrics={"listen": f"127.0.0.1:{port}"})
        cluster.start(wait=False)
        assert cluster.process is not None
        assert cluster.process.wait(60) == 1
    lines = cluster.stderr_path.read_text().strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("sendguard: coordinator cannot start: ")
    assert lines[1] == "sendguard: coordinator could not start (see above); stopping the cluster"
    assert listeners(cluster.port) == {}


def test_workers_stopped_while_they_start_print_nothing(
        make_cluster: Callable[..., Cluster]) -> None:
    # SIGINT as soon as the supervisor has started the workers: they are
    # still in the interpreter's start-up or importing.
    cluster = make_cluster(workers=3)
    cluster.start(wait=False)
    wait_for(lambda: any(line["event"] == "process_started" and line["process_name"] == "w0"
                         for line in cluster.log_lines()), 60, "the first worker started",
             every=0.005)
    cluster.signal(signal.SIGINT)
    assert cluster.process is not None
    assert cluster.process.wait(60) == 0
    assert cluster.stderr_path.read_text() == ""
    assert listeners(cluster.port) == {}


def test_sigterm_lets_an_open_transaction_finish(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    idle = cluster.login("127.0.0.51")
    busy = cluster.login("127.0.0.52")
    assert busy.mail("jan@kowalski.pl")[0] == 250
    assert busy.rcpt("someone@example.org")[0] == 250
    started = time.monotonic()
    cluster.signal(signal.SIGTERM)

    code, text = idle.getreply()
    sid = text.decode().split()[1]
    assert (code, text.decode()) == (421, f"4.3.2 {sid} service shutting down")
    # The transaction's counters may live on the other worker, which has no
    # session left: it must still answer until this one is done.
    code, text = busy.data(MESSAGE)
    assert code == 250, text
    code, text = busy.getreply()
    busy_sid = text.decode().split()[1]
    assert (code, text.decode()) == (421, f"4.3.2 {busy_sid} service shutting down")

    assert cluster.process is not None
    assert cluster.process.wait(20) == 0
    assert time.monotonic() - started < 10  # drain_timeout is 5s; nobody waited it out
    assert listeners(cluster.port) == {}
    for client in (idle, busy):
        client.close()


def test_a_worker_termed_again_while_it_stops_still_exits_0(
        make_cluster: Callable[..., Cluster]) -> None:
    # A retiring worker leaves on the ring and may get the supervisor's TERM
    # as well, as late as the last moments of its exit.
    cluster = make_cluster(workers=1).start()
    pid = cluster.worker_pids()["w0"]
    deadline = time.monotonic() + 30
    with contextlib.suppress(ProcessLookupError):
        while running(pid):
            assert time.monotonic() < deadline, "w0 never stopped"
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.002)
    [died] = wait_for(lambda: [line for line in cluster.log_lines()
                               if line["event"] == "process_died"], 30, "w0 exited")
    assert (died["process_name"], died["exit_code"]) == ("w0", 0)


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (its parent may not have reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_coordinator_comes_back_and_the_workers_stay(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    before = cluster.status()
    os.kill(before["coordinator_pid"], signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        status = cluster.serving(2)
        return status if status and status["coordinator_pid"] != before["coordinator_pid"] \
            else None

    after = wait_for(back, 30, "a new coordinator with both workers")
    # Same processes, same members; numbering carries on where the old one stopped.
    assert cluster.worker_pids() == {w["name"]: w["pid"] for w in before["workers"]}
    assert after["ring_epoch"] >= before["ring_epoch"]
    assert after["config_version"] > before["config_version"]
    assert after["supervisor_pid"] == before["supervisor_pid"]
    assert cluster.send_one("127.0.0.8")[0] == 250
    # SIGTTIN / SIGTTOU: one worker more, one less.
    cluster.signal(signal.SIGTTIN)
    cluster.wait_serving(3)
    cluster.signal(signal.SIGTTOU)
    cluster.wait_serving(2)


def test_a_hung_worker_leaves_the_ring_and_is_replaced(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    pids = cluster.worker_pids()
    os.kill(pids["w1"], signal.SIGSTOP)  # alive, holding its socket, answering nothing
    try:
        wait_for(lambda: cluster.serving(2) and cluster.worker_pids().get("w1") not in (
            None, pids["w1"]), 30, "w1 dropped for silence and replaced", every=0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["w1"], signal.SIGCONT)
    assert set(listeners(cluster.port)) == set(cluster.worker_pids().values())
    events = [line["event"] for line in cluster.log_lines()]
    assert "worker_silent" in events and "process_hung" in events
    assert cluster.send_one("127.0.0.9")[0] == 250


def test_a_port_taken_by_another_program_stops_the_cluster_instead_of_respawning(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cluster.port))  # no SO_REUSEPORT: nobody may share it
        squatter.listen()
        cluster.start(wait=False)
        assert cluster.process is not None
        assert cluster.process.wait(30) == 1
    stderr = cluster.stderr_path.read_text()
    assert f"cannot listen on 127.0.0.1:{cluster.port}" in stderr
    assert "could not start (see above); stopping the cluster" in stderr
    assert "Traceback" not in stderr
    started = [line for line in cluster.log_lines() if line["event"] == "process_started"]
    assert len(started) <= 3  # the coordinator and two workers, none started again
