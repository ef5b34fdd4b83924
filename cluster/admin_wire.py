"""The admin commands as requests and replies: one pair of messages per command.

The CLI sends a request to the coordinator's ``coord.sock`` and gets its
reply (or :class:`AdminFailed`) back on the same identity; the HTTP API and
the support console hand the same request objects to the coordinator in
its own process. Framing, encoding and the field checks on decode are
:mod:`cluster.wire`'s. Validation of what the fields mean (is this an
account of the tenant directory, a duration, a queue id) stays with the
coordinator, which answers a bad one with :class:`AdminFailed`.

A reply's :meth:`AdminReplyMessage.to_json` is what ``--json`` prints and
the HTTP API answers: the fields in :attr:`~AdminReplyMessage.OPTIONAL`
appear only when set, and :attr:`~AdminReplyMessage.PRIVATE` ones never.

The coordinator asks workers for their part of ``inspect``, ``reset``,
``queue``, ``why`` and spool adoption with the :class:`WorkerRequest`s at
the end of this module, on the worker's DEALER; the worker answers each
with its :class:`WorkerReply` (or :class:`WorkerFailed`), which carries the
request's ``rid`` and the worker's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from cluster.wire import Message

# What kind of failure an AdminFailed is: the HTTP API answers it with this status.
BAD_REQUEST = 400
NOT_FOUND = 404
UNAVAILABLE = 503


class AdminRequestMessage(Message):
    """A request of one admin command; ``COMMAND`` is its name in logs and errors."""

    COMMAND: ClassVar[str] = ""


class AdminReplyMessage(Message):
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    PRIVATE: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """The reply as ``--json`` prints it and the HTTP API answers it."""
        out = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if item.name in self.PRIVATE or (item.name in self.OPTIONAL and value is None):
                continue
            out[item.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, slots=True)
class AdminFailed(Message):
    """Any command's refusal: one sentence for the person who asked, and its kind."""

    TYPE: ClassVar[str] = "admin-failed"
    error: str
    status: int = BAD_REQUEST


# -- the cluster -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StatusRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-status"
    COMMAND: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class StatusReply(AdminReplyMessage):
    """``workers``: one map per worker (name, pid, state, phase, member, snapshot_version,
    ring_epoch, sessions_open, accepted, last_report_s)."""

    TYPE: ClassVar[str] = "admin-status-reply"
    supervisor_pid: int
    coordinator_pid: int
    workers_target: int
    ring_epoch: int
    ring: list[str]
    config_version: int
    config_file: str
    tenants_version: str
    tenants: int
    accounts: int
    geoip_version: str
    workers: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ScaleRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-scale"
    COMMAND: ClassVar[str] = "scale"
    workers: int


@dataclass(frozen=True, slots=True)
class ScaleReply(AdminReplyMessage):
    TYPE: ClassVar[str] = "admin-scale-reply"
    workers: int
    previous: int


# -- counters ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class InspectSubjectRequest(AdminRequestMessage):
    """``kind``: ip | account."""

    TYPE: ClassVar[str] = "admin-inspect"
    COMMAND: ClassVar[str] = "inspect"
    kind: str
    subject: str


@dataclass(frozen=True, slots=True)
class InspectSubjectReply(AdminReplyMessage):
    """``rows``: key, series, window, count, limit, clears_at. An address also has
    ``auth_failures`` and ``bounce``; an account its ``suspension`` (None: none) and,
    while compromise detection watches it, ``compromise``."""

    TYPE: ClassVar[str] = "admin-inspect-reply"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"auth_failures", "bounce", "compromise"})
    PRIVATE: ClassVar[frozenset[str]] = frozenset({"kind"})
    kind: str
    keys: list[str]
    worker: str
    rows: list[dict[str, Any]]
    auth_failures: dict[str, Any] | None = None
    bounce: dict[str, Any] | None = None
    suspension: dict[str, Any] | None = None
    compromise: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = AdminReplyMessage.to_json(self)
        if self.kind != "account":
            out.pop("suspension")
        return out


@dataclass(frozen=True, slots=True)
class ResetCountersRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-reset"
    COMMAND: ClassVar[str] = "reset"
    kind: str
    subject: str
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ResetCountersReply(AdminReplyMessage):
    TYPE: ClassVar[str] = "admin-reset-reply"
    keys: list[str]
    cleared: int
    owners: list[str]
    worker: str


# -- support -----------------------------------------------------------------------------
# ``reason``, ``lasting`` and ``country`` are str or None as the HTTP API received them;
# the coordinator says what is wrong with them.

