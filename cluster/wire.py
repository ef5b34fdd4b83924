"""Every message that crosses a process boundary, and how it is framed.

Encoding: msgpack of ``[TYPE, VERSION, field, field, ...]`` in the order the
dataclass declares its fields; the counter types of ``cluster.counting`` are
named tuples, packed as arrays. Plain data only: a peer's bytes are decoded into plain
data and every field is checked against the type the dataclass declares
for it, in one place (:func:`decode`), so a malformed frame raises
:class:`WireError` instead of running anything. The admin commands'
requests and replies are in :mod:`cluster.admin_wire`.

Sockets and frames (every path under ``cluster.runtime_dir``, a 0700 folder;
no process talks to another host):

- ``w-<name>.sock`` — a worker's ROUTER for counter traffic (ipc:// only).
  Every other member connects a DEALER whose routing id is its name and
  sends ``CounterRequest``, ``Replicate``, ``Handoff``, ``HandoffDone`` or
  ``ReplicateAck``; the ROUTER answers on the same identity with
  ``CounterReply`` and ``ReplicateAck``, and sends its own ``Replicate``s to
  a replica the same way, so everything an owner sends one replica travels
  in order on one connection.
- ``coord.sock`` — the coordinator's ROUTER. Workers send ``Hello``,
  ``SnapshotRequest``, ``Ready``, ``MetricsReport`` and ``Evidence`` (never
  answered); the supervisor sends
  ``SupervisorHello`` and ``ProcessEvent``; the admin CLI sends the
  requests of :mod:`cluster.admin_wire`. Answers: ``SnapshotMessage``,
  ``RingMessage``, the admin replies; the supervisor receives
  ``ScaleCommand`` and, after a ``leaving`` event, the ``RingMessage`` that
  no longer lists that worker. The coordinator also asks a worker for its
  part of some commands the other way round: a ``WorkerRequest`` of
  :mod:`cluster.admin_wire` (``inspect``, ``reset``, ``queue``, ``why``,
  ``adopt``) to the worker's DEALER, answered by its ``WorkerReply``.
  A worker's ``MetricsReport`` doubles as its heartbeat and says which
  snapshot version and ring epoch it holds, so a missed publication is
  sent again to it directly.
- ``events.sock`` — the coordinator's PUB. Two frames: a topic (``b"snap"``,
  ``b"ring"`` or ``b"conn"``) and a ``SnapshotMessage`` or ``SupportSnapshot``
  (only suspensions or country exceptions changed), ``RingMessage`` or
  ``ConnectionCounts``. Versions and epochs only grow: a subscriber that
  sees a gap asks for the snapshot again (the zguide "Clone" pattern); what
  is sent to one worker alone is always the full ``SnapshotMessage``.
  ``ConnectionCounts`` carries the open-connection tables the live workers
  put in their ``MetricsReport`` (``values["connections"]``), for the
  connection cap per client address (worker/connections.py).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

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
        # Plain data as it is: msgpack packs tuples (Op and Outcome are named
        # tuples) as arrays, so a large payload (a hand-off, a replication)
        # is not walked in Python first.
        return [getattr(self, item.name) for item in dataclasses.fields(self)]  # type: ignore[arg-type]


def encode(message: Message) -> bytes:
    return msgpack.packb([message.TYPE, PROTOCOL_VERSION, *message._fields_to_wire()],
                         use_bin_type=True)


def encode_counter_request(items: list[list[Any]]) -> bytes:
    """`encode(CounterRequest(items))` for items already in wire form (ops are tuples)."""
    return msgpack.packb([CounterRequest.TYPE, PROTOCOL_VERSION, items], use_bin_type=True)


def encode_counter_reply(items: list[list[Any]], replication: Any = None) -> bytes:
    return msgpack.packb([CounterReply.TYPE, PROTOCOL_VERSION, items, replication],
                         use_bin_type=True)


def decode(frame: bytes) -> Message:
    return message(unpack(frame))


def unpack(frame: bytes) -> list[Any]:
    """A frame as plain data, ``[TYPE, VERSION, ...]`` checked; `message()` builds the type."""
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"not msgpack: {exc}") from None
    if not isinstance(data, list) or len(data) < 2:
        raise WireError("not a [TYPE, VERSION, ...] list")
    if data[1] != PROTOCOL_VERSION:
        raise WireError(f"{data[0]!r}: protocol version {data[1]!r}, expected {PROTOCOL_VERSION}")
    return data


def message(data: list[Any]) -> Message:
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

class Status(enum.StrEnum):
    """How an owner answered one counter request."""

    OK = "ok"
    MOVED = "moved"    # not the key's owner in the answering node's epoch: nothing counted
    RETRY = "retry"    # the owner is taking hand-offs for a new epoch: nothing counted
    ERROR = "error"    # the request cannot be applied (e.g. a negative amount); `detail` says why


# Positions in a request item: [rid, epoch, kind, arg, ops, extra].
#   check, add, mark: arg "", extra None
#   reserve:  arg = reservation id; extra = None or a list of [lease id, units
#             wanted, op positions] to borrow (see worker.counters.leases)
#   release:  arg = reservation id; ops name the keys (for ownership), extra None
#   return:   arg = lease id; ops = the lease's ops; extra = [unused units per op]
#   renew:    arg ""; ops = the ops of the shapes renewed (amount 0); extra = a list of
#             [lease id, units wanted, op positions, old lease id, unused units per
#             position]: the old lease returned (none for an old lease id "") and the
#             next one lent, in one step at the owner; each shape lent or not on its own
#   reset, inspect: ops [], extra = [key, ...]
R_RID, R_EPOCH, R_KIND, R_ARG, R_OPS, R_EXTRA = range(6)
# Positions in a reply item: [rid, status, epoch, value, detail, grant].
#   value: an Outcome's wire form (check, reserve, add), a bool (release,
#   return), the number of keys that had state (reset), {key: rows} (inspect)
#   grant: None, or one [units, expires, [count per op]] per lease asked for
#   (reserve, renew), in the order asked
A_RID, A_STATUS, A_EPOCH, A_VALUE, A_DETAIL, A_GRANT = range(6)


@dataclass(frozen=True, slots=True)
class CounterRequest(Message):
    """Every request one node has for one owner in one event-loop iteration.

    Items are plain lists (layout above), read by position: the counter
    path decodes a frame once and builds no object per request. ``rid``
    makes a retry idempotent."""

    TYPE: ClassVar[str] = "counter"
    items: list[list[Any]]


@dataclass(frozen=True, slots=True)
class CounterReply(Message):
    """The answers to one ``CounterRequest`` frame (or part of it), in any order.

    ``replication``: when the requester is the replica of keys the answers
    changed, their state (``CounterShard.export``), which it applies before
    it uses the answers: one round trip instead of a request and a push."""

    TYPE: ClassVar[str] = "counter-reply"
    items: list[list[Any]]
    replication: Any = None


@dataclass(frozen=True, slots=True)
class Replicate(Message):
    """The owner's state of some keys (``CounterShard.export``). ``exact``: sent
    on the owner's one ordered path to this replica, so it replaces the copy;
    otherwise it is merged (larger bucket wins)."""

    TYPE: ClassVar[str] = "replicate"
    rid: str
    epoch: int
    data: Any
    exact: bool = False


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
    # The version whose configuration, tenants and GeoIP this one carries: ``version``
    # itself, or an earlier one when only ``support`` changed since (see SupportSnapshot).
    base: int = 0


@dataclass(frozen=True, slots=True)
class SupportSnapshot(Message):
    """Version ``version`` when only suspensions and country exceptions changed since
    version ``base``: the whole support state, without the configuration, tenant
    directory and GeoIP database (megabytes) it applies to. A worker whose snapshot
    was not built from ``base`` ignores it and is sent the full snapshot again."""

    TYPE: ClassVar[str] = "support-snapshot"
    version: int
    base: int
    support: dict[str, Any]


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


# -- where the sockets are ---------------------------------------------------------

def coordinator_endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    return f"ipc://{runtime_dir}/coord.sock"


def events_endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    return f"ipc://{runtime_dir}/events.sock"


def worker_endpoint(runtime_dir: str | os.PathLike[str], name: str) -> str:
    """A worker's counter ROUTER."""
    return f"ipc://{runtime_dir}/w-{name}.sock"
