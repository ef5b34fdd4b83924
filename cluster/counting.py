"""Counter operations: the contract between a policy and a key's owner.

A decision is a list of `Op`s answered by one `Outcome`. Both travel between
workers (msgpack over ZeroMQ), so `to_wire()` yields only lists, str, int,
float, bool and None, and `from_wire()` checks what it is given: a malformed
frame from a peer must fail loudly, not count against the wrong key.

Wire layouts:
    Op      [key, series, window, max, amount, at]
    Outcome [ok, [count, ...], denied]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Op:
    """One counter touched by a decision.

    `key` names the subject ("ip:127.0.0.5", "acct:jan@kowalski.pl"), `series`
    a named count within it ("msg", "acc", "bad", "fail") and `window` the
    trailing window in seconds; one (key, series, window) is one counter.
    `max` is the limit (None: count or read only), `amount` what the decision
    adds (0 for a pure read). `at` is used by `mark()` only: the time whose
    bucket receives the amount, e.g. the acceptance time of a message.
    """

    key: str
    series: str
    window: float
    max: int | None
    amount: int = 1
    at: float | None = None

    def __post_init__(self) -> None:
        # A zero, negative or NaN window would make the bucket width
        # meaningless; refuse it where the op is built, not deep in a shard.
        if not (self.window > 0 and math.isfinite(self.window)):
            raise ValueError(f"Op window must be a positive number of seconds, got {self.window!r}")

    def to_wire(self) -> list[Any]:
        return [self.key, self.series, float(self.window), self.max, self.amount, self.at]

    @classmethod
    def from_wire(cls, data: Any) -> Op:
        if not isinstance(data, (list, tuple)) or len(data) != 6:
            raise ValueError(f"Op wire form must be a 6-item list, got {data!r}")
        key, series, window, limit, amount, at = data
        if not isinstance(key, str) or not isinstance(series, str):
            raise ValueError(f"Op key and series must be strings, got {data!r}")
        if not _is_number(window):
            raise ValueError(f"Op window must be a number, got {window!r}")
        if limit is not None and not _is_int(limit):
            raise ValueError(f"Op max must be an integer or None, got {limit!r}")
        if not _is_int(amount):
            raise ValueError(f"Op amount must be an integer, got {amount!r}")
        if at is not None and not _is_number(at):
            raise ValueError(f"Op at must be a number or None, got {at!r}")
        return cls(key, series, float(window), limit, amount, None if at is None else float(at))


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one decision.

    `ok` is true when every op with a `max` fits (count + amount <= max),
    `counts` holds each op's count before this decision, and `denied` the
    index of the first op that did not fit.
    """

    ok: bool
    counts: tuple[int, ...]
    denied: int | None

    def to_wire(self) -> list[Any]:
        return [self.ok, list(self.counts), self.denied]

    @classmethod
    def from_wire(cls, data: Any) -> Outcome:
        if not isinstance(data, (list, tuple)) or len(data) != 3:
            raise ValueError(f"Outcome wire form must be a 3-item list, got {data!r}")
        ok, counts, denied = data
        if not isinstance(ok, (bool, int)):
            raise ValueError(f"Outcome ok must be a boolean, got {ok!r}")
        if not isinstance(counts, (list, tuple)) or not all(_is_int(c) for c in counts):
            raise ValueError(f"Outcome counts must be a list of integers, got {counts!r}")
        if denied is not None and not (_is_int(denied) and 0 <= denied < len(counts)):
            raise ValueError(f"Outcome denied must be an op index or None, got {denied!r}")
        return cls(bool(ok), tuple(counts), denied)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
