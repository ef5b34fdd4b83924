"""CPU of reading one DATA: sendguard's reader against aiosmtpd 1.4.6's line loop.

``python -m loadtest.bench_data_reader`` prints microseconds per message for
both, on a StreamReader with aiosmtpd's 1001-byte limit holding the whole
message, for two shapes of content: prose whose every fifth line ends a
sentence with a base64 attachment after it, and the worst case for
sendguard's reader, prose whose every line ends with a period (each
``.<CR><LF>`` is a candidate end it must look at). CPU time of this
process, so compare the two columns of one run, not runs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Awaitable, Callable

from worker.smtp_data import read_data, unstuff

Reader = Callable[[asyncio.StreamReader], Awaitable[bytes]]
SIZES = ((1024, 3000), (50_000, 300), (2_000_000, 10))


def mixed(size: int) -> bytes:
    text = (b"An ordinary line of a message about the invoice we discussed last\r\n"
            b"week and the one before it, with a few more words on it, and so on\r\n") * 2
    text += b"That is all for now.\r\n"
    body = text * max(1, size // 2 // len(text))
    blob = base64.encodebytes(os.urandom(size // 2)).replace(b"\n", b"\r\n")
    return b"From: a@b\r\nSubject: x\r\n\r\n" + body + blob


def sentences(size: int) -> bytes:
    line = b"An ordinary line of a message about the invoice we discussed last week.\r\n"
    return b"From: a@b\r\nSubject: x\r\n\r\n" + line * max(1, size // len(line))


async def aiosmtpd_loop(reader: asyncio.StreamReader) -> bytes:
    """The reading part of aiosmtpd 1.4.6's smtp_DATA (its path for a good message)."""
    data: list[bytearray] = []
    fragments: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            line = await reader.read(exc.consumed)
        if not fragments and line == b".\r\n":
            break
        fragments.append(line)
        if line.endswith(b"\r\n"):
            data.append(bytearray(b"".join(fragments)))
            fragments.clear()
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return b"".join(data)


async def sendguard_reader(reader: asyncio.StreamReader) -> bytes:
    return unstuff(await read_data(reader, None))


async def per_message(read: Reader, payload: bytes, rounds: int) -> float:
    started = time.process_time()
    for _ in range(rounds):
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(payload)
        await read(reader)
    return (time.process_time() - started) / rounds * 1e6


async def main() -> None:
    for shape in (mixed, sentences):
        for size, rounds in SIZES:
            payload = shape(size) + b".\r\n"
            ours = await per_message(sendguard_reader, payload, rounds)
            theirs = await per_message(aiosmtpd_loop, payload, rounds)
            print(f"{shape.__name__:>9} {size:>9} B: aiosmtpd {theirs:9.1f} us, "
                  f"sendguard {ours:9.1f} us, ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
