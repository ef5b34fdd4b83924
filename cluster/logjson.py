"""One JSON object per line: every decision, with its session id.

The fields SPEC §5 names (ts, level, sid, event, client_ip, account, stage,
policy, verdict, reply) come first; anything else the caller adds follows.
Logging is set up in the process that logs (after fork), never before.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

_FIELDS = ("sid", "event", "client_ip", "account", "stage", "policy", "verdict", "reply")
_logger = logging.getLogger("sendguard")


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
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
        if self.process_name:
            line["process"] = self.process_name
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return one_line(line)


def one_line(fields: dict[str, Any]) -> str:
    """``fields`` as one line of JSON whatever a client sent.

    Newlines and control characters are escaped by JSON itself. A client's
    bytes that are not UTF-8 reach us as lone surrogates (aiosmtpd decodes
    with ``surrogateescape``), which no UTF-8 log file can hold: such a line
    is written with every non-ASCII character escaped (``\\udc80``) instead
    of failing in the handler with a multi-line report.
    """
    text = json.dumps(fields, ensure_ascii=False, default=str)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(fields, ensure_ascii=True, default=str)
    return text


def setup_logging(file: Path | None, process: str = "", level: int = logging.INFO) -> None:
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and a deprecation WARNING on every
    # successful AUTH; our decision lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def log_event(event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if not _logger.isEnabledFor(level):
        return
    fields = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    _logger.log(level, event, extra={"fields": fields})
