"""The cluster supervisor (``sendguard run``): starts, watches and stops processes.

It does no mail work. Signal handlers only enqueue; the main loop dispatches.

Signals: TERM drains gracefully and exits 0; INT stops at once; HUP reloads
the configuration. Exit status: 0 stopped cleanly, 1 a process could not boot
(bad certificate, port taken: it is not respawned forever), 2 bad
configuration, 1 already running on this configuration.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.logjson import log_event, setup_logging
from cluster.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# A child that exits with one of these will fail again the same way.
CHILD_CONFIG_ERROR = 2
CHILD_BOOT_FAILED = 3

_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0


class AlreadyRunning(Exception):
    pass


def lock_runtime_dir(runtime_dir: Path) -> int:
    """Hold an exclusive lock for the life of this process; SO_REUSEPORT would not stop a twin."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(runtime_dir, 0o700)
    fd = os.open(runtime_dir / "sendguard.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(str(runtime_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclass
class Child:
    name: str
    module: str
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    restart_at: float = 0.0
    started_at: float = 0.0
    extra_args: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.pending: list[int] = []
        self.exit_code: int | None = None

    def spawn(self, child: Child) -> None:
        command = [sys.executable, "-m", child.module, "--config", str(self.settings.path),
                   "--name", child.name, "--parent-pid", str(os.getpid()), *child.extra_args]
        child.process = subprocess.Popen(command, close_fds=True)
        child.started_at = time.monotonic()
        log_event("process_started", process_name=child.name, pid=child.process.pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def run(self) -> int:
        self.install_signals()
        for child in self.children:
            self.spawn(child)
        while self.exit_code is None:
            while self.pending:
                self.dispatch(self.pending.pop(0))
            if self.exit_code is not None:
                break
            self.reap()
            time.sleep(0.05)
        return self.exit_code

    def dispatch(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.forward(signal.SIGHUP)
            return
        graceful = signum == signal.SIGTERM
        log_event("cluster_stopping", graceful=graceful)
        self.stop(graceful)
        self.exit_code = EXIT_OK

    def forward(self, signum: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def stop(self, graceful: bool) -> None:
        self.forward(signal.SIGTERM if graceful else signal.SIGINT)
        deadline = time.monotonic() + (self.settings.server.drain_timeout + 10 if graceful else 5)
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def reap(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None:
                if now >= child.restart_at:
                    self.spawn(child)
                continue
            code = process.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.failures = 0
                continue
            child.process = None
            if code in (CHILD_CONFIG_ERROR, CHILD_BOOT_FAILED):
                log_event("boot_failed", process_name=child.name, exit_code=code)
                print(f"sendguard: {child.name} could not start (exit {code}); see the log",
                      file=sys.stderr)
                self.stop(graceful=False)
                self.exit_code = EXIT_CONFIG if code == CHILD_CONFIG_ERROR else EXIT_FAILED
                return
            child.failures += 1
            delay = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** (child.failures - 1))
            child.restart_at = now + delay
            log_event("process_died", process_name=child.name, exit_code=code,
                      restart_in=delay)


def run_cluster(settings: Settings) -> int:
    setup_logging(settings.log_file, process="supervisor")
    try:
        lock = lock_runtime_dir(settings.cluster.runtime_dir)
    except AlreadyRunning as exc:
        print(f"sendguard: already running on this configuration (lock in {exc})",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        supervisor = Supervisor(settings)
        supervisor.children.append(Child("w0", "worker"))
        return supervisor.run()
    finally:
        os.close(lock)
