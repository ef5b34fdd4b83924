from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest

from worker.spool import (
    CorruptRecord,
    Recipient,
    SegmentSpool,
    Spool,
    SpoolError,
    SpoolLocked,
    SpoolRecord,
    SpoolWriteError,
    Status,
    decode,
    encode,
    new_queue_id,
    seglog,
)
from worker.spool.base import BaseSpool
from worker.spool.record import MAGIC, _frame

SHAPES: dict[str, type[BaseSpool]] = {"segment": SegmentSpool}
ROOT = Path(__file__).resolve().parents[2]


def make(
    i: int = 0, size: int = 1024, rcpts: tuple[str, ...] = ("anna@example.com",)
) -> SpoolRecord:
    return SpoolRecord.new(
        session_id="piWs1j0010jifNx01iWsdh",
        client_ip="192.0.2.10",
        account="jan@kowalski.pl",
        helo="laptop.kowalski.pl",
        mail_from="jan@kowalski.pl",
        rcpt_tos=list(rcpts),
        message=(b"Subject: %d\r\n\r\n" % i) + b"x" * size,
    )


@pytest.fixture(params=sorted(SHAPES))
def shape(request: pytest.FixtureRequest) -> type[BaseSpool]:
    return SHAPES[request.param]


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def run_child(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- record format -----------------------------------------------------------------


def test_record_round_trip() -> None:
    rec = make(1, rcpts=("a@example.com", "zażółć@example.pl"))
    rec.attempts = 3
    rec.next_attempt = 1234.5
    rec.recipients[0].status = Status.DEFERRED
    rec.recipients[0].last_error = "451 4.7.1 greylisted"
    rec.recipients[1].status = Status.DELIVERED
    data = encode(rec)
    assert data.startswith(b"sendguard-spool/1\n")
    assert re.search(rb"END [0-9a-f]{32}\n\Z", data)
    assert decode(data) == rec
    assert decode(encode(make(2, size=0))).message == b"Subject: 2\r\n\r\n"


def test_recipients_are_plain_maps_on_disk_both_ways() -> None:
    # The header a record has always had: a reader of this format that predates the
    # typed recipients reads new records, and this one reads records written before.
    rec = make(1, rcpts=("a@example.com", "b@example.com"))
    rec.recipients[1].status = Status.BOUNCED
    rec.recipients[1].last_error = "550 5.1.1 no such user"
    data = encode(rec)
    (hlen,) = struct.unpack_from(">I", data, len(MAGIC))
    header = msgpack.unpackb(data[len(MAGIC) + 4:len(MAGIC) + 4 + hlen])
    assert header["recipients"] == [
        {"rcpt": "a@example.com", "status": "pending", "last_error": None},
        {"rcpt": "b@example.com", "status": "bounced", "last_error": "550 5.1.1 no such user"},
    ]
    old_style = dict(header, recipients=[dict(r) for r in header["recipients"]])
    loaded = decode(_frame(old_style, rec.message))
    assert loaded == rec
    assert [r.status for r in loaded.recipients] == [Status.PENDING, Status.BOUNCED]
    assert loaded.recipients[1].status.final and not loaded.recipients[0].status.final
    bad = dict(header, recipients=[{"rcpt": "a@example.com", "status": "lost",
                                    "last_error": None}])
    with pytest.raises(CorruptRecord, match="bad recipient state"):
        decode(_frame(bad, rec.message))


def test_record_damage_is_detected() -> None:
    data = encode(make())
    for cut in (0, 5, 20, len(data) // 2, len(data) - 10, len(data) - 1):
        with pytest.raises(CorruptRecord):
            decode(data[:cut])
    for pos in range(0, len(data), 7):  # a flipped bit anywhere: magic, header, body, END
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptRecord):
            decode(bytes(damaged))
    with pytest.raises(CorruptRecord, match="after the END marker"):
        decode(data + b"x")
    # What decode() would refuse is refused before it is written (and acknowledged).
    for change in (
        {"queue_id": "bad-id"},
        {"helo": None},
        {"rcpt_tos": None},
        {"attempts": "x"},
        {"recipients": [{"rcpt": "a@b.pl", "status": "lost", "last_error": None}]},
    ):
        with pytest.raises(ValueError):
            encode(dataclasses.replace(make(), **change))


def test_queue_ids_unique_charset_length_and_time_ordered() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9]{22}", q) for q in ids)
    first = new_queue_id()
    time.sleep(0.002)
    assert new_queue_id() > first


