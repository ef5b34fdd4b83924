"""CPU and memory of compromise detection's evidence, on a worker and in the coordinator.

    .venv/bin/python -m loadtest.bench_evidence --logins 200000 --accounts 20000

A worker notes each successful AUTH (:mod:`worker.evidence`): most are
repeats of an account and country already sent in the last 1/60 of the
window and cost only a dictionary lookup; the others go out in batches,
one ``Evidence`` message per batch interval. The coordinator decodes the
batches and applies each note to its book (:mod:`coordinator.evidence`).
Prints the worker's CPU per login noted, the encoding per batch, the
coordinator's CPU per note (decode included) and the memory it holds per
watched account. The ZeroMQ send of a batch is not included (one
non-blocking send per batch, not per login).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cluster import wire
from cluster.names import client_key
from cluster.settings import CompromiseSettings, parse_settings
from cluster.tenants import Account, TenantDirectory
from coordinator.evidence import EvidenceBook
from worker.client import Client
from worker.evidence import EvidenceNotes
from worker.snapshot import Snapshot

COUNTRIES = ("PL", "DE", "CZ", "GB", "US", "FR")


def _snapshot() -> Snapshot:
    settings = parse_settings(Path("/etc/sendguard/sendguard.toml"),
                              {"tenants": {"file": "t.toml"}, "geoip": {"database": "x.mmdb"},
                               "compromise": {"window": "1h"}})
    return Snapshot(settings, TenantDirectory({}, {}), None)


def _clients(accounts: int, logins: int) -> list[Client]:
    clients = []
    for n in range(logins):
        user = f"user{n % accounts}@tenant{n % accounts % 700}.pl"
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        client = Client(sid=f"{n:022d}", ip=ip, key=client_key(ip), trusted=False)
        client.account = Account(user=user, domain=user.partition("@")[2], password="",
                                 alternate_sender=None, limits=None)
        # Most accounts log in from home; one in 50 logins comes from somewhere else.
        client.country = COUNTRIES[n % len(COUNTRIES)] if n % 50 == 0 else "PL"
        clients.append(client)
    return clients


async def worker_side(clients: list[Client], seconds_per_login: float) -> tuple[float, int,
                                                                                list[bytes]]:
    """CPU per login noted, notes sent, and the encoded batches."""
    frames: list[bytes] = []
    clock = [1_700_000_000.0]
    notes = EvidenceNotes(lambda batch: frames.append(wire.encode(wire.Evidence("w0", batch))),
                          clock=lambda: clock[0])
    snapshot = _snapshot()
    started = time.process_time()
    for n, client in enumerate(clients):
        clock[0] += seconds_per_login
        notes.login(snapshot, client)
        if n % 500 == 499:
            notes.flush()  # a batch interval's worth, as the event loop would send it
    notes.flush()
    cpu = time.process_time() - started
    sent = 0
    for frame in frames:
        message: Any = wire.decode(frame)
        sent += len(message.notes)
    return cpu / len(clients), sent, frames


def coordinator_side(frames: list[bytes], settings: CompromiseSettings) -> tuple[float, int,
                                                                                int]:
    """CPU per note (decode included), bytes held, accounts watched."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = EvidenceBook()
    notes = 0
    started = time.process_time()
    for frame in frames:
        message: Any = wire.decode(frame)
        for note in message.notes:
            book.note(settings, note, note[4])
            notes += 1
    cpu = time.process_time() - started
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # Again without tracemalloc's own cost.
    quiet = EvidenceBook()
    started = time.process_time()
    for frame in frames:
        message = wire.decode(frame)
        for note in message.notes:
            quiet.note(settings, note, note[4])
    cpu = time.process_time() - started
    return cpu / max(1, notes), held, len(book)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=500.0, help="logins per second")
    args = parser.parse_args()

    clients = _clients(args.accounts, args.logins)
    per_login, sent, frames = asyncio.run(worker_side(clients, 1.0 / args.rate))
    settings = _snapshot().settings.compromise
    assert settings is not None
    per_note, held, watched = coordinator_side(frames, settings)
    size = sum(len(frame) for frame in frames)
    print(f"{args.logins} logins of {args.accounts} accounts at {args.rate:g}/s "
          f"({args.logins / args.rate:.0f} s of traffic), window 1h")
    print(f"worker: {per_login * 1e6:.2f} us CPU per login noted; {sent} notes sent "
          f"({sent / args.logins:.1%} of logins) in {len(frames)} messages, "
          f"{size / max(1, sent):.0f} bytes per note")
    print(f"coordinator: {per_note * 1e6:.2f} us CPU per note (decode included), "
          f"{watched} accounts watched, {held / max(1, watched):.0f} bytes per account")


if __name__ == "__main__":
    main()
