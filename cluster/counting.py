"""Counter operations: the contract between a policy and a key's owner.

A decision is a list of `Op`s answered by one `Outcome`. Both travel between
workers (msgpack over ZeroMQ). They are named tuples on purpose: msgpack
packs a tuple as an array with no conversion, and an op read from a frame
is used by position (``op[0]`` is ``op.key``) without building an object,
which matters on the counter path where every message crosses it. What
comes from a peer is checked by `check_wire_op` / `Outcome.from_wire`: a
malformed frame must fail loudly, not count against the wrong key.

Wire layouts:
    Op      [key, series, window, max, amount, at]
    Outcome [ok, [count, ...], denied]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

# Positions in an op, for code that reads ops straight from a frame.
KEY, SERIES, WINDOW, MAX, AMOUNT, AT = range(6)


class _OpFields(NamedTuple):
    key: str
    series: str
    window: float
    max: int | None
    amount: int = 1
    at: float | None = None


class Op(_OpFields):
    """One counter touched by a decision.

    `key` names the subject ("ip:127.0.0.5", "acct:jan@kowalski.pl"), `series`
    a named count within it ("msg", "acc", "bad", "fail") and `window` the
    trailing window in seconds; one (key, series, window) is one counter.
    `max` is the limit (None: count or read only), `amount` what the decision
    adds (0 for a pure read; the number of recipients for a limit that counts
    them). `at` is used by `mark()` only: the time whose bucket receives the
    amount, e.g. the acceptance time of a message.
    """

    __slots__ = ()

    def __new__(cls, key: str, series: str, window: float, max: int | None,  # noqa: A002
                amount: int = 1, at: float | None = None) -> Op:
        # A zero, negative or NaN window would make the bucket width
        # meaningless; refuse it where the op is built, not deep in a shard.
        if not (window > 0 and math.isfinite(window)):
            raise ValueError(f"Op window must be a positive number of seconds, got {window!r}")
        return super().__new__(cls, key, series, window, max, amount, at)

    def to_wire(self) -> list[Any]:
        return [self.key, self.series, float(self.window), self.max, self.amount, self.at]

    @classmethod
    def from_wire(cls, data: Any) -> Op:
        check_wire_op(data)
        key, series, window, limit, amount, at = data
        return cls(key, series, float(window), limit, amount, None if at is None else float(at))


def check_wire_ops(ops: Any) -> None:
    """Raise ValueError unless `ops` is a list of ops' wire forms. Fast for
    the usual well-formed case (one pass of exact type checks), and as
    thorough as `check_wire_op` otherwise."""
    if type(ops) is not list:
        raise ValueError(f"ops must be a list, got {ops!r}")
    for op in ops:
        if not (type(op) is list and len(op) == 6 and type(op[0]) is str
                and type(op[1]) is str and type(op[2]) in _NUMBER and 0 < op[2] < math.inf
                and (op[3] is None or type(op[3]) is int) and type(op[4]) is int
                and (op[5] is None or type(op[5]) in _NUMBER)):
            check_wire_op(op)


_NUMBER = (int, float)


def check_wire_op(data: Any) -> None:
    """Raise ValueError unless `data` is an op's wire form (a list or tuple)."""
    if not isinstance(data, (list, tuple)) or len(data) != 6:
        raise ValueError(f"Op wire form must be a 6-item list, got {data!r}")
    key, series, window, limit, amount, at = data
    if not isinstance(key, str) or not isinstance(series, str):
        raise ValueError(f"Op key and series must be strings, got {data!r}")
    if not _is_number(window) or not (window > 0 and math.isfinite(window)):
        raise ValueError(f"Op window must be a positive number, got {window!r}")
    if limit is not None and not _is_int(limit):
        raise ValueError(f"Op max must be an integer or None, got {limit!r}")
    if not _is_int(amount):
        raise ValueError(f"Op amount must be an integer, got {amount!r}")
    if at is not None and not _is_number(at):
        raise ValueError(f"Op at must be a number or None, got {at!r}")


class Outcome(NamedTuple):
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


def judge(ops: Sequence[Sequence[Any]], counts: Sequence[int]) -> Outcome:
    """The Outcome of `ops` given each op's count before the decision.

    Two ops on one counter in one decision must fit together, as in a shard."""
    denied: int | None = None
    pending: dict[tuple[Any, Any, Any], int] = {}
    for i, op in enumerate(ops):
        ident = (op[KEY], op[SERIES], op[WINDOW])
        added = pending.get(ident, 0) + op[AMOUNT]
        pending[ident] = added
        limit = op[MAX]
        if limit is not None and counts[i] + added > limit:
            denied = i
            break
    return Outcome(denied is None, tuple(counts), denied)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
