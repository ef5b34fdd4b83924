"""One JSON object per line: every decision, with its session id.

The fields SPEC §5 names (ts, level, sid, event, client_ip, account, stage,
policy, verdict, reply) come first; anything else the caller adds follows,
then the process name. Logging is set up in the process that logs (after
fork), never before.

``log_event`` is on the path of every message (several lines each), so it
does not go through the stdlib ``logging`` machinery (a ``LogRecord``, the
handler lock, a formatter and a write per line cost about 25 µs a line
here): the line is built directly, encoded with orjson, and kept in a
buffer that is written with one ``write`` at the next turn of the event
loop, so one loop iteration's lines cost one system call. Outside an event
loop (a thread, start-up, shutdown) a line is written at once. Lines still
buffered are written by :func:`flush_log`, which the processes call when
they stop, and at interpreter exit; a process killed outright loses at most
the lines of its last loop iteration.

Records of the stdlib ``logging`` module (warnings and errors of the
libraries, asyncio's "exception never retrieved") go to the same place in
the same shape, through a handler on the root logger. Before
:func:`setup_logging` (and after :func:`close_log`) ``log_event`` hands its
lines to the ``sendguard`` stdlib logger as it always has, so a process or a
test that never sets up logging keeps the usual behaviour.

A line is one line whatever a client sent: orjson escapes control
characters, and a string it refuses (a lone surrogate, which is how a
client's invalid UTF-8 arrives here) sends that line through the stdlib
encoder with every non-ASCII character escaped.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson

_FIELDS = ("sid", "event", "client_ip", "account", "stage", "policy", "verdict", "reply")
_AFTER_EVENT = _FIELDS[2:]
_logger = logging.getLogger("sendguard")
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}
_ASCII = json.JSONEncoder(ensure_ascii=True, default=str, separators=(",", ":"))
_STDERR = 2  # the process's, whatever object sys.stderr is at the moment


def _level_name(level: int) -> str:
    return _LEVELS.get(level) or logging.getLevelName(level).lower()


class _Clock:
    """``2026-11-27T21:58:02.114Z`` for a time; the part up to the second is cached."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # one attribute: threads read a consistent pair

    def format(self, now: float) -> str:
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}.{int((now - second) * 1000):03d}Z"


def encode(line: dict[str, Any]) -> bytes:
    """One JSON line, newline included."""
    try:
        return orjson.dumps(line, default=str,
                            option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return _ASCII.encode(line).encode("ascii") + b"\n"


class _Sink:
    """Where a process's lines go: a file opened for appending, or stderr."""

    def __init__(self, file: Path | None, process: str, level: int) -> None:
        if file is None:
            self.fd, self.owned = _STDERR, False
        else:
            file.parent.mkdir(parents=True, exist_ok=True)
            # The mode logging.FileHandler gave the file: 0666 less the umask.
            self.fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o666)
            self.owned = True
        self.process = process
        self.level = level
        self.clock = _Clock()
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def write(self, data: bytes) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(data)
            if loop is not None and self._scheduled is loop:
                return  # this loop iteration's flush is already due
            if loop is None or self._scheduled is not None:
                # No loop, or another loop's flush is pending: keep the order, write now.
                self._write_pending()
                return
            self._scheduled = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = None
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            pass  # a full disk or a closed stderr must not take the process down

    def close(self) -> None:
        self.flush()
        if self.owned:
            os.close(self.fd)


_sink: _Sink | None = None


def _event_line(sink: _Sink, event: str, level: int, fields: dict[str, Any]) -> dict[str, Any]:
    line = {"ts": sink.clock.format(time.time()), "level": _level_name(level)}
    sid = fields.get("sid")
    if sid is not None:
        line["sid"] = sid
    line["event"] = event
    for name in _AFTER_EVENT:
        value = fields.get(name)
        if value is not None:
            line[name] = value
    for name, value in fields.items():
        if value is not None and name not in line:
            line[name] = value
    if sink.process:
        line["process"] = sink.process
    return line


def log_event(event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    sink = _sink
    if sink is None:
        if _logger.isEnabledFor(level):
            fields = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
            _logger.log(level, event, extra={"fields": fields})
        return
    if level >= sink.level:
        sink.write(encode(_event_line(sink, event, level, fields)))


def flush_log() -> None:
    """Write every buffered line now (before a process stops)."""
    if _sink is not None:
        _sink.flush()


def close_log() -> None:
    """Flush and close the log; ``log_event`` goes back to the stdlib logger."""
    global _sink
    sink, _sink = _sink, None
    if sink is not None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, _RecordHandler):
                root.removeHandler(handler)
        sink.close()


def _record_line(record: logging.LogRecord, process: str, clock: _Clock,
                 format_exception: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"ts": clock.format(record.created),
                            "level": record.levelname.lower()}
    fields = getattr(record, "fields", None)
    if fields:
        for name in _FIELDS:
            if name in fields:
                line[name] = fields[name]
        for name, value in fields.items():
            if name not in line:
                line[name] = value
    else:
        line["event"] = "message"
        line["logger"] = record.name
        line["message"] = record.getMessage()
    if process:
        line["process"] = process
    if record.exc_info:
        line["error"] = format_exception(record.exc_info)
    return line


class JsonFormatter(logging.Formatter):
    """The same line for a stdlib ``logging`` record (libraries, or a handler of one's own)."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process_name = process
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line = _record_line(record, self.process_name, self._clock, self.formatException)
        return encode(line)[:-1].decode("utf-8")


class _RecordHandler(logging.Handler):
    """Stdlib records into the sink, in order with the lines of ``log_event``."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self.sink = sink
        self._tracebacks = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = _record_line(record, self.sink.process, self.sink.clock,
                                self._tracebacks.formatException)
            self.sink.write(encode(line))
        except Exception:
            self.handleError(record)


def open_log(file: Path | None, process: str = "", level: int = logging.INFO) -> None:
    """Send ``log_event`` lines to ``file`` (appending), or to stderr when None.

    Only sendguard's own lines; :func:`setup_logging` adds the libraries' records.
    """
    global _sink
    close_log()
    _sink = _Sink(file, process, level)


def setup_logging(file: Path | None, process: str = "", level: int = logging.INFO) -> None:
    """This process's log: every line to ``file`` (appending), or to stderr when None."""
    global _sink
    close_log()
    sink = _Sink(file, process, level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_RecordHandler(sink))
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and a deprecation WARNING on every
    # successful AUTH; our decision lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    _sink = sink


atexit.register(flush_log)
