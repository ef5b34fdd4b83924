"""Real ``redis-server`` processes on loopback for tests: one server, or a Redis Cluster.

Each server has a private folder (its configuration, AOF and log) and a free
port; a cluster node also listens on its port + 10000 (the cluster bus), so
cluster ports are picked below 55535 with both free::

    server = RedisServer(folder / "r1").start()          # server.url
    server.stop(); server.start()                         # same port, same AOF
    cluster = RedisCluster(folder, nodes=3).start()       # cluster.seeds

Under CI (``CI`` set) a missing ``redis-server`` is a failure, elsewhere a skip.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def need_redis() -> None:
    if not os.access(REDIS_SERVER, os.X_OK) or not os.access(REDIS_CLI, os.X_OK):
        message = "redis-server is not installed (.ci/services.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    if not cluster:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(500):
        port = random.randrange(20000, 55000)
        if _free(port) and _free(port + 10000):
            return port
    raise AssertionError("no free pair of ports for a cluster node")


class RedisServer:
    def __init__(self, folder: Path, *, cluster: bool = False, appendonly: bool = False,
                 port: int | None = None) -> None:
        need_redis()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.port = port or free_port(cluster)
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            "bind 127.0.0.1", f"port {self.port}", f"dir {folder}", "save \"\"",
            f"logfile {folder / 'redis.log'}", "protected-mode no",
            f"appendonly {'yes' if appendonly else 'no'}", "appendfsync everysec",
        ]
        if cluster:
            lines += ["cluster-enabled yes", "cluster-config-file nodes.conf",
                      "cluster-node-timeout 2000"]
        self.config = folder / "redis.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen([REDIS_SERVER, str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while self.cli("PING").strip() != "PONG":
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text()[-1500:]
                raise AssertionError(f"redis-server exited {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server on {self.port} did not answer PING")
            time.sleep(0.05)
        return self

    def cli(self, *args: str) -> str:
        done = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=20)
        return done.stdout

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (the AOF is flushed) or SIGKILL (a crash)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class RedisCluster:
    """``nodes`` masters (no replicas) made with ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, nodes: int = 3) -> None:
        self.servers = [RedisServer(folder / f"node{i}", cluster=True) for i in range(nodes)]

    @property
    def seeds(self) -> list[str]:
        return [server.address for server in self.servers]

    def start(self) -> RedisCluster:
        for server in self.servers:
            server.start()
        done = subprocess.run([REDIS_CLI, "--cluster", "create", *self.seeds,
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in self.servers):
            if time.monotonic() > deadline:
                raise AssertionError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
