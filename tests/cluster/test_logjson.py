"""The JSON log: one line per event, its fields, batching per loop turn, flushes, libraries."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import logjson
from cluster.logjson import close_log, flush_log, log_event, open_log, setup_logging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs" / "sendguard.log"  # the folder is created on open
    open_log(path, "w7")
    try:
        yield path
    finally:
        close_log()


def lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    data.decode("utf-8")  # strict: the file is valid UTF-8
    return [json.loads(line) for line in data.split(b"\n") if line]


def test_fields_in_spec_order_then_the_rest_then_the_process(log_file: Path) -> None:
    log_event("decision", logging.WARNING, detail="acct:a 1h 3/3", reply="550 x", sid="S1",
              verdict="reject", policy="rate_limit", stage="MAIL", account="a@b.pl",
              client_ip="192.0.2.1", queue_id=None)
    flush_log()
    [line] = lines(log_file)
    assert list(line) == ["ts", "level", "sid", "event", "client_ip", "account", "stage",
                          "policy", "verdict", "reply", "detail", "process"]
    assert line["level"] == "warning" and line["event"] == "decision"
    assert line["process"] == "w7" and line["detail"] == "acct:a 1h 3/3"
    assert len(line["ts"]) == 24 and line["ts"].endswith("Z") and line["ts"][19] == "."


def test_levels_below_the_threshold_are_dropped(log_file: Path) -> None:
    log_event("noise", logging.DEBUG, sid="S1")
    log_event("kept", sid="S1")
    flush_log()
    assert [line["event"] for line in lines(log_file)] == ["kept"]


@pytest.mark.parametrize("value", [
    "line\nbreak\r\nand\x00nul",
    b"\xff\xfeinvalid utf-8 \xc3".decode("utf-8", "surrogateescape"),
    "lone \ud800 surrogate",
    "zażółć gęślą jaźń",
    2**70,
])
def test_one_valid_line_whatever_a_client_sent(log_file: Path, value: Any) -> None:
    log_event("decision", sid="S1", helo=value, reply=f"550 <{value}>")
    log_event("after", sid="S1")
    flush_log()
    first, second = lines(log_file)
    assert first["helo"] == value and first["reply"] == f"550 <{value}>"
    assert second["event"] == "after"


def test_objects_are_written_as_text(log_file: Path) -> None:
    log_event("spool", path=Path("/var/spool/x"), networks={"10.0.0.0/8"})
    flush_log()
    [line] = lines(log_file)
    assert line["path"] == "/var/spool/x" and line["networks"] == "{'10.0.0.0/8'}"


def test_one_loop_turn_is_one_write_after_the_turn(log_file: Path) -> None:
    async def main() -> tuple[int, int]:
        for number in range(50):
            log_event("decision", sid=f"S{number}")
        before = len(lines(log_file)) if log_file.exists() else 0
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before, len(lines(log_file))

    before, after = asyncio.run(main())
    assert (before, after) == (0, 50)
    assert [line["sid"] for line in lines(log_file)] == [f"S{n}" for n in range(50)]


def test_lines_of_a_loop_that_stopped_are_flushed(log_file: Path) -> None:
    async def main() -> None:
        log_event("last_words", sid="S1")  # the loop ends before the flush it scheduled

    asyncio.run(main())
    flush_log()
    assert [line["event"] for line in lines(log_file)] == ["last_words"]


def test_lines_outside_a_loop_are_written_at_once_and_in_order(log_file: Path) -> None:
    log_event("first")
    assert [line["event"] for line in lines(log_file)] == ["first"]

    def thread() -> None:
        for number in range(20):
            log_event("from_thread", n=number)

    workers = [threading.Thread(target=thread) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    written = lines(log_file)
    assert len(written) == 81
    for name in ("from_thread",):
        assert sorted(line["n"] for line in written if line["event"] == name) == sorted(
            list(range(20)) * 4)


def test_library_records_reach_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "sendguard.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(path, "w3")
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logging.getLogger("some.library").error("it failed: %s", "badly", exc_info=True)
        logging.getLogger("mail.log").info("every command")  # aiosmtpd's chatter stays out
        log_event("ours", sid="S1")
        flush_log()
        first, second = lines(path)
        assert first["event"] == "message" and first["level"] == "error"
        assert first["logger"] == "some.library" and first["message"] == "it failed: badly"
        assert "ValueError: boom\nsecond line" in first["error"]
        assert first["process"] == "w3"
        assert second["event"] == "ours"
    finally:
        close_log()
        root.handlers[:], root.level = saved
        logging.getLogger("mail.log").setLevel(logging.NOTSET)


def test_without_a_file_lines_go_to_stderr() -> None:
    program = ("import asyncio, logging\n"
               "from cluster.logjson import setup_logging, log_event\n"
               "setup_logging(None, 'supervisor')\n"
               "async def main():\n"
               "    log_event('inside_the_loop', sid='S2')\n"
               "log_event('started', sid='S1')\n"
               "asyncio.run(main())\n"
               "logging.getLogger('x').warning('a library warning')\n")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          timeout=60, check=True)
    assert done.stdout == b""
    written = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in written] == ["started", "inside_the_loop", "message"]
    assert all(line["process"] == "supervisor" for line in written)


def test_before_setup_lines_go_to_the_stdlib_logger(caplog: pytest.LogCaptureFixture) -> None:
    assert logjson._sink is None
    with caplog.at_level(logging.INFO, logger="sendguard"):
        log_event("unconfigured", sid="S9", account=None)
    [record] = caplog.records
    assert record.fields == {"event": "unconfigured", "sid": "S9"}  # type: ignore[attr-defined]
