"""Append-only segment log.

Frames (see ``record``) are appended to ``active/segment-<seq>``; a batch of
concurrent stores becomes one write per frame and one fdatasync() of the
segment, done by a single writer thread, so every frame is contiguous and
the file is only ever extended. A new segment is created only when the head
reaches ``segment_bytes``, and its directory entry is fsynced before
anything written into it is acknowledged.

update() appends the whole record again (state and body), so a deferred
message moves forward with each retry and never pins an old segment for
long. remove() appends a tombstone. Replaying segments in sequence order
gives the queue: a later frame for a queue id wins, a tombstone ends it.

A segment is deleted when it holds no live record and no tombstone still
needed, a tombstone being needed while an older copy of its record exists
in another segment (deleting it first would bring the message back after a
restart). Each deletion is made durable before the tombstones it releases
are considered, so a crash at any point can only leave extra files, never
revive a removed message.

In-memory bookkeeping is updated by ``GroupCommit``'s apply hook, when the
writer thread is idle and the index matches the disk exactly; a segment that
is not the head then can never receive another write, so a decision to
delete it stays valid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import seglog
from .base import (
    BaseSpool,
    SpoolWriteError,
    segment_name,
    segment_seq,
    write_all,
    write_error,
)
from .group import GroupCommit
from .record import CorruptRecord, Removal, SpoolRecord, decode, encode, encode_removal

log = logging.getLogger(__name__)

# ("put", SpoolRecord) | ("del", queue_id) | ("unlink", tuple of seqs)
_Job = tuple[str, Any]

# How long a removal (a tombstone, a segment deletion) may wait for a store
# to share its fdatasync. Nobody waits on a removal to answer a client, and
# while messages arrive a store comes within milliseconds: at two workers
# about a third of the flushes held nothing but removals (docs/PERFORMANCE.md).
# A crash in the meantime delivers the message again, as a crash between
# delivery and removal always could.
REMOVAL_DELAY = 0.05


@dataclass(eq=False, slots=True)
class _Head:
    seq: int
    fd: int
    size: int = 0
    full: bool = False  # a failed write left it suspect: start a new one


def _behind_the_loop() -> None:
    """Run the writer thread as SCHED_BATCH: woken, it never preempts a running thread.

    Its work is a write and an fdatasync, and it needs the GIL before and
    after each. Woken by a hand-off or by the disk while the event loop's
    thread runs, it preempted that thread only to wait for the GIL it holds:
    at two workers on two cores that was ~4 involuntary context switches of
    the event loop per message, and -8 to -13 % of the gateway's CPU per
    message once gone (docs/PERFORMANCE.md). It still runs at once on an
    idle core, and gets its fair share of a busy one.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the default policy works, at some cost


@dataclass(eq=False, slots=True)
class _Seg:
    live: set[str] = field(default_factory=set)  # records whose current copy is here
    copies: set[str] = field(default_factory=set)  # every queue id with a copy here
    tombs: set[str] = field(default_factory=set)  # tombstones still needed
    doomed: bool = False


