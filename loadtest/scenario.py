"""A sendguard cluster as a subprocess of a load scenario: start, wait until serving, stop.

The configuration comes from :func:`loadtest.bench_core.write_config` (every
policy on, durable spool, delivery to a smarthost sink on loopback); a
scenario adjusts it with :func:`patch_config`. "Serving" means what the
admin socket says: every worker in the ring, in the current ring epoch and
accepting connections, so a measurement never starts on a half-built cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cluster.admin import AdminFailure, request
from loadtest.bench_core import ROOT, wait_for_banner
from loadtest.loopback import LoopbackDNS


def quiet_dns() -> LoopbackDNS:
    """A started LoopbackDNS that does not print every query on stdout (our tables go there)."""
    from dnslib.server import DNSLogger

    dns = LoopbackDNS()
    dns._server.server.logger = DNSLogger("-request,-reply,-truncated,-error")
    return dns.start()


def patch_config(config: Path, replacements: dict[str, str]) -> None:
    """Replace exact snippets of a written configuration; a snippet not found is a bug here."""
    text = config.read_text()
    for old, new in replacements.items():
        if old not in text:
            raise ValueError(f"{config}: no {old!r} to replace")
        text = text.replace(old, new)
    config.write_text(text)


class ClusterProcess:
    """``sendguard run -c CONFIG`` with its stderr in ``stderr_path``."""

    def __init__(self, config: Path, runtime_dir: Path, port: int, stderr_path: Path,
                 source: Path | None = None) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.port = port
        self.stderr_path = stderr_path
        # Another source tree of sendguard to run instead of this one (a benchmark's
        # "before"): first on the path, ahead of the installed package.
        self.source = source
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, workers: int, timeout: float = 90.0) -> ClusterProcess:
        env = None
        if self.source is not None:
            env = {**os.environ, "PYTHONPATH": str(self.source)}
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "run", "-c", str(self.config)],
                cwd=self.source or ROOT, env=env, stderr=stderr, stdout=subprocess.DEVNULL)
        self.wait_serving(workers, timeout)
        wait_for_banner(self.port, timeout)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict[str, Any]:
        return request(self.runtime_dir, "status", {})

    def serving(self, count: int) -> dict[str, Any] | None:
        try:
            status = self.status()
        except AdminFailure:
            return None
        ready = [w for w in status.get("workers", []) if w.get("member")
                 and w.get("phase") == "serving" and w.get("ring_epoch") == status["ring_epoch"]]
        if len(status.get("ring", [])) == count and len(ready) == count:
            return status
        return None

    def wait_serving(self, count: int, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"sendguard run exited ({self.returncode()}): "
                                   f"{self.stderr_tail()}")
            status = self.serving(count)
            if status is not None:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers not serving after {timeout:g} s: "
                                   f"{self.stderr_tail()}")
            time.sleep(0.2)

    def scale(self, workers: int) -> dict[str, Any]:
        return request(self.runtime_dir, "scale", {"workers": workers})

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stderr_tail(self, size: int = 1500) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, timeout: float = 40.0) -> int | None:
        """TERM (drain), then KILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
