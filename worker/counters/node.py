"""A worker's place in the counter ring: serve the keys it owns, ask owners for the rest.

One `CounterNode` per worker process, created inside its running event loop.
It binds a ROUTER that peers send `CounterRequest`, `Replicate`, `Handoff`,
`HandoffDone` and `InspectRequest` to, and keeps one DEALER per peer for its
own requests, with replies matched by rid (frames: ``cluster.wire``).

Correctness rests on four rules (ARCHITECTURE, "Counters and the ring"):

- Only the owner of a key in the owner's current epoch counts it; anyone
  else answers "moved", and nothing is counted before the ownership check,
  which runs in the same synchronous step as the shard call.
- Before answering a state change the owner hands the changed keys to their
  replica and waits for the ack (bounded), so the replica, which the ring
  makes the next owner, already holds the counts when the owner dies.
- On a new epoch each node sends what it held to the keys' new owner and
  replica, then `HandoffDone`; a node answers "retry" for keys it newly
  owns until every surviving member said Done (or a timeout passed).
- Retries never count twice: the owner keeps recent replies by request rid,
  the shard's reserve is idempotent, and a client that must start a
  reservation again after "moved" releases the partial one and uses a new
  reservation id on the owners.

A reply that does not come within `request_timeout` raises
`CounterUnavailable`: the engine tempfails, which can only under-admit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import count

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from cluster import wire
from cluster.counting import Op, Outcome
from cluster.ring import Ring
from worker.counters.client import RESERVATION_TTL, CounterClient, CounterUnavailable
from worker.counters.shard import CounterShard

log = logging.getLogger(__name__)

OK, MOVED, RETRY, ERROR = "ok", "moved", "retry", "error"
_CHANGES = frozenset({"reserve", "confirm", "release", "add", "mark"})
# Owner-side memory of answered request rids: enough for every request that
# can still be resent within a request timeout at a few thousand per second.
_REPLY_CACHE = 16384
_HANDOFF_CHUNK = 1000
_BACKOFF = (0.002, 0.05)


@dataclass(frozen=True)
class CurveKeys:
    """This node's CURVE key pair and every member's public key (z85 or raw).

    The same pair serves as server key on the ROUTER and client key on the
    DEALERs, so only ring members can connect."""

    secret_key: bytes
    public_key: bytes
    server_public_keys: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Held:
    """A reservation this node made for its engine: what to confirm, where."""

    shard_rid: str
    ops: tuple[Op, ...]
    outcome: Outcome
    expires: float


class _Call:
    """One engine call: its deadline, and whether it crossed a socket."""

    __slots__ = ("deadline", "remote", "started")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.remote = False
        self.started = time.perf_counter()