def test_segment_scan_resyncs_after_damage() -> None:
    frames = [encode(make(i)) for i in range(5)]
    blob = bytearray(b"".join(frames))
    start = len(frames[0]) + len(frames[1])
    blob[start + 30] ^= 0xFF  # inside frame 2's header length / header
    sc = seglog.scan(bytes(blob))
    messages = [e.item.message for e in sc.entries if isinstance(e.item, SpoolRecord)]
    assert messages == [make(i).message for i in (0, 1, 3, 4)]
    assert sc.bad == [(start, start + len(frames[2]), sc.bad[0][2])]


# -- durability and round trip ---------------------------------------------------------


def test_default_shape() -> None:
    assert Spool is SegmentSpool


async def test_round_trip_through_a_fresh_instance(tmp_path: Path, shape: type[BaseSpool]) -> None:
    spool = shape(tmp_path, "w0")
    assert spool.load_all() == []
    recs = [make(i) for i in range(10)]
    for rec in recs:
        await spool.store(rec)
    await spool.aclose()
    again = shape(tmp_path, "w0")
    try:
        assert sorted(again.load_all(), key=lambda r: r.queue_id) == sorted(
            recs, key=lambda r: r.queue_id
        )
    finally:
        await again.aclose()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_store_is_durable_when_it_returns_even_after_kill(tmp_path: Path, name: str) -> None:
    # The child stores, then dies at once like kill -9: no close, no flush.
    out = run_child(
        """
        import asyncio, json, os, sys
        from pathlib import Path
        from worker.spool import SegmentSpool, SpoolRecord
        cls = {"segment": SegmentSpool}[sys.argv[2]]
        async def main():
            spool = cls(Path(sys.argv[1]), "w0")
            spool.load_all()
            rec = SpoolRecord.new(session_id="s", client_ip="192.0.2.1", account="a@b.pl",
                                  helo="h", mail_from="a@b.pl", rcpt_tos=["c@d.pl"],
                                  message=b"hello\\r\\n")
            await spool.store(rec)
            print(json.dumps({"queue_id": rec.queue_id}), flush=True)
            os._exit(0)
        asyncio.run(main())
        """,
        str(tmp_path),
        name,
    )
    spool = SHAPES[name](tmp_path, "w0")
    try:
        assert [r.queue_id for r in spool.load_all()] == [out["queue_id"]]
    finally:
        spool.close()


async def test_segment_store_returns_after_its_bytes_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = SegmentSpool(tmp_path, "w0", segment_bytes=20_000)
    spool.load_all()
    synced: set[str] = set()
    premature: list[str] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        data = Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes()
        for e in seglog.scan(data).entries:
            synced.add(e.item.queue_id)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def store(rec: SpoolRecord) -> None:
        await spool.store(rec)
        if rec.queue_id not in synced:
            premature.append(rec.queue_id)

    await asyncio.gather(*(store(make(i)) for i in range(100)))
    await spool.aclose()
    assert premature == []
    assert len([n for n in files(tmp_path / "w0" / "active") if n.startswith("segment-")]) > 1


async def test_200_concurrent_stores_all_land(tmp_path: Path, shape: type[BaseSpool]) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    recs = [make(i, size=random.randrange(0, 5000)) for i in range(200)]
    await asyncio.gather(*(spool.store(r) for r in recs))
    flushes, items = spool.group_stats
    assert items >= 200 and flushes < 200  # durability was shared
    await spool.aclose()
    again = shape(tmp_path, "w0")
    try:
        got = {r.queue_id: r for r in again.load_all()}
        assert got == {r.queue_id: r for r in recs}
    finally:
        again.close()


