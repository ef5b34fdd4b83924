"""Memory and CPU of a worker's recent-decision memory (``sendguard why``).

    .venv/bin/python -m loadtest.bench_recent --sessions 200000 --messages 1

Feeds :class:`worker.recent.RecentDecisions` the decisions of ordinary
sessions, as the engine makes them (AUTH, then per message MAIL, RCPT and
DATA with the fields the decision lines carry), and prints the bytes held
per decision (tracemalloc, after a full collection) and the CPU per
``add``. ``admin.recent_decisions`` times the bytes per decision is what a
worker holds at most.
"""

from __future__ import annotations

import argparse
import gc
import secrets
import time
import tracemalloc

from worker.recent import RecentDecisions

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(22))


def feed(memory: RecentDecisions, sessions: int, messages: int) -> tuple[int, float]:
    """Decisions as the engine makes them; returns how many were added, and the CPU
    seconds that took."""
    added = 0
    sids = [_id() for _ in range(sessions)]
    queue_ids = [_id() for _ in range(sessions * messages)]
    started = time.process_time()
    for n, sid in enumerate(sids):
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        account = f"user{n % 5000}@tenant{n % 700}.pl"
        memory.add(sid, ip, "PL", account, "AUTH", "auth", "accept",
                   "235 2.7.0 Authentication successful", None, {})
        added += 1
        for m in range(messages):
            memory.add(sid, ip, "PL", account, "MAIL", "mail", "accept", "250 2.1.0 Ok", None,
                       {"sender": account})
            memory.add(sid, ip, "PL", account, "RCPT", "rcpt", "accept", "250 2.1.5 Ok", None,
                       {"recipient": f"customer{m}@example.com"})
            queue_id = queue_ids[n * messages + m]
            memory.add(sid, ip, "PL", account, "DATA", "data", "accept",
                       f"250 2.0.0 Ok: queued as {queue_id}", None,
                       {"queue_id": queue_id, "score": 0.4, "symbols": [],
                        "backend": "builtin", "scan_action": None, "recipients": 1,
                        "size": 2048})
            added += 3
    return added, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--messages", type=int, default=1, help="messages per session")
    args = parser.parse_args()

    memory = RecentDecisions(10**9, 10**9)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    added, cpu = feed(memory, args.sessions, args.messages)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # CPU without tracemalloc's own cost, on a fresh memory that evicts as a full one does.
    quiet = RecentDecisions(added // 8 or 1, 10**9)
    quiet_added, quiet_cpu = feed(quiet, args.sessions // 4 or 1, args.messages)
    per_add = quiet_cpu / quiet_added
    print(f"{args.sessions} sessions of {args.messages} message(s): {added} decisions")
    print(f"held: {held / 2**20:.1f} MiB, {held / added:.0f} bytes per decision, "
          f"{held / (args.sessions * args.messages):.0f} bytes per message")
    print(f"cpu per add: {per_add * 1e6:.2f} us, evicting as it goes (the ids made up front; "
          f"under tracemalloc {cpu / added * 1e6:.2f} us)")
    print(f"1,000,000 decisions would hold {held / added * 1e6 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