@dataclass(frozen=True, slots=True)
class SuspendRequest(AdminRequestMessage):
    """``lasting``: a duration like "12h" after which the suspension lapses by itself."""

    TYPE: ClassVar[str] = "admin-suspend"
    COMMAND: ClassVar[str] = "suspend"
    account: str
    by: str
    reason: str | None = None
    lasting: str | None = None


@dataclass(frozen=True, slots=True)
class UnsuspendRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-unsuspend"
    COMMAND: ClassVar[str] = "unsuspend"
    account: str
    by: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SuspensionReply(AdminReplyMessage):
    """A suspension's ``reason``, ``by``, ``at`` and ``until`` are there when it stands."""

    TYPE: ClassVar[str] = "admin-suspension-reply"
    account: str
    suspended: bool
    changed: bool
    reason: str | None = None
    by: str | None = None
    at: str | None = None
    until: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = AdminReplyMessage.to_json(self)
        if not self.suspended:
            for name in ("reason", "by", "at", "until"):
                out.pop(name)
        return out


@dataclass(frozen=True, slots=True)
class AllowCountryRequest(AdminRequestMessage):
    """Without ``lasting`` the tenant file is edited; with it, an exception that lapses."""

    TYPE: ClassVar[str] = "admin-allow-country"
    COMMAND: ClassVar[str] = "allow-country"
    domain: str
    country: str | None
    by: str
    reason: str | None = None
    lasting: str | None = None


@dataclass(frozen=True, slots=True)
class DisallowCountryRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-disallow-country"
    COMMAND: ClassVar[str] = "disallow-country"
    domain: str
    country: str | None
    by: str
    reason: str | None = None
    lasting: str | None = None  # refused: an exception is only ever granted


@dataclass(frozen=True, slots=True)
class CountriesRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-countries"
    COMMAND: ClassVar[str] = "countries"
    domain: str


@dataclass(frozen=True, slots=True)
class CountriesReply(AdminReplyMessage):
    """A domain's countries for good and its running exceptions (country, until, reason,
    by, at); after a change also ``changed``, and ``granted`` (a new exception) or
    ``note`` (why nothing changed)."""

    TYPE: ClassVar[str] = "admin-countries-reply"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"changed", "granted", "note"})
    domain: str
    countries: list[str]
    exceptions: list[dict[str, Any]]
    tenants_version: str
    config_version: int
    changed: bool | None = None
    granted: dict[str, Any] | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-history"
    COMMAND: ClassVar[str] = "history"
    domain: str


@dataclass(frozen=True, slots=True)
class HistoryReply(AdminReplyMessage):
    """``entries``: ts, by, action, subject, reason, until, details; oldest first."""

    TYPE: ClassVar[str] = "admin-history-reply"
    domain: str
    entries: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class WhyRequest(AdminRequestMessage):
    TYPE: ClassVar[str] = "admin-why"
    COMMAND: ClassVar[str] = "why"
    sid: str


@dataclass(frozen=True, slots=True)
class WhyReply(AdminReplyMessage):
    """``decisions`` in time order, each with the worker that made it; ``unanswered``:
    the workers that did not answer, and why."""

    TYPE: ClassVar[str] = "admin-why-reply"
    sid: str
    decisions: list[dict[str, Any]]
    unanswered: dict[str, str]


# -- the queues ----------------------------------------------------------------------------

QUEUE_ACTIONS = ("list", "flush", "delete", "purge", "hold", "release")


@dataclass(frozen=True, slots=True)
class QueueRequest(AdminRequestMessage):
    """``action``: list | flush | delete (``queue_id``) | purge (``account`` or ``ip``,
    ``bounce``) | hold and release (``ids`` or ``account``); the three changes carry
    ``by`` and ``reason``."""

    TYPE: ClassVar[str] = "admin-queue"
    COMMAND: ClassVar[str] = "queue"
    action: str
    queue_id: str | None = None
    ids: list[str] = field(default_factory=list)
    account: str | None = None
    ip: str | None = None
    bounce: bool = False
    by: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class QueueReply(AdminReplyMessage):
    """Every action: the ``workers`` that answered and the ``unanswered`` ones. ``list``:
    ``messages``; ``flush``: ``started`` and ``per_worker``; a change: ``touched``,
    ``messages``, ``per_worker`` and its selection (``ids``, ``account`` or ``client``,
    and a purge's ``bounce``); ``delete``: ``queue_id``, ``deleted`` and ``worker``."""

    TYPE: ClassVar[str] = "admin-queue-reply"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({
        "messages", "started", "per_worker", "touched", "ids", "account", "client",
        "bounce", "queue_id", "deleted", "worker"})
    action: str
    workers: list[str]
    unanswered: dict[str, str]
    messages: list[dict[str, Any]] | None = None
    started: int | None = None
    per_worker: dict[str, int] | None = None
    touched: int | None = None
    ids: list[str] | None = None
    account: str | None = None
    client: str | None = None
    bounce: bool | None = None
    queue_id: str | None = None
    deleted: bool | None = None
    worker: str | None = None


