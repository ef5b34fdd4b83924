"""The cluster supervisor (``sendguard run``): starts, watches and stops processes.

It does no mail work. It starts the coordinator (``python -m coordinator``)
and ``server.workers`` workers (``python -m worker``, named w0, w1, ...; 0
means one per CPU), restarts a process that dies (backoff from 0.5 s to
30 s) or that the coordinator reports ``silent`` (hung: killed, then
restarted), and tells the coordinator over a DEALER what happened
(``SupervisorHello``, ``ProcessEvent`` started/exited/leaving). Signal
handlers only enqueue; the main loop dispatches ``handle_<signal>``.
Workers start once the coordinator has answered a first request, that is
once the configuration, tenant directory and GeoIP database were read;
every child starts with SIGINT blocked (:mod:`cluster.quietstart`), so one
stopped while it is still starting ends without a traceback.

Signals:
    TERM   drain: workers stop accepting, open transactions finish (up to
           ``server.drain_timeout``), then everything stops; exit 0
    INT    stop at once (sessions get 421 now); exit 0
    HUP    the coordinator rereads the configuration; workers stay;
           a changed ``server.workers`` scales, ``server.drain_timeout``
           applies to the next stop
    TTIN   one worker more
    TTOU   one worker less (never below one)

``sendguard scale N`` reaches the supervisor as a ``ScaleCommand``. A
worker is retired by reporting it ``leaving`` first, so the coordinator
publishes a ring without it and its counters are handed off; on that ring
the worker drains and exits 0 by itself, and is not restarted. It gets a
TERM only if the coordinator never answers, or if it outstays its drain.

Exit status:
    0   stopped by TERM or INT
    1   already running on this configuration (the lock in the runtime
        folder is held), or a process could not boot (exit 3: bad
        certificate, port taken) - it is not respawned in a loop
    2   bad configuration (a process exited 2 at start)
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from cluster import wire
from cluster.admin_wire import AdminFailed, StatusReply, StatusRequest
from cluster.exits import EXIT_BOOT_FAILED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from cluster.files import private_dir_problem
from cluster.logjson import log_event, setup_logging
from cluster.quietstart import spawn_quietly
from cluster.reload import load_for_reload
from cluster.settings import Settings
from cluster.validate import ConfigError

# A child that exits with one of these will fail again the same way.
CHILD_CONFIG_ERROR = EXIT_USAGE
CHILD_BOOT_FAILED = EXIT_BOOT_FAILED

COORDINATOR = "coordinator"
_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0     # a process up this long starts its backoff afresh
_BOOTED_AFTER = 5.0      # a process up this long got past its boot
_LEAVE_ACK_WAIT = 3.0    # TERM a retiring worker even if the coordinator never answers
_ASK_COORDINATOR_EVERY = 0.5  # at start, until the coordinator answers
_STOP_MARGIN = 10.0
_FAST_STOP_WAIT = 5.0
_TICK = 0.1


class AlreadyRunning(Exception):
    pass


class UnsafeRuntimeDir(Exception):
    """The runtime folder could be reached by someone else; str() says why."""


def make_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing, then insist it is ours alone.

    Checked with ``lstat`` after creating it: a symlink, a file, a folder of
    another user or one that group or others can enter would let someone
    else reach the control sockets (or swap them for theirs), so it is
    refused rather than repaired.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling symlink: lstat below says which
    except OSError as exc:
        raise UnsafeRuntimeDir(f"cannot be created: {exc.strerror}") from None
    problem = private_dir_problem(path)
    if problem is not None:
        raise UnsafeRuntimeDir(problem)


def lock_runtime_dir(runtime_dir: Path) -> int:
    """Hold an exclusive lock for the life of this process; SO_REUSEPORT would not stop a twin."""
    make_private_dir(runtime_dir)
    fd = os.open(runtime_dir / "sendguard.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(str(runtime_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def clear_runtime_dir(runtime_dir: Path) -> None:
    """Sockets and coordinator state: stale before a start (we hold the lock), done after a stop."""
    for path in runtime_dir.iterdir():
        if path.suffix == ".sock" or path.name == "coordinator.state":
            path.unlink(missing_ok=True)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    restart_at: float = 0.0
    started_at: float = 0.0
    has_run: bool = False        # stayed up past its boot at least once
    retiring: bool = False
    term_at: float | None = None  # retiring: when to TERM it at the latest
    left_ring: bool = False       # retiring: a ring without it was published

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def is_worker(self) -> bool:
        return self.name != COORDINATOR


def worker_count(configured: int) -> int:
    return configured or os.cpu_count() or 1


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime_dir = settings.cluster.runtime_dir
        self.target = worker_count(settings.server.workers)
        self.children: dict[str, Child] = {}
        self.pending: list[int] = []
        self.exit_code: int | None = None
        self._phases: dict[str, str] = {}
        # Workers start once the coordinator has answered: it has read the
        # configuration, tenants and GeoIP database, so a bad one stops the
        # start before any worker exists (one line on stderr, nothing else).
        self.coordinator_answered = False
        self._asked_at = 0.0

    # -- plumbing ------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def install_signals(self) -> None:
        reader, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = reader
        signal.set_wakeup_fd(writer)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN,
                       signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)

    def connect(self) -> None:
        self.context = zmq.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(wire.coordinator_endpoint(self.runtime_dir))
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self._wakeup, zmq.POLLIN)

    def tell(self, message: wire.Message) -> None:
        try:
            self.dealer.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is down; it learns the state again when it restarts

    def wait(self, timeout: float) -> list[wire.Message]:
        """Sleep until a signal, a message or ``timeout``; the messages that arrived."""
        events = dict(self.poller.poll(int(max(0.0, timeout) * 1000)))
        if self._wakeup in events:
            try:
                os.read(self._wakeup, 512)
            except BlockingIOError:
                pass
        messages: list[wire.Message] = []
        while True:
            try:
                frame = self.dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(wire.decode(frame))
            except wire.WireError:
                continue

    def spawn(self, child: Child) -> None:
        if child.is_worker:
            command = [sys.executable, "-m", "worker", "--config", str(self.settings.path),
                       "--name", child.name, "--parent-pid", str(os.getpid()),
                       "--runtime-dir", str(self.runtime_dir)]
        else:
            command = [sys.executable, "-m", "coordinator", "--config", str(self.settings.path),
                       "--parent-pid", str(os.getpid())]
        # Stopped while still importing, a child ends without a traceback.
        child.process = spawn_quietly(command, close_fds=True)
        child.started_at = time.monotonic()
        log_event("process_started", process_name=child.name, pid=child.process.pid)
        if child.is_worker:
            self.tell(wire.ProcessEvent(child.name, "started", child.process.pid))
        else:
            self.introduce()

    def introduce(self) -> None:
        """Tell a (new) coordinator who we are and which workers run."""
        self.tell(wire.SupervisorHello(os.getpid(), self.target))
        for child in self.children.values():
            if child.is_worker and child.alive:
                assert child.process is not None
                self.tell(wire.ProcessEvent(child.name, "started", child.process.pid))

    def workers(self) -> list[Child]:
        return [c for c in self.children.values() if c.is_worker]

    # -- the main loop -------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        self.connect()
        self.children[COORDINATOR] = Child(COORDINATOR)
        self.spawn(self.children[COORDINATOR])
        try:
            while self.exit_code is None:
                for message in self.wait(_TICK):
                    self.on_message(message)
                while self.pending and self.exit_code is None:
                    self.dispatch(self.pending.pop(0))
                if self.exit_code is None:
                    self.reap()
                if self.exit_code is None:
                    self.manage_workers()
        finally:
            self.dealer.close()
            self.context.term()
        return self.exit_code

    def dispatch(self, signum: int) -> None:
        name = signal.Signals(signum).name.lower()
        handler = getattr(self, f"handle_{name[3:]}", None)
        if handler is not None:
            handler()

    def handle_term(self) -> None:
        log_event("cluster_stopping", graceful=True)
        self.stop(graceful=True)
        self.exit_code = EXIT_OK

    def handle_int(self) -> None:
        log_event("cluster_stopping", graceful=False)
        self.stop(graceful=False)
        self.exit_code = EXIT_OK

    def handle_hup(self) -> None:
        coordinator = self.children.get(COORDINATOR)
        if coordinator is not None and coordinator.alive:
            assert coordinator.process is not None
            coordinator.process.send_signal(signal.SIGHUP)
        # What the supervisor itself uses: the worker count and the drain timeout.
        # The coordinator checks the same file the same way, and logs a refusal.
        try:
            settings = load_for_reload(self.settings.path)
        except ConfigError:
            return
        previous, self.settings = self.settings, settings
        if settings.server.workers != previous.server.workers:
            self.scale(worker_count(settings.server.workers))

    def handle_ttin(self) -> None:
        self.scale(self.target + 1)

    def handle_ttou(self) -> None:
        self.scale(max(1, self.target - 1))

    def scale(self, workers: int) -> None:
        if workers != self.target:
            log_event("scale", workers=workers, previous=self.target)
            self.target = workers
        self.tell(wire.SupervisorHello(os.getpid(), self.target))

    def on_message(self, message: wire.Message) -> None:
        if isinstance(message, wire.ScaleCommand) and message.workers >= 1:
            self.scale(message.workers)
        elif isinstance(message, wire.RingMessage):
            names = {name for name, _ in message.members}
            for child in self.workers():
                if child.retiring and not child.left_ring and child.name not in names:
                    # The worker leaves on this same ring; a TERM now would race
                    # its own exit. It is TERMed only if it outstays its drain.
                    child.left_ring = True
                    child.term_at = (time.monotonic() + self.settings.server.drain_timeout
                                     + _STOP_MARGIN)
        elif isinstance(message, wire.ProcessEvent) and message.event == "silent":
            hung = self.children.get(message.name)
            if hung is not None and hung.alive and hung.process is not None \
                    and hung.process.pid == message.pid:
                log_event("process_hung", process_name=hung.name, pid=message.pid)
                hung.process.kill()  # reaped and restarted like any crash
        elif isinstance(message, AdminFailed):
            self.coordinator_answered = True
        elif isinstance(message, StatusReply):
            self.coordinator_answered = True
            workers = message.workers
            self._phases = {w.get("name", ""): w.get("phase", "") for w in workers
                            if isinstance(w, dict)}

    # -- processes ---------------------------------------------------------------------

    def reap(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            process = child.process
            if process is None:
                continue
            code = process.poll()
            if code is None:
                if now - child.started_at > _STABLE_AFTER:
                    child.failures = 0
                continue
            child.process = None
            if child.is_worker:
                self.tell(wire.ProcessEvent(child.name, "exited", process.pid, f"exit {code}"))
            if child.retiring:
                log_event("process_retired", process_name=child.name, exit_code=code)
                del self.children[child.name]
                continue
            if code in (CHILD_CONFIG_ERROR, CHILD_BOOT_FAILED) and not (
                    child.name == COORDINATOR and code == CHILD_CONFIG_ERROR and child.has_run):
                self.boot_failed(child, code)
                return
            child.failures += 1
            delay = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** (child.failures - 1))
            child.restart_at = now + delay
            log_event("process_died", process_name=child.name, exit_code=code, restart_in=delay)

    def boot_failed(self, child: Child, code: int) -> None:
        log_event("boot_failed", process_name=child.name, exit_code=code)
        if code == CHILD_BOOT_FAILED:
            print(f"sendguard: {child.name} could not start (see above); stopping the cluster",
                  file=sys.stderr)
        # A configuration error is already on stderr as the one line SPEC §5 asks for.
        self.stop(graceful=False)
        self.exit_code = EXIT_USAGE if code == CHILD_CONFIG_ERROR else EXIT_FAILED

    def manage_workers(self) -> None:
        if not self.coordinator_answered:
            now = time.monotonic()
            if now - self._asked_at >= _ASK_COORDINATOR_EVERY:
                self._asked_at = now
                self.tell(StatusRequest())
            return
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.process is None and not child.retiring and now >= child.restart_at:
                self.spawn(child)
            if not child.has_run and child.alive and now - child.started_at > _BOOTED_AFTER:
                child.has_run = True
            if child.retiring and child.term_at is not None and now >= child.term_at:
                self.retire_now(child)
        active = sorted((c for c in self.workers() if not c.retiring), key=_index)
        for _ in range(len(active), self.target):
            child = Child(self.free_name())
            self.children[child.name] = child
            self.spawn(child)
        for child in active[self.target:]:
            self.retire(child)

    def free_name(self) -> str:
        index = 0
        while f"w{index}" in self.children:
            index += 1
        return f"w{index}"

    def retire(self, child: Child) -> None:
        child.retiring = True
        if not child.alive:
            self.children.pop(child.name, None)
            if child.process is not None:
                self.tell(wire.ProcessEvent(child.name, "exited", child.process.pid))
            return
        assert child.process is not None
        log_event("process_retiring", process_name=child.name, pid=child.process.pid)
        child.term_at = time.monotonic() + _LEAVE_ACK_WAIT
        self.tell(wire.ProcessEvent(child.name, "leaving", child.process.pid))

    def retire_now(self, child: Child) -> None:
        child.term_at = None
        if child.alive:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)

    # -- stopping ----------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """Workers first (they drain), then the coordinator."""
        workers = [c for c in self.workers() if c.alive]
        for child in workers:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM if graceful else signal.SIGINT)
        wait = self.settings.server.drain_timeout + _STOP_MARGIN if graceful else _FAST_STOP_WAIT
        deadline = time.monotonic() + wait
        next_status = 0.0
        released = not graceful
        while any(c.alive for c in workers) and time.monotonic() < deadline:
            for message in self.wait(_TICK):
                self.on_message(message)
            if signal.SIGINT in self.pending and not released:
                released = self.release(workers)
            self.pending.clear()
            now = time.monotonic()
            if not released and now >= next_status:
                # Drained workers keep their counters up for the others' last transactions;
                # once every one is drained they may all go.
                self.tell(StatusRequest())
                next_status = now + 0.2
                names = {c.name for c in workers if c.alive}
                if names and all(self._phases.get(name) == "drained" for name in names):
                    released = self.release(workers)
        for child in workers:
            self.kill(child)
        coordinator = self.children.get(COORDINATOR)
        if coordinator is not None and coordinator.alive:
            assert coordinator.process is not None
            coordinator.process.send_signal(signal.SIGTERM)
            try:
                coordinator.process.wait(_FAST_STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.kill(coordinator)

    def release(self, workers: list[Child]) -> bool:
        for child in workers:
            if child.alive:
                assert child.process is not None
                child.process.send_signal(signal.SIGINT)
        return True

    @staticmethod
    def kill(child: Child) -> None:
        process = child.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()


def _index(child: Child) -> int:
    digits = child.name[1:]
    return int(digits) if digits.isdigit() else 1 << 30


def run_cluster(settings: Settings) -> int:
    setup_logging(settings.log_file, process="supervisor")
    runtime_dir = settings.cluster.runtime_dir
    try:
        lock = lock_runtime_dir(runtime_dir)
    except AlreadyRunning as exc:
        print(f"sendguard: already running on this configuration (lock in {exc})",
              file=sys.stderr)
        return EXIT_FAILED
    except UnsafeRuntimeDir as exc:
        print(ConfigError(settings.path, "cluster.runtime_dir", str(exc), str(runtime_dir)),
              file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() == 0:
        log_event("running_as_root", logging.WARNING,
                  advice="run as an unprivileged user (examples/sendguard.service: "
                         "User=sendguard with CAP_NET_BIND_SERVICE for ports below 1024)")
    try:
        clear_runtime_dir(runtime_dir)
        return Supervisor(settings).run()
    finally:
        clear_runtime_dir(runtime_dir)
        os.close(lock)