async def test_a_bad_record_fails_alone(tmp_path: Path, shape: type[BaseSpool]) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    good = [make(i) for i in range(6)]
    bad = dataclasses.replace(make(9), helo=None)  # type: ignore[arg-type]
    batch = [*good[:3], bad, *good[3:]]
    results = await asyncio.gather(*(spool.store(r) for r in batch), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["ValueError"] + [
        "NoneType"
    ] * 3
    await spool.aclose()
    again = shape(tmp_path, "w0")
    try:
        assert again.load_all() == good
        assert files(tmp_path / "w0" / "corrupt") == []
    finally:
        again.close()


async def test_aclose_waits_for_operations_in_flight(
    tmp_path: Path, shape: type[BaseSpool]
) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    recs = [make(i) for i in range(60)]
    for rec in recs[:30]:
        await spool.store(rec)
    tasks = [asyncio.create_task(spool.remove(r.queue_id)) for r in recs[:30]]
    tasks += [asyncio.create_task(spool.store(r)) for r in recs[30:]]
    await asyncio.sleep(0)
    await spool.aclose()
    assert all(t.done() and t.exception() is None for t in tasks)
    with pytest.raises(SpoolError):
        await spool.store(make(99))
    again = shape(tmp_path, "w0")
    try:
        assert again.load_all() == recs[30:]
    finally:
        again.close()


# -- corruption ------------------------------------------------------------------------


async def test_segment_spool_quarantines_flipped_and_truncated(tmp_path: Path) -> None:
    spool = SegmentSpool(tmp_path, "w0")
    spool.load_all()
    recs = [make(i) for i in range(5)]
    for rec in recs:
        await spool.store(rec)
    await spool.aclose()
    active, corrupt = tmp_path / "w0" / "active", tmp_path / "w0" / "corrupt"
    [seg] = files(active)
    original = (active / seg).read_bytes()
    frame = len(encode(recs[0]))
    damaged = bytearray(original)
    damaged[frame + frame // 2] ^= 0x20  # body of record 1
    damaged = damaged[:-7]  # and record 4 torn at the end
    (active / seg).write_bytes(bytes(damaged))

    again = SegmentSpool(tmp_path, "w0")
    try:
        assert again.load_all() == [recs[0], recs[2], recs[3]]
        assert [(corrupt / n).read_bytes() for n in files(corrupt)] == [bytes(damaged)]
        # The damaged segment was rewritten with its good frames only.
        assert again.load_all() == [recs[0], recs[2], recs[3]]
        assert len(files(corrupt)) == 1
        await again.store(recs[1])
        await again.remove(recs[0].queue_id)
    finally:
        await again.aclose()
    third = SegmentSpool(tmp_path, "w0")
    try:
        assert third.load_all() == [recs[1], recs[2], recs[3]]
    finally:
        third.close()


async def test_leftover_temp_files_are_not_records(tmp_path: Path, shape: type[BaseSpool]) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    await spool.store(make(1))
    await spool.aclose()
    (tmp_path / "w0" / "incoming" / "abc.1234").write_bytes(encode(make(2))[:100])
    again = shape(tmp_path, "w0")
    try:
        assert len(again.load_all()) == 1
        assert files(tmp_path / "w0" / "incoming") == []
    finally:
        again.close()


# -- write failures --------------------------------------------------------------------

FSIZE_CHILD = """
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    from worker.spool import SegmentSpool, SpoolRecord, SpoolWriteError
    cls = {"segment": SegmentSpool}[sys.argv[2]]
    def rec(body):
        return SpoolRecord.new(session_id="s", client_ip="192.0.2.1", account="a@b.pl",
                               helo="h", mail_from="a@b.pl", rcpt_tos=["c@d.pl"], message=body)
    async def main():
        spool = cls(Path(sys.argv[1]), "w0")
        spool.load_all()
        kept = []
        first = rec(b"a" * 1000)
        await spool.store(first)
        kept.append(first.queue_id)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        big = rec(b"b" * 200_000)
        try:
            await spool.store(big)
            outcome = "stored"
        except SpoolWriteError as exc:
            outcome = str(exc)
        after = rec(b"c" * 1000)
        await spool.store(after)
        kept.append(after.queue_id)
        await spool.aclose()
        print(json.dumps({"outcome": outcome, "kept": kept, "big": big.queue_id}))
    asyncio.run(main())
"""


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_rlimit_fsize_failure_raises_and_leaves_no_record(tmp_path: Path, name: str) -> None:
    out = run_child(FSIZE_CHILD, str(tmp_path), name)
    assert "EFBIG" in out["outcome"]
    spool = SHAPES[name](tmp_path, "w0")
    try:
        assert sorted(r.queue_id for r in spool.load_all()) == sorted(out["kept"])
    finally:
        spool.close()
    assert files(tmp_path / "w0" / "corrupt") == []
    assert files(tmp_path / "w0" / "incoming") == []


async def test_fsync_eio_raises_and_leaves_no_record(
    tmp_path: Path, shape: type[BaseSpool], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    ok = make(1)
    await spool.store(ok)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    bad = make(2)
    with pytest.raises(SpoolWriteError, match="EIO"):
        await spool.store(bad)
    monkeypatch.undo()
    later = make(3)
    await spool.store(later)
    await spool.aclose()
    again = shape(tmp_path, "w0")
    try:
        assert sorted(r.queue_id for r in again.load_all()) == sorted([ok.queue_id, later.queue_id])
        assert files(tmp_path / "w0" / "corrupt") == []
    finally:
        again.close()


def _tiny_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    return res.returncode == 0


async def test_disk_full_raises_and_leaves_no_record(
    tmp_path: Path, shape: type[BaseSpool]
) -> None:
    mnt = tmp_path / "mnt"
    if not _tiny_tmpfs(mnt):
        pytest.skip("needs root and a mountable tmpfs")
    try:
        spool = shape(mnt, "w0")
        spool.load_all()
        stored: list[str] = []
        with pytest.raises(SpoolWriteError, match="ENOSPC"):
            for i in range(200):
                rec = make(i, size=3000)
                await spool.store(rec)
                stored.append(rec.queue_id)
        assert stored  # some fitted before the disk filled
        await spool.aclose()
        again = shape(mnt, "w0")
        try:
            assert sorted(r.queue_id for r in again.load_all()) == sorted(stored)
            assert files(mnt / "w0" / "corrupt") == []
        finally:
            again.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- update, remove, adopt -------------------------------------------------------------


async def test_update_and_remove(tmp_path: Path, shape: type[BaseSpool]) -> None:
    spool = shape(tmp_path, "w0")
    spool.load_all()
    a, b = make(1, rcpts=("x@example.com", "y@example.com")), make(2)
    await spool.store(a)
    await spool.store(b)
    with pytest.raises(ValueError):
        await spool.store(a)
    a.attempts = 1
    a.next_attempt = a.received_at + 60
    a.recipients[0].status = Status.DELIVERED
    a.recipients[1].status = Status.DEFERRED
    a.recipients[1].last_error = "451 4.2.0 try later"
    await spool.update(a)
    await spool.remove(b.queue_id)
    with pytest.raises(KeyError):
        await spool.remove(b.queue_id)
    with pytest.raises(KeyError):
        await spool.update(b)
    await spool.aclose()
    again = shape(tmp_path, "w0")
    try:
        [got] = again.load_all()
        assert got == a and got.attempts == 1 and not got.done
        assert got.recipients[1] == Recipient("y@example.com", Status.DEFERRED,
                                              "451 4.2.0 try later")
        got.recipients[1].status = Status.BOUNCED
        await again.update(got)
        assert got.done
        await again.remove(got.queue_id)
    finally:
        await again.aclose()
    third = shape(tmp_path, "w0")
    try:
        assert third.load_all() == []
    finally:
        third.close()


async def test_adopt_takes_over_a_dead_workers_queue(
    tmp_path: Path, shape: type[BaseSpool]
) -> None:
    dead = shape(tmp_path, "w1")
    dead.load_all()
    theirs = [make(i) for i in range(5)]
    for rec in theirs:
        await dead.store(rec)
    await dead.remove(theirs[0].queue_id)
    with pytest.raises(SpoolLocked):
        shape(tmp_path, "w1")
    ours = shape(tmp_path, "w0")
    try:
        ours.load_all()
        mine = make(99)
        await ours.store(mine)
        with pytest.raises(SpoolLocked):  # its owner is alive
            ours.adopt(tmp_path / "w1")
        await dead.aclose()
        adopted = ours.adopt(tmp_path / "w1")
        assert sorted(r.queue_id for r in adopted) == sorted(r.queue_id for r in theirs[1:])
        assert ours.adopt(tmp_path / "w1") == []
        # Adopted records are ours to update and remove.
        theirs[1].attempts = 4
        await ours.update(theirs[1])
        await ours.remove(theirs[2].queue_id)
    finally:
        await ours.aclose()
    again = shape(tmp_path, "w0")
    try:
        got = {r.queue_id: r for r in again.load_all()}
    finally:
        again.close()
    assert set(got) == {mine.queue_id, theirs[1].queue_id, theirs[3].queue_id, theirs[4].queue_id}
    assert got[theirs[1].queue_id].attempts == 4
    restarted = shape(tmp_path, "w1")  # the old name starts empty
    try:
        assert restarted.load_all() == []
    finally:
        restarted.close()


async def test_adopt_a_record_file(tmp_path: Path) -> None:
    # A queue that holds a record file (one frame, named by its queue id), not a segment.
    rec = make(1)
    (tmp_path / "w1" / "active").mkdir(parents=True)
    (tmp_path / "w1" / "active" / rec.queue_id).write_bytes(encode(rec))
    ours = SegmentSpool(tmp_path, "w0")
    try:
        ours.load_all()
        assert ours.adopt(tmp_path / "w1") == [rec]
    finally:
        await ours.aclose()


# -- segment garbage collection ----------------------------------------------------------


async def test_segments_are_deleted_when_done_and_removed_stay_removed(tmp_path: Path) -> None:
    # Random stores, updates and removes over tiny segments, with restarts:
    # the reloaded queue must match a plain model, and finished segments go.
    rng = random.Random(7)
    model: dict[str, SpoolRecord] = {}
    spool = SegmentSpool(tmp_path, "w0", segment_bytes=4000)
    spool.load_all()
    try:
        for step in range(600):
            op = rng.random()
            if op < 0.45 or not model:
                rec = make(step, size=rng.randrange(100, 1500))
                await spool.store(rec)
                model[rec.queue_id] = rec
            elif op < 0.7:
                rec = model[rng.choice(sorted(model))]
                rec.attempts += 1
                await spool.update(rec)
            else:
                qid = rng.choice(sorted(model))
                await spool.remove(qid)
                del model[qid]
            if step % 97 == 0:
                await spool.aclose()
                spool = SegmentSpool(tmp_path, "w0", segment_bytes=4000)
                got = {r.queue_id: r for r in spool.load_all()}
                assert got == model
        for qid in list(model):
            await spool.remove(qid)
        model.clear()
    finally:
        await spool.aclose()
    spool = SegmentSpool(tmp_path, "w0", segment_bytes=4000)
    try:
        assert spool.load_all() == []
    finally:
        spool.close()
    assert files(tmp_path / "w0" / "active") == []  # nothing left to keep


async def test_second_instance_on_same_worker_is_refused(
    tmp_path: Path, shape: type[BaseSpool]
) -> None:
    spool = shape(tmp_path, "w0")
    try:
        with pytest.raises(SpoolLocked):
            shape(tmp_path, "w0")
    finally:
        await spool.aclose()
    shape(tmp_path, "w0").close()


# -- group commit ------------------------------------------------------------------------


async def test_group_commit_batches_and_fails_items_one_by_one() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker.spool.group import GroupCommit

    seen: list[list[int]] = []

    def flush(items: list[int]) -> list[object]:
        seen.append(items)
        return [ValueError(i) if i == 3 else i * 10 for i in items]

    with ThreadPoolExecutor(1) as pool:
        # A long delay: only a full batch may close it early.
        group: GroupCommit[int, object] = GroupCommit(flush, pool, max_delay=5.0, max_batch=4)
        t0 = time.monotonic()
        results = await asyncio.gather(*(group.submit(i) for i in range(4)), return_exceptions=True)
        assert time.monotonic() - t0 < 4.0  # well before max_delay
        assert seen == [[0, 1, 2, 3]]
        assert results[:3] == [0, 10, 20] and isinstance(results[3], ValueError)
        # Without a delay, what arrives during a flush forms the next batch.
        group = GroupCommit(flush, pool, max_batch=100)
        seen.clear()
        await asyncio.gather(*(group.submit(i) for i in (4, 5, 6)))
        assert seen == [[4, 5, 6]]


async def test_group_commit_lazy_items_wait_for_an_urgent_one() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker.spool.group import GroupCommit

    seen: list[list[str]] = []

    def flush(items: list[str]) -> list[object]:
        seen.append(items)
        return list(items)

    with ThreadPoolExecutor(1) as pool:
        group: GroupCommit[str, object] = GroupCommit(flush, pool, lazy_delay=30.0)
        removal = asyncio.ensure_future(group.submit("del", lazy=True))
        await asyncio.sleep(0.1)
        assert seen == [] and not removal.done()
        # An urgent item goes at once, and takes the waiting one along.
        t0 = time.monotonic()
        assert await group.submit("put") == "put"
        assert time.monotonic() - t0 < 10.0
        assert await removal == "del"
        assert seen == [["del", "put"]]
        # Alone, a lazy item goes once its delay has passed.
        group = GroupCommit(flush, pool, lazy_delay=0.05)
        seen.clear()
        assert await asyncio.wait_for(group.submit("x", lazy=True), 10.0) == "x"
        assert seen == [["x"]]
