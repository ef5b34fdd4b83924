"""One file per message, Postfix/Haraka style.

store(): in a pool thread, ``incoming/<qid>.<rand>`` is opened with O_EXCL,
written, fdatasync()ed and renamed to ``active/<qid>``; then the caller waits
for a directory fsync of ``active/`` that began after its rename. Those
directory fsyncs are group-committed: one per batch, run by a single thread
of its own so a queue of pending writes in the pool cannot delay it.
update() is the same write replacing the old file; remove() is an unlink and
the same shared directory fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import seglog
from .base import BaseSpool, SpoolWriteError, segment_seq, write_all, write_error
from .group import GroupCommit
from .record import CorruptRecord, SpoolRecord, decode, encode, is_queue_id

_R = TypeVar("_R")


class FileSpool(BaseSpool):
    def __init__(
        self,
        directory: Path,
        worker: str,
        *,
        fsync: bool = True,
        group_commit: bool = True,
        max_delay: float = 0.0,
        max_batch: int = 256,
        max_workers: int = 32,
    ) -> None:
        super().__init__(directory, worker, fsync=fsync)
        self._group = group_commit and fsync
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"spool-{worker}")
        self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix=f"spool-{worker}-dir")
        self._active_fd = os.open(self.active, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirsync: GroupCommit[None, None] = GroupCommit(
            self._fsync_active, self._sync_thread, max_delay=max_delay, max_batch=max_batch
        )

    # -- async API -----------------------------------------------------------------

    async def store(self, record: SpoolRecord) -> None:
        await self._put(record, replace=False)

    async def update(self, record: SpoolRecord) -> None:
        await self._put(record, replace=True)

    async def remove(self, queue_id: str) -> None:
        await self._enter()
        with self._op():
            await self._run(self._unlink, queue_id)
            if self._group:
                await self._dirsync.submit(None)

    def _syncs(self) -> GroupCommit[Any, Any]:
        return self._dirsync

    def close(self) -> None:
        if self._closed:
            return
        self._pool.shutdown(wait=True)
        self._sync_thread.shutdown(wait=True)
        os.close(self._active_fd)
        self._release()

    async def _put(self, record: SpoolRecord, *, replace: bool) -> None:
        await self._enter()
        with self._op():
            await self._run(self._write, record, replace)
            if self._group:
                try:
                    await self._dirsync.submit(None)
                except SpoolWriteError:
                    if not replace:
                        # Answered 451: do not deliver it behind the client's back.
                        await self._run(self._discard, record.queue_id)
                    raise

    async def _run(self, fn: Callable[..., _R], *args: object) -> _R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- pool threads --------------------------------------------------------------

    def _write(self, record: SpoolRecord, replace: bool) -> None:
        data = encode(record)
        final = self.active / record.queue_id
        if os.path.exists(final) != replace:
            if replace:
                raise KeyError(record.queue_id)
            raise ValueError(f"queue id {record.queue_id} is already spooled")
        tmp = self.incoming / f"{record.queue_id}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise write_error("create spool file", exc) from exc
        try:
            try:
                write_all(fd, data)
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise write_error("write spool file", exc) from exc
        if self.fsync and not self._group:
            try:
                os.fsync(self._active_fd)
            except OSError as exc:
                if not replace:
                    self._discard(record.queue_id)
                raise write_error("sync spool directory", exc) from exc

    def _unlink(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            os.unlink(self.active / queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        except OSError as exc:
            raise write_error("remove spool file", exc) from exc
        if self.fsync and not self._group:
            try:
                os.fsync(self._active_fd)
            except OSError as exc:
                raise write_error("sync spool directory", exc) from exc

    def _discard(self, queue_id: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.active / queue_id)

    def _fsync_active(self, items: list[None]) -> list[None | BaseException]:
        try:
            os.fsync(self._active_fd)
        except OSError as exc:
            return [write_error("sync spool directory", exc) for _ in items]
        return [None] * len(items)

    # -- startup -------------------------------------------------------------------

    def load_all(self) -> list[SpoolRecord]:
        self._check_idle()
        self._clear_incoming()
        self._merge_adopted()
        return self._digest(os.listdir(self.active))

    def adopt(self, other_worker_dir: Path) -> list[SpoolRecord]:
        self._check_idle()
        self._claim(other_worker_dir)
        return self._digest(self._merge_adopted())

    def _digest(self, names: Iterable[str]) -> list[SpoolRecord]:
        records: list[SpoolRecord] = []
        segments: list[tuple[int, str]] = []
        moved = False
        for name in names:
            path = self.active / name
            if not path.is_file() or path.is_symlink():
                continue
            seq = segment_seq(name)
            if seq is not None:
                segments.append((seq, name))
                continue
            try:
                record = decode(path.read_bytes())
                if record.queue_id != name:
                    raise CorruptRecord(f"file name {name!r} is not its queue id")
            except CorruptRecord:
                self._quarantine(path)
                moved = True
                continue
            records.append(record)
        if segments:
            records.extend(self._import_segments(sorted(segments)))
        if moved:
            self._sync_dirs(self.corrupt, self.active)
        records.sort(key=lambda r: (r.received_at, r.queue_id))
        return records

    def _import_segments(self, segments: list[tuple[int, str]]) -> list[SpoolRecord]:
        """Convert a segment log (the other shape, or an adopted worker's) to files."""
        scans = []
        for _, name in segments:
            sc = seglog.scan((self.active / name).read_bytes())
            if sc.bad:
                self._quarantine(self.active / name, link=True)
            scans.append(sc)
        live = seglog.replay(scans)
        for record in live.values():
            self._write(record, os.path.exists(self.active / record.queue_id))
        self._sync_dirs(self.corrupt, self.active)
        for _, name in segments:
            os.unlink(self.active / name)
        self._sync_dirs(self.active)
        return list(live.values())
