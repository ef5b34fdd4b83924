"""A hold (``sendguard queue hold``) is part of the spool record, so it survives a restart."""

from __future__ import annotations

from pathlib import Path

from worker.spool import Spool, SpoolRecord, decode, encode


def record() -> SpoolRecord:
    return SpoolRecord.new(session_id="s" * 22, client_ip="203.0.113.7",
                           account="jan@kowalski.pl", helo="pc", mail_from="jan@kowalski.pl",
                           rcpt_tos=["a@example.org"], message=b"Subject: x\r\n\r\nhi\r\n")


def test_held_round_trips_and_older_frames_read_as_not_held() -> None:
    plain = record()
    assert b"held" not in encode(plain)  # written only when set: older readers ignore it
    assert decode(encode(plain)).held is False
    plain.held = True
    assert decode(encode(plain)).held is True


async def test_a_held_record_is_held_after_a_restart(tmp_path: Path) -> None:
    held, free = record(), record()
    held.held = True
    async with Spool(tmp_path, "w0") as spool:
        await spool.store(held)
        await spool.store(free)
        free.held = True
        await spool.update(free)
        free.held = False
        await spool.update(free)
    async with Spool(tmp_path, "w0") as spool:
        states = {r.queue_id: r.held for r in spool.load_all()}
    assert states == {held.queue_id: True, free.queue_id: False}
