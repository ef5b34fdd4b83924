"""What a spool is beside its write path: errors, directory layout, locking, adoption.

Layout of one worker's spool (``<spool>/<worker>/``)::

    lock        flock()ed by the owning process; a live owner blocks adoption
    incoming/   temp files being written; anything left here at startup was
                never acknowledged and is deleted
    active/     the queue: segment files named ``segment-<seq>``; a record
                file named by its queue id (one frame, the shape of an older
                one-file-per-message spool) is read and moved into the log
    corrupt/    quarantined files, bytes kept for a human to look at
    adopt/      another worker's ``active/`` renamed here in one step while
                its files are merged into ours (survives a crash mid-merge);
                a later adopter of this folder takes what is left here too

Everything lives on one filesystem, so every move is a rename.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cluster.durable import fsync_folder

from .record import SpoolRecord

if TYPE_CHECKING:
    from .group import GroupCommit

WORKER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SEGMENT_RE = re.compile(r"segment-(\d{12})")
_DIRS = ("incoming", "active", "corrupt", "adopt")


class SpoolError(Exception):
    """Base class of spool failures."""


class SpoolWriteError(SpoolError):
    """The spool could not make a write durable; nothing partial is visible.

    The SMTP side answers ``451 4.3.0 {sid} temporary failure, try later``.
    """


class SpoolLocked(SpoolError):
    """Another live process owns that spool directory."""


def segment_name(seq: int) -> str:
    return f"segment-{seq:012d}"


def segment_seq(name: str) -> int | None:
    m = SEGMENT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def names_in(path: Path) -> list[str]:
    """The entries of a folder, sorted; none when it does not exist."""
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_error(what: str, exc: OSError) -> SpoolWriteError:
    name = errno.errorcode.get(exc.errno or 0, "error")
    err = SpoolWriteError(f"{what}: {name} {exc.strerror or exc}")
    err.__cause__ = exc
    return err


class _Lock:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SpoolLocked(f"{path.parent} is in use by another process") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class BaseSpool(abc.ABC):
    """The interface of a worker's durable message spool.

    The constructor (blocking) creates ``<directory>/<worker>/`` and takes
    its lock, raising :class:`SpoolLocked` while another process holds it.
    ``load_all`` and ``adopt`` are blocking startup-time calls: run them
    before the first ``store`` (or while nothing is in flight); ``update``
    and ``remove`` know the records that ``load_all``, ``adopt`` or
    ``store`` have shown them. ``store``, ``update`` and ``remove`` return
    only once the change is durable, do their I/O in threads, and raise
    :class:`SpoolWriteError` on I/O failure; a record that could not be read
    back raises ValueError before anything is written. Once ``aclose`` has
    begun they raise :class:`SpoolError`.
    """

    def __init__(self, directory: Path, worker: str, *, fsync: bool = True) -> None:
        if not WORKER_RE.fullmatch(worker) or worker in (".", ".."):
            raise ValueError(f"bad worker name {worker!r}")
        self.root = Path(directory) / worker
        self.worker = worker
        self.fsync = fsync
        self.incoming = self.root / "incoming"
        self.active = self.root / "active"
        self.corrupt = self.root / "corrupt"
        self.adopting = self.root / "adopt"
        self._make_dirs()
        self._lock = _Lock(self.root / "lock")
        # An adopter may have claimed active/ between our mkdir and our lock.
        self._make_dirs()
        self._closed = False
        self._closing = False
        self._ops = 0  # store/update/remove calls not yet returned
        self._drained: asyncio.Event | None = None
        self._gate: asyncio.Event | None = None  # set while adopt_live() holds writes back
        seqs = [segment_seq(n) for n in os.listdir(self.active)]
        self._next_seq = max((s for s in seqs if s is not None), default=0) + 1

    # -- the interface -------------------------------------------------------

    @abc.abstractmethod
    def load_all(self) -> list[SpoolRecord]:
        """Startup scan: every intact record, oldest first; corrupt ones quarantined."""

    @abc.abstractmethod
    async def store(self, record: SpoolRecord) -> None:
        """Queue a new record; returns once it is durable (ValueError if already queued)."""

    @abc.abstractmethod
    async def update(self, record: SpoolRecord) -> None:
        """Durably replace a queued record's state (KeyError if not queued)."""

    @abc.abstractmethod
    async def remove(self, queue_id: str) -> None:
        """Durably drop a queued record (KeyError if not queued)."""

    @abc.abstractmethod
    def adopt(self, other_worker_dir: Path) -> list[SpoolRecord]:
        """Take over another (dead) worker's queue; returns the records taken.

        ``other_worker_dir`` is ``<spool>/<name>`` on the same filesystem.
        Its ``active/`` is renamed under our ``adopt/`` in one step while
        holding its lock (:class:`SpoolLocked` if its owner is alive), so a
        record is never owned by two workers; a crash mid-merge is finished
        by the next ``load_all``.
        """

    async def aclose(self) -> None:
        """Wait for writes in flight, then release files, threads and the lock."""
        if self._closed:
            return
        await self._quiesce()
        await self._syncs().drain()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @abc.abstractmethod
    def _syncs(self) -> GroupCommit[Any, Any]:
        """The group commit whose pending syncs must finish before closing."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release files, threads and the lock now; for when no write is in flight."""

    @property
    def group_stats(self) -> tuple[int, int]:
        """(durable flushes run, operations they covered), for the benchmark."""
        syncs = self._syncs()
        return syncs.batches, syncs.items

    async def adopt_live(self, other_worker_dir: Path) -> list[SpoolRecord]:
        """``adopt`` while the spool is in use (the worker is serving).

        New stores, updates and removes wait at a gate, those in flight
        finish, and the merge runs in a thread (it reads the other queue
        whole, which must not stall the event loop); then the gate opens.
        """
        while self._gate is not None:
            await self._gate.wait()
        self._check_open()
        gate = self._gate = asyncio.Event()
        try:
            while self._ops or self._flushing():
                await asyncio.sleep(0.002)
            work = asyncio.ensure_future(asyncio.to_thread(self.adopt, Path(other_worker_dir)))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be stopped: writes stay out until it is done. What it
                # took is in our spool, so the next start delivers it.
                await asyncio.wait([work])
                raise
        finally:
            self._gate = None
            gate.set()

    async def _enter(self) -> None:
        """Wait while an adoption holds writes back; call right before ``_op()``."""
        while self._gate is not None:
            await self._gate.wait()

    async def __aenter__(self) -> BaseSpool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- shared helpers --------------------------------------------------------

    def _make_dirs(self) -> None:
        # A directory created now is itself a new entry in its parent: sync
        # the parent too, or a crash could lose the whole queue directory.
        created: list[Path] = []
        for path in (self.root.parent, self.root, *(self.root / d for d in _DIRS)):
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                created.append(path)
        if self.fsync:
            for path in created:
                fsync_folder(path.parent)

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise SpoolError("spool is closed")

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        """Bracket one async operation, so aclose() can wait for all of them."""
        self._check_open()
        self._ops += 1
        try:
            yield
        finally:
            self._ops -= 1
            if not self._ops and self._drained is not None:
                self._drained.set()

    async def _quiesce(self) -> None:
        self._closing = True
        while self._gate is not None:
            await self._gate.wait()
        while self._ops:
            self._drained = asyncio.Event()
            await self._drained.wait()

    def _check_idle(self) -> None:
        self._check_open()
        if self._ops or self._flushing():
            raise RuntimeError("load_all()/adopt() while spool writes are in flight")

    def _flushing(self) -> bool:
        # A caller cancelled mid-store has left _ops, but its write may not
        # have finished: ask the group commit.
        return self._syncs().busy

    def _sync_dirs(self, *paths: Path) -> None:
        if self.fsync:
            for path in paths:
                fsync_folder(path)

    def _alloc_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _clear_incoming(self) -> None:
        # Temp files were never renamed into place, so never acknowledged.
        for name in os.listdir(self.incoming):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(self.incoming / name)

    def _quarantine(self, path: Path, *, link: bool = False) -> Path:
        """Move (or hard-link) ``path`` into corrupt/ under a free name."""
        n = 0
        while True:
            dest = self.corrupt / (path.name if n == 0 else f"{path.name}.{n}")
            try:
                os.link(path, dest)
                break
            except FileExistsError:
                n += 1
        if not link:
            os.unlink(path)
        return dest

    def _claim(self, other_worker_dir: Path) -> None:
        """Rename the other worker's active/ under our adopt/ in one step.

        Batches it had claimed itself and not merged yet (it died mid-merge)
        come along. Nothing to take, or a rival adopter that took it first,
        is not an error: the other folder is simply left empty.
        """
        other = Path(other_worker_dir)
        if other.resolve() == self.root.resolve():
            raise ValueError("a spool cannot adopt itself")
        if not (other / "active").is_dir() and not names_in(other / "adopt"):
            return
        lock = _Lock(other / "lock")
        try:
            moved = False
            for batch in names_in(other / "adopt"):
                os.rename(other / "adopt" / batch, self.adopting / f"{other.name}.{batch}")
                moved = True
            if (other / "active").is_dir():
                dest = self.adopting / f"{other.name}-{time.time_ns()}"
                os.rename(other / "active", dest)
                moved = True
            if moved:
                self._sync_dirs(self.adopting, other)
                if (other / "adopt").is_dir():
                    self._sync_dirs(other / "adopt")
        finally:
            lock.release()

    def _merge_adopted(self) -> list[str]:
        """Move claimed files into active/; returns their names there.

        Segments keep their relative order but are renumbered above every
        segment we have, so their entries replay after ours; queue ids are
        globally unique, so record files keep their names.
        """
        moved: list[str] = []
        for batch in sorted(os.listdir(self.adopting)):
            src = self.adopting / batch
            names = sorted(os.listdir(src))
            segments = sorted((s, n) for n in names if (s := segment_seq(n)) is not None)
            for _, name in segments:
                new = segment_name(self._alloc_seq())
                os.rename(src / name, self.active / new)
                moved.append(new)
            for name in names:
                if segment_seq(name) is None:
                    os.rename(src / name, self.active / name)
                    moved.append(name)
            self._sync_dirs(self.active)
            os.rmdir(src)
        if moved:
            self._sync_dirs(self.adopting)
        return moved

    def _release(self) -> None:
        self._closed = True
        self._lock.release()
