"""A worker's memory of its recent decisions, for ``sendguard why SID``.

The log may go to stderr or to a file support cannot read, so each worker
also keeps its last decisions in memory, bounded by count
(``admin.recent_decisions``) and age (``admin.recent_decisions_for``), and
answers the coordinator's ``why`` requests from it.

Memory is what matters here, not speed (one ``add`` per decision costs a
msgpack encoding of a few fields, ~2 µs). Each session is one ``bytearray``
holding msgpack values back to back: a header ``[first_ts, client_ip,
country]``, then one ``[ts, account, stage, policy, verdict, reply, detail,
extra]`` per decision. Python objects per decision (a dict, a float, a tuple)
would cost about four times as much. Sessions leave in the order they
started: the oldest goes when the count is over the bound or its first
decision is older than the age bound. ``loadtest/bench_recent.py`` measures
the bytes per decision.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from cluster.support_state import iso_utc

_FIELDS = ("account", "stage", "policy", "verdict", "reply", "detail")


class RecentDecisions:
    def __init__(self, max_decisions: int, max_age: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_decisions = max_decisions
        self.max_age = max_age
        self._clock = clock
        self._sessions: dict[str, bytearray] = {}
        self._order: deque[str] = deque()
        self._count = 0
        self._oldest = 0.0  # first decision of the session at the front of _order
        self._packer = msgpack.Packer(use_bin_type=True)

    def __len__(self) -> int:
        return self._count

    def add(self, sid: str, client_ip: str, country: str | None, account: str | None,
            stage: str, policy: str | None, verdict: str, reply: str | None,
            detail: str | None, extra: Mapping[str, Any] | None = None) -> None:
        if self.max_decisions <= 0:
            return
        now = self._clock()
        pack = self._packer.pack
        blob = self._sessions.get(sid)
        if blob is None:
            blob = self._sessions[sid] = bytearray(pack([now, client_ip, country]))
            if not self._order:
                self._oldest = now
            self._order.append(sid)
        try:
            blob += pack([now, account, stage, policy, verdict, reply, detail, extra or None])
        except (TypeError, ValueError):
            # A field msgpack cannot carry: keep the decision, without its extras.
            blob += pack([now, account, stage, policy, verdict, reply, detail, None])
        self._count += 1
        self._evict(now)

    def session(self, sid: str) -> list[dict[str, Any]]:
        """The session's decisions, oldest first, as JSON-ready dicts (times in ISO 8601)."""
        blob = self._sessions.get(sid)
        if blob is None:
            return []
        items = msgpack.Unpacker(raw=False, strict_map_key=False)
        items.feed(bytes(blob))
        _, client_ip, country = next(items)
        out = []
        for ts, *values, extra in items:
            decision: dict[str, Any] = {"ts": iso_utc(ts), "sid": sid, "client_ip": client_ip,
                                        "country": country}
            decision.update(zip(_FIELDS, values, strict=True))
            for name, value in (extra or {}).items():
                decision.setdefault(name, value)
            out.append(decision)
        return out

    def _evict(self, now: float) -> None:
        horizon = now - self.max_age
        while self._order and (self._count > self.max_decisions or self._oldest < horizon):
            blob = self._sessions.pop(self._order.popleft())
            items = msgpack.Unpacker(raw=False, strict_map_key=False)
            items.feed(bytes(blob))
            self._count -= sum(1 for _ in items) - 1  # less the header
            if self._order:
                self._oldest = self._first_ts(self._order[0])

    def _first_ts(self, sid: str) -> float:
        # The header's first value is the time: read only that far.
        items = msgpack.Unpacker(raw=False)
        items.feed(bytes(self._sessions[sid][:16]))
        items.read_array_header()
        return float(items.unpack())
