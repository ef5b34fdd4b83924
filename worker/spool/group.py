"""Group commit: many waiters, one durable flush.

Callers ``submit`` an item and wait; a single runner task takes the pending
items as one batch and runs ``flush(items)`` in an executor thread, so the
event loop never blocks on the disk. Only one flush is in flight at a time:
items that arrive during a flush form the next batch. Under load that alone
makes batches grow to match the device's latency; ``max_delay`` lets a batch
wait a little for company when the oldest item is younger than that, and
``max_batch`` closes it early.

An item submitted ``lazy`` is one nobody waits on to answer a client (a
removal after delivery): while only such items are pending, the batch waits
up to ``lazy_delay`` for an urgent item to ride with, so that a removal
rarely costs an fdatasync of its own.

``flush`` returns one result per item, in order; a result that is an
exception is raised in that item's waiter only. ``apply(items, results)``,
if given, runs on the event loop after each flush and before any waiter
wakes: while it runs no flush is in flight, and it runs even for items whose
waiter was cancelled, so in-memory state can track the disk exactly. An item's waiter is woken
only after a flush that *started after the item was submitted* returns, which
is the property durability depends on: a directory fsync covers the renames
that finished before it began, not those that race with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Sequence[R | BaseException]],
        executor: Executor,
        *,
        max_delay: float = 0.0,
        max_batch: int = 256,
        lazy_delay: float = 0.0,
        apply: Callable[[list[T], Sequence[R | BaseException]], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self._apply = apply
        self._executor = executor
        self._max_delay = max_delay
        self._max_batch = max_batch
        self._lazy_delay = lazy_delay
        # (item, its waiter, when submitted, lazy)
        self._pending: list[tuple[T, asyncio.Future[R], float, bool]] = []
        self._urgent = 0  # pending items that are not lazy
        self._runner: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._due = asyncio.Event()  # an urgent item, or a full batch
        self.batches = 0  # flushes run, for tests and the benchmark
        self.items = 0

    @property
    def busy(self) -> bool:
        return bool(self._pending) or (self._runner is not None and not self._runner.done())

    async def submit(self, item: T, *, lazy: bool = False) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut, time.monotonic(), lazy))
        if not lazy:
            self._urgent += 1
            self._due.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        elif len(self._pending) >= self._max_batch:
            self._full.set()
            self._due.set()
        return await fut

    async def drain(self) -> None:
        """Wait until everything submitted so far has been flushed."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)

    async def _run(self) -> None:
        try:
            await self._loop()
        except BaseException:
            # Cancelled with the loop: nobody may wait forever for a flush
            # that will not come.
            for _, fut, _, _ in self._pending:
                fut.cancel()
            self._pending.clear()
            self._urgent = 0
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if not self._urgent and self._lazy_delay > 0 and \
                    len(self._pending) < self._max_batch:
                wait = self._pending[0][2] + self._lazy_delay - time.monotonic()
                if wait > 0:
                    self._due.clear()
                    try:
                        async with asyncio.timeout(wait):
                            await self._due.wait()
                    except TimeoutError:
                        pass
            if self._max_delay > 0 and len(self._pending) < self._max_batch:
                # Measured from the oldest item, so a backlog that built up
                # during the previous flush goes out at once.
                wait = self._pending[0][2] + self._max_delay - time.monotonic()
                if wait > 0:
                    self._full.clear()
                    try:
                        async with asyncio.timeout(wait):
                            await self._full.wait()
                    except TimeoutError:
                        pass
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._urgent -= sum(1 for _, _, _, lazy in batch if not lazy)
            self.batches += 1
            self.items += len(batch)
            items = [item for item, _, _, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._flush, items)
                if self._apply is not None:
                    self._apply(items, results)
            except BaseException as exc:
                for _, fut, _, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                    raise
                continue
            for (_, fut, _, _), result in zip(batch, results, strict=True):
                if fut.done():  # the waiter was cancelled; the work is done anyway
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
