"""What a worker notes for compromise detection, and how often it tells the coordinator."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

from gateway import COUNTRIES, TENANTS, UNKNOWN_IP
from geoipdb import country_db_bytes

from cluster.geoip import CountryDatabase
from cluster.names import client_key
from cluster.settings import parse_settings
from cluster.tenants import parse_tenants
from worker import evidence
from worker.client import Client
from worker.evidence import EvidenceNotes
from worker.snapshot import Snapshot

NOW = 1_700_000_000.0
GEOIP = CountryDatabase.from_bytes(country_db_bytes(COUNTRIES))


def snapshot(compromise: dict[str, Any] | None) -> Snapshot:
    data: dict[str, Any] = {"tenants": {"file": "t.toml"},
                            "geoip": {"database": "country.mmdb"}}
    if compromise is not None:
        data["compromise"] = compromise
    settings = parse_settings(Path("/etc/sendguard/sendguard.toml"), data)
    tenants = parse_tenants(Path("/etc/sendguard/t.toml"), tomllib.loads(TENANTS))
    return Snapshot(settings, tenants, GEOIP)


def client(snap: Snapshot, ip: str, sid: str = "s" * 22, trusted: bool = False) -> Client:
    found = Client(sid=sid, ip=ip, key=client_key(ip), trusted=trusted)
    found.account = snap.tenants.account("jan@kowalski.pl")
    return found


async def sent_within(sent: list[Any], seconds: float) -> None:
    """Wait (polling, however loaded the machine) until a batch went out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not sent:
        assert loop.time() < deadline, f"no batch sent within {seconds:g} s"
        await asyncio.sleep(evidence.BATCH_INTERVAL / 4)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


async def test_logins_once_per_country_per_sixtieth_of_the_window_in_one_batch() -> None:
    sent: list[list[list[Any]]] = []
    clock = Clock()
    notes = EvidenceNotes(sent.append, clock)
    snap = snapshot({"window": "1h"})
    notes.login(snap, client(snap, "127.0.0.5", "a" * 22))       # PL
    notes.login(snap, client(snap, "127.0.0.6"))                 # PL again: not sent
    notes.login(snap, client(snap, "127.0.0.42", "b" * 22))      # DE
    notes.login(snap, client(snap, UNKNOWN_IP))                  # no country: no evidence
    notes.login(snap, client(snap, "127.0.0.66", trusted=True))  # trusted network
    notes.spam(snap, client(snap, "127.0.0.5", "c" * 22), "Q1")
    assert sent == []                                            # nothing on the SMTP path
    await sent_within(sent, 10.0)                                # one batch, sent by itself
    assert sent == [[["login", "jan@kowalski.pl", "PL", "a" * 22, NOW],
                     ["login", "jan@kowalski.pl", "DE", "b" * 22, NOW],
                     ["spam", "jan@kowalski.pl", "Q1", "c" * 22, NOW]]]
    clock.now += 59
    notes.login(snap, client(snap, "127.0.0.5"))
    clock.now += 1                                               # 1h / 60 since the first
    notes.login(snap, client(snap, "127.0.0.5", "d" * 22))
    notes.flush()
    assert sent[1:] == [[["login", "jan@kowalski.pl", "PL", "d" * 22, NOW + 60]]]


async def test_nothing_is_noted_when_off_or_alone() -> None:
    sent: list[list[list[Any]]] = []
    for snap in (snapshot(None), snapshot({"countries": 0, "spam_messages": 0})):
        notes = EvidenceNotes(sent.append)
        notes.login(snap, client(snap, "127.0.0.42"))
        notes.spam(snap, client(snap, "127.0.0.42"), "Q1")
        notes.flush()
    alone = EvidenceNotes()  # a worker without a coordinator
    snap = snapshot({})
    alone.login(snap, client(snap, "127.0.0.42"))
    alone.spam(snap, client(snap, "127.0.0.42"), "Q1")
    alone.flush()
    assert sent == []
