"""The end of DATA cannot be half done (SPEC §2, §4).

A client that hangs up while its message is being stored leaves a message
that is stored *and* queued for delivery; an internal error while storing
answers 451 and counts nothing. The spool is the real one, made slow or
broken by a subclass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway import PASSWORD, Gateway, Raw, message_from, plain_auth, running_gateway

from worker.spool import Spool, SpoolRecord


class SlowSpool(Spool):
    async def store(self, record: SpoolRecord) -> None:
        await asyncio.sleep(0.5)  # a slow disk
        await super().store(record)


class BrokenSpool(Spool):
    async def store(self, record: SpoolRecord) -> None:
        raise RuntimeError("an unforeseen bug in the spool")


@pytest.fixture
def gateway(short_tmp: Path, dns: Any) -> Iterator[Gateway]:
    with running_gateway(short_tmp, dns, server={"require_tls_for_auth": False},
                         limits=[{"window": "1m", "max": 2}]) as gw:
        yield gw


def use_spool_class(gateway: Gateway, cls: type) -> None:
    spool = gateway.parts.engine.spool
    gateway.call(setattr, spool, "__class__", cls)


def start_message(gateway: Gateway) -> Raw:
    client = Raw(gateway)
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain_auth("jan@kowalski.pl", PASSWORD))[:3] == "235"
    assert client.command("MAIL FROM:<jan@kowalski.pl>")[:3] == "250"
    assert client.command("RCPT TO:<someone@example.org>")[:3] == "250"
    assert client.command("DATA")[:3] == "354"
    return client


def test_a_client_leaving_during_the_store_still_gets_its_message_queued(
        gateway: Gateway) -> None:
    use_spool_class(gateway, SlowSpool)
    client = start_message(gateway)
    client.send(message_from("jan@kowalski.pl") + b".\r\n")
    client.close()  # before the reply
    deadline = time.monotonic() + 30
    while True:
        lines = [d for d in gateway.log_lines() if d.get("sid") == client.sid
                 and d.get("stage") == "DATA"]
        if lines:
            break
        assert time.monotonic() < deadline, "no decision for the message"
        time.sleep(0.05)
    [line] = lines
    assert line["verdict"] == "accept", line
    assert line["detail"] == "queued; the client left before the reply"
    queued = gateway.call(gateway.parts.delivery.list_queue)
    assert line["queue_id"] in [entry["queue_id"] for entry in queued]


def test_an_internal_error_at_the_end_of_data_counts_nothing(gateway: Gateway) -> None:
    use_spool_class(gateway, BrokenSpool)
    for _ in range(3):  # more than the limit of 2: none of them counts
        client = start_message(gateway)
        client.send(message_from("jan@kowalski.pl") + b".\r\n")
        assert client.reply() == f"451 4.3.0 {client.sid} temporary failure, try later"
        client.command("QUIT")
        client.close()
    line = [d for d in gateway.log_lines() if d.get("policy") == "internal"][-1]
    assert line["stage"] == "DATA" and "an unforeseen bug in the spool" in line["detail"]
    use_spool_class(gateway, Spool)
    smtp = gateway.login()
    assert [gateway.send(smtp)[0] for _ in range(3)] == [250, 250, 550]
    smtp.quit()
