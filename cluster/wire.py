"""Every message that crosses a process boundary, and how it is framed.

Encoding: msgpack of ``[TYPE, VERSION, field, field, ...]`` in the order the
dataclass declares its fields; nested counter types use their own
``to_wire()`` forms (``cluster.counting``). Plain data only: a peer's bytes are
decoded into plain data and every field is checked against the type the
dataclass declares for it, in one place (:func:`decode`), so a malformed
frame raises :class:`WireError` instead of running anything. The admin
commands' requests and replies are in :mod:`cluster.admin_wire`.

Sockets and frames (every path under ``cluster.runtime_dir``, a 0700 folder;
no process talks to another host):

- ``w-<name>.sock`` — a worker's ROUTER for counter traffic. Peers connect a
  DEALER and send one frame: ``CounterRequest``, ``Replicate``, ``Handoff``,
  ``HandoffDone``, ``InspectRequest`` or ``ResetRequest``; the ROUTER answers
  on the same identity with ``CounterReply``, ``ReplicateAck``,
  ``InspectReply`` or ``ResetReply``.
- ``coord.sock`` — the coordinator's ROUTER. Workers send ``Hello``,
  ``SnapshotRequest``, ``Ready``, ``MetricsReport`` and ``Evidence`` (never
  answered); the supervisor sends
  ``SupervisorHello`` and ``ProcessEvent``; the admin CLI sends
  ``AdminRequest``. Answers: ``SnapshotMessage``, ``RingMessage``,
  ``AdminReply``; the supervisor receives ``ScaleCommand`` and, after a
  ``leaving`` event, the ``RingMessage`` that no longer lists that worker.
  The coordinator also asks a worker for counter rows the other way round:
  ``AdminRequest("inspect", {"rid", "keys"})`` to the worker's DEALER,
  answered by ``AdminReply(data={"rid", "rows": {key: [row, ...]}})``.
  A worker's ``MetricsReport`` doubles as its heartbeat and says which
  snapshot version and ring epoch it holds, so a missed publication is
  sent again to it directly.
- ``events.sock`` — the coordinator's PUB. Two frames: a topic (``b"snap"``,
  ``b"ring"`` or ``b"conn"``) and a ``SnapshotMessage``, ``RingMessage`` or
  ``ConnectionCounts``. Versions and epochs only grow: a subscriber that
  sees a gap asks for the snapshot again (the zguide "Clone" pattern).
  ``ConnectionCounts`` carries the open-connection tables the live workers
  put in their ``MetricsReport`` (``values["connections"]``), for the
  connection cap per client address (worker/connections.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from cluster.counting import Op, Outcome

PROTOCOL_VERSION = 1

TOPIC_SNAPSHOT = b"snap"
TOPIC_RING = b"ring"
TOPIC_CONNECTIONS = b"conn"


class WireError(ValueError):
    """A frame that is not a message of this protocol."""


_TYPES: dict[str, type[Message]] = {}


class Message:
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _TYPES[cls.TYPE] = cls

    def _fields_to_wire(self) -> list[Any]:
        values = []
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            values.append(_to_wire(value))
        return values


def _to_wire(value: Any) -> Any:
    if isinstance(value, (Op, Outcome)):
        return value.to_wire()
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def encode(message: Message) -> bytes:
    return msgpack.packb([message.TYPE, PROTOCOL_VERSION, *message._fields_to_wire()],
                         use_bin_type=True)


def decode(frame: bytes) -> Message:
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"not msgpack: {exc}") from None
    if not isinstance(data, list) or len(data) < 2:
        raise WireError("not a [TYPE, VERSION, ...] list")
    kind, version, *values = data
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown message type {kind!r}")
    if version != PROTOCOL_VERSION:
        raise WireError(f"{kind}: protocol version {version!r}, expected {PROTOCOL_VERSION}")
    readers = _READERS.get(cls) or _readers_of(cls)
    if len(values) != len(readers):
        raise WireError(f"{kind}: {len(values)} fields, expected {len(readers)}")
    try:
        return cls(**{name: read(value) for (name, read), value
                      in zip(readers, values, strict=True)})
    except (TypeError, ValueError) as exc:
        raise WireError(f"{kind}: {exc}") from None


# -- field types, checked on decode ---------------------------------------------------
#
# Each message type's fields are read by functions made once from its type hints:
# a value of the wrong type raises ValueError (a WireError for the caller), a list
# declared as a tuple becomes one, and a type with ``from_wire`` (``cluster.counting``)
# builds itself. A field type with no reader here is refused when the message type
# is first decoded, so a new message cannot slip through unchecked.

Reader = Callable[[Any], Any]
_READERS: dict[type[Message], tuple[tuple[str, Reader], ...]] = {}


def _readers_of(cls: type[Message]) -> tuple[tuple[str, Reader], ...]:
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    readers = tuple((item.name, _reader(hints[item.name], item.name))
                    for item in dataclasses.fields(cls))  # type: ignore[arg-type]
    _READERS[cls] = readers
    return readers


def _same(value: Any) -> Any:
    return value


def _instance(kind: type | tuple[type, ...], name: str, what: str) -> Reader:
    def read(value: Any) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise ValueError(f"{name} must be {what}, got {_short(value)}")
        return value
    return read


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SCALARS: dict[Any, tuple[type | tuple[type, ...], str]] = {
    str: (str, "a string"),
    bytes: (bytes, "bytes"),
    bool: (bool, "a boolean"),
    int: (int, "an integer"),
    float: ((float, int), "a number"),
}


def _reader(hint: Any, name: str) -> Reader:
    if hint is Any:
        return _same
    if hint in _SCALARS:
        kind, what = _SCALARS[hint]
        check = _instance(kind, name, what)
        return (lambda value: float(check(value))) if hint is float else check
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{name}: no wire form for {hint!r}")
        read = _reader(inner[0], name)
        return lambda value: None if value is None else read(value)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"{name}: no wire form for {hint!r} (use tuple[X, ...])")
        item = _reader(args[0], f"{name}[]")
        as_list = _instance(list, name, "a list")
        if origin is tuple:
            return lambda value: tuple(item(v) for v in as_list(value))
        if item is _same:
            return as_list
        return lambda value: [item(v) for v in as_list(value)]
    if origin is dict:
        key, val = _reader(args[0], f"{name} key"), _reader(args[1], f"{name} value")
        as_map = _instance(dict, name, "a map")

        def read_map(value: Any) -> Any:
            for k, v in as_map(value).items():
                key(k)
                val(v)
            return value
        return read_map
    from_wire = getattr(hint, "from_wire", None)
    if isinstance(hint, type) and callable(from_wire):
        return typing.cast(Reader, from_wire)
    raise TypeError(f"{name}: no wire form for {hint!r}")


# -- counter traffic between workers -------------------------------------------

COUNTER_KINDS = ("check", "reserve", "confirm", "release", "add", "mark")


@dataclass(frozen=True, slots=True)
class CounterRequest(Message):
    """One decision's ops for one owner. ``rid`` makes a retry idempotent."""

    TYPE: ClassVar[str] = "counter"
    rid: str
    epoch: int
    kind: str
    reservation: str
    ops: tuple[Op, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in COUNTER_KINDS:
            raise ValueError(f"kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class CounterReply(Message):
    """``status``: ok | moved (not the owner in this epoch) | retry (hand-off under way)
    | error (the request cannot be applied, e.g. a negative amount; ``detail`` says why)."""

    TYPE: ClassVar[str] = "counter-reply"
    rid: str
    status: str
    epoch: int
    outcome: Outcome | None = None
    result: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Replicate(Message):
    """The owner's state of some keys (``CounterShard.export``), applied by max-merge."""

    TYPE: ClassVar[str] = "replicate"
    rid: str
    epoch: int
    data: Any


@dataclass(frozen=True, slots=True)
class ReplicateAck(Message):
    TYPE: ClassVar[str] = "replicate-ack"
    rid: str


@dataclass(frozen=True, slots=True)
class Handoff(Message):
    """Keys whose owner or replica changed in ``epoch``, sent by a holder to the new one."""

    TYPE: ClassVar[str] = "handoff"
    epoch: int
    sender: str
    data: Any


@dataclass(frozen=True, slots=True)
class HandoffDone(Message):
    """The sender has sent every hand-off it owes for ``epoch``."""

    TYPE: ClassVar[str] = "handoff-done"
    epoch: int
    sender: str


@dataclass(frozen=True, slots=True)
class InspectRequest(Message):
    TYPE: ClassVar[str] = "inspect"
    rid: str
    key: str


@dataclass(frozen=True, slots=True)
class InspectReply(Message):
    TYPE: ClassVar[str] = "inspect-reply"
    rid: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ResetRequest(Message):
    """Forget every count of ``keys`` (``sendguard counters reset``). To the keys' owner,
    which applies it and sends it on to each key's replica with ``replica`` set. ``rid``
    names one owner's part of one reset: a repeat is answered without resetting again."""

    TYPE: ClassVar[str] = "reset"
    rid: str
    epoch: int
    keys: list[str]
    replica: bool = False


@dataclass(frozen=True, slots=True)
class ResetReply(Message):
    """``status`` as ``CounterReply``'s; ``cleared``: counters that held something."""

    TYPE: ClassVar[str] = "reset-reply"
    rid: str
    status: str
    epoch: int
    cleared: int = 0


# -- workers, supervisor and admin with the coordinator ---------------------------

@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    name: str
    pid: int
    endpoint: str


@dataclass(frozen=True, slots=True)
class SnapshotRequest(Message):
    TYPE: ClassVar[str] = "snapshot-request"
    name: str


@dataclass(frozen=True, slots=True)
class SnapshotMessage(Message):
    """Configuration, tenant directory and GeoIP database, as the coordinator validated them."""

    TYPE: ClassVar[str] = "snapshot"
    version: int
    config_path: str
    config: dict[str, Any]
    tenants: dict[str, Any]
    tenants_version: str
    geoip: bytes | None
    geoip_version: str
    # Suspensions and country exceptions (``cluster.support_state.SupportState.to_wire``).
    support: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """The worker is up to date and may join the ring."""

    TYPE: ClassVar[str] = "ready"
    name: str


@dataclass(frozen=True, slots=True)
class RingMessage(Message):
    """Ring membership: ``members`` is a list of ``[name, endpoint]`` pairs."""

    TYPE: ClassVar[str] = "ring"
    epoch: int
    members: list[list[str]]


@dataclass(frozen=True, slots=True)
class MetricsReport(Message):
    """A worker's counters since it started (the coordinator sums them)."""

    TYPE: ClassVar[str] = "metrics"
    name: str
    pid: int
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ConnectionCounts(Message):
    """Per live worker name, ``{client key: open connections}`` of its reported keys."""

    TYPE: ClassVar[str] = "connections"
    tables: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class Evidence(Message):
    """What a worker saw that may mean a stolen password (SPEC §3.10), sent without waiting
    for an answer. ``notes``: ``[kind, account, detail, sid, at]`` lists, where ``kind`` is
    ``login`` (``detail``: the client's country) or ``spam`` (``detail``: the queue id)."""

    TYPE: ClassVar[str] = "evidence"
    name: str
    notes: list[list[Any]]


@dataclass(frozen=True, slots=True)
class SupervisorHello(Message):
    TYPE: ClassVar[str] = "supervisor-hello"
    pid: int
    workers: int


@dataclass(frozen=True, slots=True)
class ProcessEvent(Message):
    """From the supervisor: ``event`` is started | exited | leaving. From the
    coordinator to the supervisor: ``silent`` (a member stopped reporting; kill it)."""

    TYPE: ClassVar[str] = "process-event"
    name: str
    event: str
    pid: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ScaleCommand(Message):
    TYPE: ClassVar[str] = "scale"
    workers: int


@dataclass(frozen=True, slots=True)
class AdminRequest(Message):
    """``command``: status | scale | allow-country | disallow-country | inspect | queue |
    why | suspend | unsuspend | reset | history (``coordinator.service``)."""

    TYPE: ClassVar[str] = "admin"
    command: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AdminReply(Message):
    TYPE: ClassVar[str] = "admin-reply"
    ok: bool
    data: dict[str, Any]
    error: str = ""


# -- where the sockets are ---------------------------------------------------------

def coordinator_endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    return f"ipc://{runtime_dir}/coord.sock"


def events_endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    return f"ipc://{runtime_dir}/events.sock"


def worker_endpoint(runtime_dir: str | os.PathLike[str], name: str) -> str:
    """A worker's counter ROUTER."""
    return f"ipc://{runtime_dir}/w-{name}.sock"
