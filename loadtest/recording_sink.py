"""The next hop of a load test: an aiosmtpd sink that remembers what it was given.

It accepts every message (no AUTH, no TLS, PIPELINING offered: what a
relay's next hop or a smarthost looks like on loopback) and records the ``X-Load-Token`` of each,
so a scenario can compare what arrived with what the gateway acknowledged.
Two ways to run it: in a thread of a process that does not import Locust
(:class:`SinkThread`, the accuracy scenario), or as a process of its own that
only counts into shared memory (:func:`start_counting_sink`, the benchmark,
where the sink must not steal the measuring process's time).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
import threading
from collections import Counter
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from aiosmtpd.smtp import SMTP

_TOKEN = re.compile(rb"^X-Load-Token:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)
_HEAD_SCAN = 64 * 1024


class Recorder:
    """Tokens received (a message delivered twice counts twice) and a plain count."""

    def __init__(self, shared: Synchronized | None = None,  # type: ignore[type-arg]
                 sessions: Synchronized | None = None) -> None:  # type: ignore[type-arg]
        self.tokens: Counter[str] = Counter()
        self.messages = 0
        self._shared = shared
        self._sessions = sessions
        self._lock = threading.Lock()

    def session_opened(self) -> None:
        if self._sessions is not None:
            with self._sessions.get_lock():
                self._sessions.value += 1

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        # Next hops in the wild (Postfix, the big providers) offer PIPELINING, and
        # aiosmtpd takes pipelined commands; it just does not say so.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        match = _TOKEN.search(content[:_HEAD_SCAN]) if isinstance(content, bytes) else None
        with self._lock:
            self.messages += 1
            if match is not None:
                self.tokens[match.group(1).decode("ascii", "replace")] += 1
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value += 1
        return "250 2.0.0 Ok: received"

    def snapshot(self) -> tuple[int, Counter[str]]:
        with self._lock:
            return self.messages, Counter(self.tokens)


async def _serve(recorder: Recorder, port: int, started: threading.Event | Any,
                 stop: asyncio.Event | None = None) -> None:
    from worker import smtp_speedups

    # The same per-connection saving the gateway has: the sink must not be the bottleneck.
    smtp_speedups.install()
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        recorder.session_opened()
        return SMTP(recorder, hostname="sink.loadtest.invalid", loop=loop,
                    enable_SMTPUTF8=True, data_size_limit=0)

    server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024,
                                      reuse_address=True)
    started.set()
    async with server:
        if stop is None:
            await server.serve_forever()
        else:
            await stop.wait()


class SinkThread:
    """A recording sink on 127.0.0.1:``port`` in a thread of this process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.recorder = Recorder()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)

    def start(self) -> SinkThread:
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError(f"the sink did not start on port {self.port}")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(self.recorder, self.port, self._started, self._stop)

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _counting_main(port: int, shared: Synchronized, sessions: Synchronized,  # type: ignore[type-arg]
                   started: Any) -> None:
    import uvloop

    uvloop.run(_serve(Recorder(shared, sessions), port, started))


@dataclass
class CountingSink:
    """A sink process and what it counts in shared memory."""

    process: multiprocessing.process.BaseProcess
    messages: Synchronized  # type: ignore[type-arg]
    sessions: Synchronized  # type: ignore[type-arg]

    def kill(self) -> None:
        self.process.kill()


def start_counting_sink(port: int) -> CountingSink:
    """A sink process that counts the messages and the SMTP sessions it received."""
    context = multiprocessing.get_context("spawn")
    shared = context.Value("q", 0)
    sessions = context.Value("q", 0)
    started = context.Event()
    process = context.Process(target=_counting_main, args=(port, shared, sessions, started),
                              name=f"sink-{port}", daemon=True)
    process.start()
    if not started.wait(30):
        process.kill()
        raise TimeoutError(f"the sink did not start on port {port}")
    return CountingSink(process, shared, sessions)