# -- a worker's part -------------------------------------------------------------------------
# ``rid`` is set by the coordinator when it sends a request (``dataclasses.replace``).

class WorkerReply(Message):
    """What a worker answers; ``rid`` names the request, ``worker`` the worker."""

    rid: str
    worker: str


Reply = TypeVar("Reply", bound=WorkerReply)


class WorkerRequest(Message, Generic[Reply]):
    """What the coordinator asks one worker; answered by ``Reply`` or :class:`WorkerFailed`."""

    rid: str


@dataclass(frozen=True, slots=True)
class WorkerFailed(WorkerReply):
    TYPE: ClassVar[str] = "worker-failed"
    rid: str
    worker: str
    error: str


@dataclass(frozen=True, slots=True)
class WorkerInspectReply(WorkerReply):
    """``rows``: per key, its rows as the key's owner has them (``CounterShard.rows``)."""

    TYPE: ClassVar[str] = "worker-inspect-reply"
    rid: str
    worker: str
    rows: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class WorkerInspectRequest(WorkerRequest[WorkerInspectReply]):
    TYPE: ClassVar[str] = "worker-inspect"
    keys: list[str]
    rid: str = ""


@dataclass(frozen=True, slots=True)
class WorkerResetReply(WorkerReply):
    TYPE: ClassVar[str] = "worker-reset-reply"
    rid: str
    worker: str
    cleared: int
    owners: list[str]


@dataclass(frozen=True, slots=True)
class WorkerResetRequest(WorkerRequest[WorkerResetReply]):
    """``reset_id``: one per ``counters reset``, so a second worker asked resets nothing twice."""

    TYPE: ClassVar[str] = "worker-reset"
    keys: list[str]
    reset_id: str
    rid: str = ""


@dataclass(frozen=True, slots=True)
class WorkerWhyReply(WorkerReply):
    """``kept``: how much the worker remembers (``decisions``, ``seconds``)."""

    TYPE: ClassVar[str] = "worker-why-reply"
    rid: str
    worker: str
    decisions: list[dict[str, Any]]
    kept: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkerWhyRequest(WorkerRequest[WorkerWhyReply]):
    TYPE: ClassVar[str] = "worker-why"
    sid: str
    rid: str = ""


@dataclass(frozen=True, slots=True)
class WorkerQueueReply(WorkerReply):
    """``list``: ``messages``; ``flush``: ``started``; ``delete``: ``deleted``; a change:
    ``touched`` (queue id and account of each message)."""

    TYPE: ClassVar[str] = "worker-queue-reply"
    rid: str
    worker: str
    messages: list[dict[str, Any]] | None = None
    started: int | None = None
    deleted: bool | None = None
    touched: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class WorkerQueueRequest(WorkerRequest[WorkerQueueReply]):
    """``action`` as in :class:`QueueRequest`; a change selects by ``ids``, ``account`` or
    ``client`` (a client key, cluster.names.client_key)."""

    TYPE: ClassVar[str] = "worker-queue"
    action: str
    queue_id: str = ""
    ids: list[str] = field(default_factory=list)
    account: str = ""
    client: str = ""
    bounce: bool = False
    rid: str = ""


@dataclass(frozen=True, slots=True)
class WorkerAdoptReply(WorkerReply):
    """``adopted``: messages taken over per spool folder; ``busy``: folders still in use."""

    TYPE: ClassVar[str] = "worker-adopt-reply"
    rid: str
    worker: str
    adopted: dict[str, int]
    busy: list[str]


@dataclass(frozen=True, slots=True)
class WorkerAdoptRequest(WorkerRequest[WorkerAdoptReply]):
    """``keep``: the names whose spool folders are not orphans."""

    TYPE: ClassVar[str] = "worker-adopt"
    keep: list[str]
    rid: str = ""
