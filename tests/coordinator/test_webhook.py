"""The compromise notification: a real HTTP receiver on loopback that fails, then takes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from coordinator.webhook import Notifier, shown

PAYLOAD = {"account": "jan@kowalski.pl", "reason": "compromise: 3 spam messages within 1h",
           "until": "2026-11-28T22:00:00Z", "ts": "2026-11-27T22:00:00Z"}


class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200), recording bodies."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.stall = 0.0
        self.bodies: list[Any] = []
        self.content_types: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        self.content_types.append(request.content_type)
        if self.stall:
            await asyncio.sleep(self.stall)
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    handler = Receiver()
    app = web.Application()
    app.router.add_post("/hook", handler.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield handler, f"http://127.0.0.1:{port}/hook?token=s3cret"
    await runner.cleanup()


async def test_retried_while_the_receiver_fails_then_delivered(
        receiver: tuple[Receiver, str]) -> None:
    handler, url = receiver
    handler.statuses = [503, 429]
    results: list[str] = []
    notifier = Notifier(results.append, delays=(0.01, 0.01, 0.01))
    task = notifier.notify(url, PAYLOAD)
    assert task is not None and await task
    assert handler.bodies == [PAYLOAD] * 3
    assert handler.content_types == ["application/json"] * 3
    assert results == ["retried", "retried", "delivered"]
    await notifier.close()


async def test_bounded_retries_and_no_retry_of_a_refusal(
        receiver: tuple[Receiver, str]) -> None:
    handler, url = receiver
    results: list[str] = []
    notifier = Notifier(results.append, delays=(0.01, 0.01))
    handler.statuses = [500] * 10
    task = notifier.notify(url, PAYLOAD)
    assert task is not None and not await task
    assert len(handler.bodies) == 3 and results == ["retried", "retried", "failed"]

    handler.bodies.clear()
    results.clear()
    handler.statuses = [400]          # the receiver will never take this one
    task = notifier.notify(url, PAYLOAD)
    assert task is not None and not await task
    assert len(handler.bodies) == 1 and results == ["failed"]
    await notifier.close()


async def test_no_receiver_and_a_slow_receiver_are_retried(
        receiver: tuple[Receiver, str]) -> None:
    handler, url = receiver
    results: list[str] = []
    notifier = Notifier(results.append, delays=(0.01,), timeout=0.2)
    handler.stall = 0.5
    task = notifier.notify(url, PAYLOAD)
    assert task is not None and not await task
    assert results == ["retried", "failed"] and len(handler.bodies) == 2

    results.clear()
    # Nothing listens there: the connection is refused.
    task = notifier.notify("http://127.0.0.1:9/hook", PAYLOAD)
    assert task is not None and not await task
    assert results == ["retried", "failed"]
    await notifier.close()


async def test_close_ends_a_notification_waiting_for_its_retry(
        receiver: tuple[Receiver, str]) -> None:
    handler, url = receiver
    handler.statuses = [503]
    results: list[str] = []
    notifier = Notifier(results.append, delays=(60.0,))
    task = notifier.notify(url, PAYLOAD)
    assert task is not None
    while not results:
        await asyncio.sleep(0.01)
    await notifier.close()
    assert task.cancelled() and results == ["retried", "failed"]


def test_the_log_never_shows_the_query_or_credentials() -> None:
    assert shown("https://user:pw@hooks.example.net:8443/sg?token=abc") == \
        "https://hooks.example.net:8443/sg"
    assert shown("http://[::1]:80/x") == "http://[::1]:80/x"