class SegmentSpool(BaseSpool):
    def __init__(
        self,
        directory: Path,
        worker: str,
        *,
        fsync: bool = True,
        group_commit: bool = True,
        max_delay: float = 0.0,
        max_batch: int = 256,
        lazy_delay: float = REMOVAL_DELAY,
        segment_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        super().__init__(directory, worker, fsync=fsync)
        self._segment_bytes = segment_bytes
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"spool-{worker}",
                                          initializer=_behind_the_loop)
        self._commit: GroupCommit[_Job, Any] = GroupCommit(
            self._flush,
            self._writer,
            max_delay=max_delay,
            max_batch=max_batch if group_commit else 1,
            lazy_delay=lazy_delay if group_commit else 0.0,
            apply=self._apply,
        )
        self._active_fd = os.open(self.active, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Writer-thread state (touched elsewhere only while the writer is idle).
        self._head: _Head | None = None
        self._retired: list[_Head] = []
        self._rotate = False
        # Event-loop state.
        self._segs: dict[int, _Seg] = {}
        self._home: dict[str, int] = {}
        self._copies: dict[str, set[int]] = {}
        self._tomb_at: dict[str, int] = {}
        self._candidates: set[int] = set()
        self._doomed: list[int] = []

    # -- async API -----------------------------------------------------------------

    async def store(self, record: SpoolRecord) -> None:
        await self._enter()
        with self._op():
            if record.queue_id in self._home:
                raise ValueError(f"queue id {record.queue_id} is already spooled")
            await self._commit.submit(("put", record))

    async def update(self, record: SpoolRecord) -> None:
        await self._enter()
        with self._op():
            if record.queue_id not in self._home:
                raise KeyError(record.queue_id)
            await self._commit.submit(("put", record))
            await self._collect()

    async def remove(self, queue_id: str) -> None:
        await self._enter()
        with self._op():
            if queue_id not in self._home:
                raise KeyError(queue_id)
            await self._commit.submit(("del", queue_id), lazy=True)
            await self._collect()

    def _syncs(self) -> GroupCommit[Any, Any]:
        return self._commit

    def close(self) -> None:
        if self._closed:
            return
        self._writer.shutdown(wait=True)
        for head in (*self._retired, self._head):
            if head is not None:
                os.close(head.fd)
        self._head = None
        self._retired.clear()
        os.close(self._active_fd)
        self._release()

    async def _collect(self) -> None:
        # Deleting garbage is housekeeping: its failure must not turn a
        # durable remove() into an error the caller would act on.
        while self._doomed:
            seqs, self._doomed = tuple(self._doomed), []
            try:
                await self._commit.submit(("unlink", seqs), lazy=True)
            except SpoolWriteError as exc:
                log.warning("spool %s: cannot delete segments %s: %s", self.worker, seqs, exc)
                return

    # -- writer thread -------------------------------------------------------------

    def _flush(self, jobs: list[_Job]) -> list[Any]:
        results: list[Any] = []
        touched: dict[int, tuple[_Head, int]] = {}  # seq -> (head, size before the batch)
        unlinked = False
        for kind, arg in jobs:
            if kind == "unlink":
                results.append(self._unlink(arg))
                unlinked = True
                continue
            try:
                data = encode(arg) if kind == "put" else encode_removal(arg)
            except Exception as exc:  # a bad record fails alone, not its batch
                results.append(exc)
                continue
            try:
                head = self._writable_head()
            except OSError as exc:
                results.append(write_error("create segment", exc))
                continue
            start = head.size
            touched.setdefault(head.seq, (head, start))
            try:
                write_all(head.fd, data)
            except OSError as exc:
                self._truncate(head, start)
                results.append(write_error("append to segment", exc))
                continue
            head.size += len(data)
            results.append(head.seq)
        if self.fsync:
            try:
                for head, _ in touched.values():
                    os.fdatasync(head.fd)
                if unlinked:
                    os.fsync(self._active_fd)
            except OSError as exc:
                # Nothing of this batch is acknowledged: take it back off
                # the disk as far as we can, and write on in a new segment.
                for head, start in touched.values():
                    self._truncate(head, start)
                    head.full = True
                results = [
                    r if isinstance(r, BaseException) else write_error("sync segment", exc)
                    for r in results
                ]
        for head in self._retired:
            os.close(head.fd)
        self._retired.clear()
        return results

    def _writable_head(self) -> _Head:
        head = self._head
        if head is not None and not (head.full or self._rotate):
            if head.size < self._segment_bytes:
                return head
        seq = self._alloc_seq()
        path = self.active / segment_name(seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        if self.fsync:
            try:
                os.fsync(self._active_fd)
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
        if head is not None:
            self._retired.append(head)
        self._head = _Head(seq, fd)
        self._rotate = False
        return self._head

    def _truncate(self, head: _Head, size: int) -> None:
        try:
            os.ftruncate(head.fd, size)
            head.size = size
        except OSError:
            head.full = True  # its tail is garbage; the reader will skip it
        if size > 0:
            head.full = True  # EFBIG may well fit in a fresh segment

    def _unlink(self, seqs: tuple[int, ...]) -> None | BaseException:
        try:
            for seq in seqs:
                if self._head is not None and seq == self._head.seq:
                    raise RuntimeError("refusing to delete the head segment")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.active / segment_name(seq))
        except OSError as exc:
            return write_error("delete segment", exc)
        return None

    # -- bookkeeping (event loop, writer idle) --------------------------------------

    def _apply(self, jobs: list[_Job], results: Sequence[Any]) -> None:
        for (kind, arg), res in zip(jobs, results, strict=True):
            if isinstance(res, BaseException):
                continue  # a failed unlink stays doomed: never retried, tombstones kept
            if kind == "put":
                self._index_put(arg.queue_id, res)
            elif kind == "del":
                self._index_del(arg, res)
            else:
                for seq in arg:
                    self._forget(seq)
        self._doom(self._head.seq if self._head is not None else None)

    def _seg(self, seq: int) -> _Seg:
        seg = self._segs.get(seq)
        if seg is None:
            seg = self._segs[seq] = _Seg()
        return seg

    def _index_put(self, queue_id: str, seq: int) -> None:
        old = self._home.get(queue_id)
        if old is not None and old != seq:
            self._segs[old].live.discard(queue_id)
            self._candidates.add(old)
        seg = self._seg(seq)
        self._home[queue_id] = seq
        seg.live.add(queue_id)
        seg.copies.add(queue_id)
        self._copies.setdefault(queue_id, set()).add(seq)

    def _index_del(self, queue_id: str, seq: int) -> None:
        seg = self._seg(seq)
        old = self._home.pop(queue_id, None)
        if old is not None:
            self._segs[old].live.discard(queue_id)
            self._candidates.add(old)
        earlier = self._tomb_at.pop(queue_id, None)
        if earlier is not None and (t := self._segs.get(earlier)) is not None:
            t.tombs.discard(queue_id)  # the newer tombstone does its job
            self._candidates.add(earlier)
        if self._copies.get(queue_id, set()) - {seq}:
            seg.tombs.add(queue_id)
            self._tomb_at[queue_id] = seq
        self._candidates.add(seq)

    def _forget(self, seq: int) -> None:
        seg = self._segs.pop(seq, None)
        if seg is None:
            return
        for queue_id in seg.copies:
            copies = self._copies.get(queue_id)
            if copies is None:
                continue
            copies.discard(seq)
            tomb = self._tomb_at.get(queue_id)
            if tomb is not None and not copies - {tomb}:
                del self._tomb_at[queue_id]
                if (t := self._segs.get(tomb)) is not None:
                    t.tombs.discard(queue_id)
                    self._candidates.add(tomb)
            if not copies:
                del self._copies[queue_id]

    def _doom(self, head: int | None) -> None:
        for seq in sorted(self._candidates):
            seg = self._segs.get(seq)
            if seg is None or seg.doomed or seq == head or seg.live or seg.tombs:
                continue
            seg.doomed = True
            self._doomed.append(seq)
        self._candidates.clear()
        if head is not None:
            self._candidates.add(head)  # looked at again once it is no longer the head

    # -- startup -------------------------------------------------------------------

    def load_all(self) -> list[SpoolRecord]:
        self._check_idle()
        self._clear_incoming()
        self._merge_adopted()
        self._segs.clear()
        self._home.clear()
        self._copies.clear()
        self._tomb_at.clear()
        self._candidates.clear()
        self._doomed.clear()
        return self._digest(os.listdir(self.active))

    def adopt(self, other_worker_dir: Path) -> list[SpoolRecord]:
        self._check_idle()
        self._claim(other_worker_dir)
        moved = self._merge_adopted()
        # Adopted segments were numbered above our head; our next write must
        # land above them, or replay would put their old state after it.
        self._rotate = True
        return self._digest(moved)

    def _digest(self, names: Iterable[str]) -> list[SpoolRecord]:
        live: dict[str, SpoolRecord] = {}
        files: list[str] = []
        segments: list[tuple[int, str]] = []
        for name in names:
            seq = segment_seq(name)
            if seq is not None:
                segments.append((seq, name))
            else:
                files.append(name)
        for seq, name in sorted(segments):
            path = self.active / name
            data = path.read_bytes()
            sc = seglog.scan(data)
            if sc.bad and not self._repair(path, data, sc):
                continue
            self._seg(seq)
            self._candidates.add(seq)
            for e in sc.entries:
                if isinstance(e.item, Removal):
                    live.pop(e.item.queue_id, None)
                    self._index_del(e.item.queue_id, seq)
                else:
                    live[e.item.queue_id] = e.item
                    self._index_put(e.item.queue_id, seq)
        for record in self._import_files(files):
            live[record.queue_id] = record
        self._collect_now()
        return sorted(live.values(), key=lambda r: (r.received_at, r.queue_id))

    def _repair(self, path: Path, data: bytes, sc: seglog.Scan) -> bool:
        """Keep the damaged segment's bytes in corrupt/, its good frames in place."""
        self._quarantine(path, link=True)
        self._sync_dirs(self.corrupt)
        good = b"".join(data[e.start : e.end] for e in sc.entries)
        if not good:
            os.unlink(path)
            self._sync_dirs(self.active)
            return False
        tmp = self.incoming / f"{path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, good)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._sync_dirs(self.active)
        return True

    def _import_files(self, names: list[str]) -> list[SpoolRecord]:
        """Append record files (one frame each, named by queue id) to the log."""
        records: list[SpoolRecord] = []
        sources: list[Path] = []
        for name in names:
            path = self.active / name
            if not path.is_file() or path.is_symlink():
                continue
            try:
                record = decode(path.read_bytes())
                if record.queue_id != name:
                    raise CorruptRecord(f"file name {name!r} is not its queue id")
            except CorruptRecord:
                self._quarantine(path)
                self._sync_dirs(self.corrupt, self.active)
                continue
            records.append(record)
            sources.append(path)
        if not records:
            return []
        jobs: list[_Job] = [("put", r) for r in records]
        results = self._flush(jobs)
        for res in results:
            if isinstance(res, BaseException):
                raise res  # the files stay; the next start tries again
        self._apply(jobs, results)
        for path in sources:
            os.unlink(path)
        self._sync_dirs(self.active)
        return records

    def _collect_now(self) -> None:
        self._doom(self._head.seq if self._head is not None else None)
        while self._doomed:
            jobs: list[_Job] = [("unlink", tuple(self._doomed))]
            self._doomed = []
            results = self._flush(jobs)
            if isinstance(results[0], BaseException):
                raise results[0]
            self._apply(jobs, results)
