"""``server.max_connections_per_ip`` across the workers of a host, with real processes.

The kernel spreads one address's connections over two workers; the cap
holds for their sum, and a worker killed with connections open leaves no
phantom connections counted behind it (worker/connections.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable

import pytest
from clusterproc import Cluster, wait_for

pytestmark = pytest.mark.integration

CAP = 4
SOURCE = "127.0.0.60"
SID = re.compile(r"([A-Za-z0-9]{22})")


class Connection:
    def __init__(self, cluster: Cluster) -> None:
        self.sock = socket.create_connection(("127.0.0.1", cluster.port), 30,
                                             source_address=(SOURCE, 0))
        self.banner = self.sock.makefile("rb").readline().decode().rstrip("\r\n")
        match = SID.search(self.banner)
        assert match, self.banner
        self.sid = match.group(1)
        self.worker = wait_for(lambda: worker_of(cluster, self.sid), 10,
                               f"the log line of {self.sid}")

    @property
    def admitted(self) -> bool:
        return self.banner.startswith("220 ")

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def worker_of(cluster: Cluster, sid: str) -> str | None:
    for line in cluster.log_lines():
        if line.get("sid") == sid and line.get("event") in ("connect", "decision"):
            return str(line["process"])
    return None


def hold(cluster: Cluster, count: int, deadline: float) -> list[Connection]:
    """``count`` open connections, retrying the refusals of a worker not yet told of a close."""
    held: list[Connection] = []
    while len(held) < count:
        assert time.monotonic() < deadline, f"could hold only {len(held)} of {count}"
        conn = Connection(cluster)
        if conn.admitted:
            held.append(conn)
        else:
            conn.close()
            time.sleep(0.1)
    return held


def test_the_cap_counts_every_worker_of_the_host(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, server={"max_connections_per_ip": CAP}).start()
    deadline = time.monotonic() + 60
    held = hold(cluster, CAP, deadline)
    while len({c.worker for c in held}) < 2:
        # All on one worker so far: trade one until the kernel picks the other.
        held.pop().close()
        held += hold(cluster, 1, deadline)
    per_worker = Counter(c.worker for c in held)
    assert all(n < CAP for n in per_worker.values())

    # Within a moment every worker knows the others' connections: both refuse,
    # though neither holds CAP connections itself.
    refused_by: dict[str, str] = {}
    while set(refused_by) != {"w0", "w1"}:
        assert time.monotonic() < deadline, f"refused only by {sorted(refused_by)}"
        conn = Connection(cluster)
        if not conn.admitted:
            assert conn.banner == (f"421 4.7.0 {conn.sid} too many connections from your "
                                   "address, try later")
            refused_by[conn.worker] = conn.sid
        conn.close()
        time.sleep(0.05)
    for worker, sid in refused_by.items():
        [line] = [d for d in cluster.log_lines() if d.get("sid") == sid]
        assert line["policy"] == "connection_cap"
        assert f"{per_worker[worker]} here, " in line["detail"]
        assert line["detail"].endswith(f"on other workers, cap {CAP}")

    # A worker killed with connections open: its connections are no longer counted.
    victim = max(per_worker, key=lambda w: per_worker[w])
    os.kill(cluster.worker_pids()[victim], signal.SIGKILL)
    for conn in [c for c in held if c.worker == victim]:
        conn.sock.close()
        held.remove(conn)
    cluster.wait_serving(2, timeout=60)
    held += hold(cluster, CAP - len(held), time.monotonic() + 60)
    assert len(held) == CAP
    for conn in held:
        conn.close()

    if os.geteuid() == 0:
        assert any(line.get("event") == "running_as_root" for line in cluster.log_lines())
