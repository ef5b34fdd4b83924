"""``python -m cluster.demo_sink --fd N --dir DIR``: the demo's next hop, a catch-all sink.

``sendguard demo`` binds the smarthost address of the example and hands the
socket over (so a port in use is reported before anything starts). Every
message the gateway delivers is accepted and written to ``DIR`` as one
``.eml`` file: a ``Return-Path:`` and one ``Delivered-To:`` per recipient,
as a local delivery agent adds them, then the message exactly as received
(CRLF line ends), so a newcomer can open it in any mail client.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from cluster.lifeline import die_with_parent
from cluster.quietstart import stop_signals_end_quietly


class MailFolder:
    """Writes each accepted message as ``DIR/YYYYmmdd-HHMMSS-N.eml``, atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._serial = itertools.count(1)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        head = [f"Return-Path: <{envelope.mail_from}>"]
        head += [f"Delivered-To: {rcpt}" for rcpt in envelope.rcpt_tos]
        data = ("\r\n".join(head) + "\r\n").encode("utf-8", "surrogateescape")
        data += envelope.original_content
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(self._serial)}.eml"
        await asyncio.to_thread(self._write, name, data)
        return "250 2.0.0 Ok: written to " + name

    def _write(self, name: str, data: bytes) -> None:
        temp = self.folder / f".{name}.tmp"
        temp.write_bytes(data)
        os.replace(temp, self.folder / name)


async def serve(sock: socket.socket, folder: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    keeper = MailFolder(folder)
    server = await loop.create_server(
        lambda: SMTP(keeper, hostname="sink.demo.invalid", enable_SMTPUTF8=True,
                     data_size_limit=None, loop=loop), sock=sock)
    async with server:
        await stop.wait()


def main() -> int:
    stop_signals_end_quietly()  # started by spawn_quietly
    parser = argparse.ArgumentParser(prog="python -m cluster.demo_sink")
    parser.add_argument("--fd", type=int, required=True, help="a listening socket")
    parser.add_argument("--dir", required=True, help="where the .eml files go")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args()
    if args.parent_pid:
        die_with_parent(args.parent_pid, signal.SIGTERM)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(fileno=args.fd)
    asyncio.run(serve(sock, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
