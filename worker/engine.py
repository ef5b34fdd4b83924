"""The policy engine: the decisions of one SMTP session, stage by stage.

The SMTP layer (worker/smtp.py through worker/handler.py) calls one method
per decision; each returns a :class:`Verdict` whose reply goes to the client
unchanged and writes one structured decision line, and the worker's metrics
are told of it (``on_decision``). That holds for the refusals the protocol
makes itself too (syntax, sequence, size, timeouts): :meth:`refused`.
Counter-based policies share one counter request per decision (one
``check`` at MAIL, one ``reserve`` at the end of DATA).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.counting import Op, Outcome
from cluster.logjson import log_event
from cluster.support_state import iso_utc
from worker import replies
from worker.auth import PasswordVerifier
from worker.authentication import Authenticator, recheck_login
from worker.connections import ConnectionTable
from worker.counters.client import CounterClient, CounterUnavailable
from worker.dkim import DkimSigner
from worker.evidence import EvidenceNotes
from worker.policies import CONTINUE, Action, Client, Verdict, reject, tempfail
from worker.policies.bounce_ratio import BounceRatioPolicy
from worker.policies.geoip import GeoipPolicy, client_country
from worker.policies.header_sender import HeaderSenderPolicy
from worker.policies.rate_limit import RateLimitPolicy, shadow_fields, window_text
from worker.policies.recipient_domain import RecipientDomainPolicy
from worker.policies.sender_domain import SenderDomainPolicy
from worker.policies.spam_grace import SpamGracePolicy
from worker.policies.suspension import SuspensionPolicy
from worker.recent import RecentDecisions
from worker.sasl import Credentials
from worker.snapshot import Snapshot
from worker.spam import ScannerUnavailable, ScanRequest, ScanResult, SpamScanner
from worker.spool import BaseSpool, SpoolError, new_queue_id
from worker.spool.record import SpoolRecord
from worker.submission import complete_headers, spam_headers, trace_headers

_CLEARS_KEPT = 10_000
_CLEARS_FOR = 5.0


@dataclass(frozen=True, slots=True)
class Transaction:
    """What the client sent for one message, as the engine needs it at end of DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes


@dataclass(frozen=True, slots=True)
class Acceptance:
    verdict: Verdict
    queue_id: str | None = None


class PolicyEngine:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        counters: CounterClient,
        verifier: PasswordVerifier,
        recipient_domain: RecipientDomainPolicy,
        scanner: Callable[[], SpamScanner],
        spool: BaseSpool,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[SpoolRecord], None] | None = None,
        recent: RecentDecisions | None = None,
        connections: ConnectionTable | None = None,
        on_decision: Callable[[str, Verdict], None] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.counters = counters
        self.scanner = scanner
        self.spool = spool
        self.clock = clock
        self.on_queued = on_queued
        # Every decision is also kept here for ``sendguard why`` (None: not kept).
        self.recent = recent
        self.connections = connections or ConnectionTable()
        self.authenticator = Authenticator(snapshot, counters, verifier, self._release_later)
        self.suspension = SuspensionPolicy(clock)
        self.sender_domain = SenderDomainPolicy()
        self.geoip = GeoipPolicy(clock)
        self.bounce_ratio = BounceRatioPolicy()
        self.rate_limit = RateLimitPolicy()
        self.recipient_domain = recipient_domain
        self.header_sender = HeaderSenderPolicy()
        self.spam_grace = SpamGracePolicy()
        self.dkim = DkimSigner()
        # Successful logins and spam for compromise detection, sent to the coordinator.
        self.evidence = EvidenceNotes()
        # Told every verdict that is logged (the worker's metrics).
        self.on_decision = on_decision
        self._background: set[asyncio.Task[None]] = set()
        # (key, series, window) -> (when a full window lets the next message in, when that
        # was asked): a burst of refusals of one key asks its owner once.
        self._clears: dict[tuple[str, str, float], tuple[float, float]] = {}

    @property
    def verifier(self) -> PasswordVerifier:
        return self.authenticator.verifier

    @verifier.setter
    def verifier(self, verifier: PasswordVerifier) -> None:
        self.authenticator.verifier = verifier

    # -- the connection and the session -----------------------------------------

    def connect(self, client: Client) -> Verdict:
        """Before the banner: is this address over ``server.max_connections_per_ip``?

        An admitted connection must be given back with :meth:`disconnect`.
        """
        if client.trusted:
            return CONTINUE
        cap = self.snapshot().settings.server.max_connections_per_ip
        if self.connections.admit(client.key, cap):
            return CONTINUE
        held, others = self.connections.held(client.key), self.connections.others(client.key)
        return self._log(client, "CONNECT", tempfail(
            "connection_cap", replies.TOO_MANY_CONNECTIONS.format(sid=client.sid),
            f"{held} here, {others} on other workers, cap {cap}"))

    def disconnect(self, client: Client) -> None:
        if not client.trusted:
            self.connections.release(client.key)

    def refused(self, client: Client, stage: str, policy: str, reply: str,
                detail: str = "") -> Verdict:
        """A refusal the protocol decides (syntax, sequence, size, limits, timeouts), logged."""
        action = Action.TEMPFAIL if reply[:1] == "4" else Action.REJECT
        return self._log(client, stage or "SESSION", Verdict(action, reply, policy, detail))

    def unauthenticated(self, client: Client, stage: str) -> Verdict:
        return self.refused(client, stage, "auth", replies.AUTH_REQUIRED.format(sid=client.sid),
                            "not authenticated")

    def bad_address(self, client: Client, stage: str, problem: str) -> Verdict:
        return self.refused(client, stage, "address_syntax",
                            replies.BAD_ADDRESS.format(sid=client.sid), problem)

    def internal_error(self, client: Client, stage: str, error: BaseException) -> Verdict:
        """A bug met while handling a command: 451, and nothing was counted or queued."""
        where = ""
        trace = error.__traceback__
        while trace is not None and trace.tb_next is not None:
            trace = trace.tb_next
        if trace is not None:
            code = trace.tb_frame.f_code
            where = f" at {code.co_filename.rpartition('/')[2]}:{trace.tb_lineno} ({code.co_name})"
        return self._log_at(logging.ERROR, client, stage or "SESSION", tempfail(
            "internal", replies.INTERNAL_ERROR.format(sid=client.sid),
            f"{type(error).__name__}: {error}{where}"))

    # -- AUTH ---------------------------------------------------------------

    async def authenticate(self, client: Client, credentials: Credentials) -> Verdict:
        try:
            verdict = await self.authenticator.authenticate(client, credentials)
        except asyncio.CancelledError:
            # The client hung up during the check: its failure stays counted.
            self._log(client, "AUTH", reject("auth", "", "abandoned during the check"),
                      account=credentials.login, mechanism=credentials.mechanism)
            raise
        if verdict.ok:
            self.evidence.login(self.snapshot(), client)
        return self._log(client, "AUTH", verdict, account=credentials.login,
                         mechanism=credentials.mechanism)

    # -- MAIL ---------------------------------------------------------------

    async def mail(self, client: Client, sender: str) -> Verdict:
        snapshot = self.snapshot()
        # The login is checked again first: an account removed, or whose
        # password changed, since this session's AUTH may no longer send.
        # Then a suspension, which may have come since as well.
        login = client.account.user if client.account else None
        relogin = recheck_login(snapshot, client)
        if relogin is not None:
            return self._log(client, "MAIL", relogin, sender=sender, account=login)
        for policy in (self.suspension, self.sender_domain, self.geoip):
            verdict = policy.check(snapshot, client, sender)
            if not verdict.ok:
                return self._log(client, "MAIL", verdict, sender=sender)
        bounce_ops = self.bounce_ratio.ops(snapshot, client)
        rate_ops = self.rate_limit.ops(snapshot, client)
        try:
            outcome = await self.counters.check(bounce_ops + rate_ops)
        except CounterUnavailable as exc:
            return self._log(client, "MAIL", _counter_tempfail(client, "counters", exc),
                             sender=sender)
        split = len(bounce_ops)
        verdict = self.bounce_ratio.judge(snapshot, client, bounce_ops, outcome.counts[:split])
        if not verdict.ok:
            return self._log(client, "MAIL", verdict, sender=sender)
        verdict = self.rate_limit.judge(client, rate_ops, outcome.counts[split:])
        if not verdict.ok:
            denied = self.rate_limit.denied(rate_ops, outcome.counts[split:])
            facts = await self._limit_facts(rate_ops, outcome.counts[split:], denied)
            return self._log(client, "MAIL", verdict, sender=sender, **facts)
        self._log_shadows(snapshot, client, "MAIL", rate_ops, outcome.counts[split:],
                          sender=sender)
        return self._log(client, "MAIL", Verdict(Action.CONTINUE, replies.SENDER_OK, "mail"),
                         sender=sender)

    # -- RCPT ---------------------------------------------------------------

    async def rcpt(self, client: Client, recipient: str, accepted: int = 0) -> Verdict:
        """``accepted``: recipients this transaction already has."""
        limit = self.snapshot().settings.server.max_recipients
        if accepted >= limit:
            verdict = tempfail("max_recipients", replies.TOO_MANY_RECIPIENTS,
                               f"{accepted} accepted, max {limit}")
            return self._log(client, "RCPT", verdict, recipient=recipient)
        verdict = await self.recipient_domain.check(client, recipient)
        if verdict.ok:
            verdict = Verdict(Action.CONTINUE, replies.RECIPIENT_OK, "rcpt")
        return self._log(client, "RCPT", verdict, recipient=recipient)

    # -- end of DATA --------------------------------------------------------

    async def data(self, client: Client, transaction: Transaction) -> Acceptance:
        snapshot = self.snapshot()
        queue_id = new_queue_id()
        now = self.clock()
        hostname = snapshot.settings.server.hostname
        content = complete_headers(transaction.content, hostname, queue_id, now,
                                   sender=transaction.mail_from)
        noted: dict[str, object] = {}
        alignment = snapshot.settings.policy.from_alignment
        if alignment != "off":
            verdict = self.header_sender.check(snapshot, client, content)
            if not verdict.ok and alignment == "enforce":
                return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id))
            if not verdict.ok:
                noted["from_alignment"] = f"would refuse: {verdict.reply}"
        scan, skipped = await self._scan(snapshot, client, transaction, content)
        if isinstance(scan, Verdict):
            return Acceptance(self._log(client, "DATA", scan, queue_id=queue_id,
                                        backend=self.scanner().name))
        scanned = _scan_fields(scan)

        spam_ops = self.spam_grace.ops(snapshot, client) if scan.spam else []
        # A recipient limit's amount is the message's accepted recipients.
        rate_ops = self.rate_limit.ops(snapshot, client, len(transaction.rcpt_tos))
        ops = spam_ops + rate_ops + self.bounce_ratio.accept_ops(snapshot, client)
        reservation = f"{client.sid}.{queue_id}"
        try:
            outcome = await self.counters.reserve(reservation, ops)
        except CounterUnavailable as exc:
            return Acceptance(self._log(client, "DATA", _counter_tempfail(client, "counters", exc),
                                        queue_id=queue_id, **scanned))
        except asyncio.CancelledError:
            self._release_later(reservation)  # the client is gone: count nothing
            raise
        if not outcome.ok:
            verdict = self._refusal(client, ops, outcome, scan, spam_ops)
            if verdict.policy == self.spam_grace.name:
                self.evidence.spam(snapshot, client, queue_id)
            facts = {}
            if verdict.policy == self.rate_limit.name:
                facts = await self._limit_facts(ops, outcome.counts, outcome.denied)
            return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned,
                                        **facts))
        rate_counts = outcome.counts[len(spam_ops):len(spam_ops) + len(rate_ops)]
        self._log_shadows(snapshot, client, "DATA", rate_ops, rate_counts, queue_id=queue_id)

        try:
            # Signed as it will be delivered; the trace headers added below are not signed.
            signed = await self.dkim.sign(snapshot.dkim, snapshot.tenants, client, content)
            content = signed.content
            record = SpoolRecord.new(
                queue_id=queue_id,
                session_id=client.sid,
                client_ip=client.ip,
                account=client.account.user if client.account else "",
                helo=client.helo,
                mail_from=transaction.mail_from,
                rcpt_tos=list(transaction.rcpt_tos),
                received_at=now,
                message=trace_headers(hostname, client, queue_id, spam_headers(scan, skipped),
                                      now) + content,
            )
        except BaseException:  # a bug, or the client left while signing: count nothing
            self._release_later(reservation)
            raise
        # Shielded: a client that hangs up while its message is being stored
        # cancels this coroutine, but the store and the hand-over to delivery
        # finish (or release the reservation) all the same, so no stored
        # message is left that delivery never heard of.
        commit = asyncio.ensure_future(self._commit(record, reservation))
        try:
            failure = await asyncio.shield(commit)
        except asyncio.CancelledError:
            commit.add_done_callback(
                lambda done: self._log_unheard(client, done, queue_id, len(record.message)))
            raise
        if failure is not None:
            verdict = tempfail("spool", replies.SPOOL_TEMPFAIL.format(sid=client.sid),
                               str(failure))
            return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned))
        if scan.spam:
            self.evidence.spam(snapshot, client, queue_id)
        # The reservation stands as the message's count: owners keep an open
        # reservation when it expires, so no confirm round trip is needed
        # before the 250 (only a failed spool write releases it).
        verdict = Verdict(Action.CONTINUE, replies.QUEUED.format(queue_id=queue_id),
                          "spam" if scan.spam else "data", "spam within grace" if scan.spam else "")
        return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned,
                                    recipients=len(transaction.rcpt_tos),
                                    size=len(record.message), dkim=signed.by,
                                    dkim_skipped=signed.skipped, **noted), queue_id)

    def _log_unheard(self, client: Client, commit: asyncio.Future[SpoolError | None],
                     queue_id: str, size: int) -> None:
        """What became of a message whose client left before its reply."""
        if commit.cancelled() or commit.exception() is not None or commit.result() is not None:
            verdict = tempfail("spool", replies.SPOOL_TEMPFAIL.format(sid=client.sid),
                               "not stored; the client had left")
        else:
            verdict = Verdict(Action.CONTINUE, replies.QUEUED.format(queue_id=queue_id), "data",
                              "queued; the client left before the reply")
        self._log(client, "DATA", verdict, queue_id=queue_id, size=size)

    async def _commit(self, record: SpoolRecord, reservation: str) -> SpoolError | None:
        """Store and enqueue, or release the reservation: either way, all of it."""
        try:
            await self.spool.store(record)
        except SpoolError as exc:
            await self._release(reservation)
            return exc
        except BaseException:
            self._release_later(reservation)
            raise
        if self.on_queued is not None:
            self.on_queued(record)
        return None

    async def _scan(self, snapshot: Snapshot, client: Client, transaction: Transaction,
                    content: bytes) -> tuple[ScanResult | Verdict, str]:
        """The scan's result or the ``spam.on_error`` verdict, and why the scan was skipped."""
        request = ScanRequest(
            message=content,
            mail_from=transaction.mail_from,
            rcpt_tos=transaction.rcpt_tos,
            client_ip=client.ip,
            helo=client.helo,
            user=client.account.user if client.account else "",
            session_id=client.sid,
        )
        scanner = self.scanner()
        try:
            return await scanner.scan(request), ""
        except ScannerUnavailable as exc:
            if snapshot.settings.spam.on_error == "tempfail":
                return tempfail("spam", replies.SCAN_UNAVAILABLE.format(sid=client.sid),
                                str(exc)), ""
            log_event("scan_skipped", logging.WARNING, sid=client.sid, client_ip=client.ip,
                      policy="spam", reason=str(exc))
            reason = str(exc) or f"{scanner.name}: unavailable"
            return ScanResult(False, 0.0, (), scanner.name, "skipped"), reason

    def _refusal(self, client: Client, ops: list[Op], outcome: Outcome, scan: ScanResult,
                 spam_ops: list[Op]) -> Verdict:
        detail = ""
        if outcome.denied is not None:
            op = ops[outcome.denied]
            detail = f"{op.key} {op.window:g}s {outcome.counts[outcome.denied]}/{op.max}"
        if scan.spam and outcome.denied is not None and outcome.denied < len(spam_ops):
            return self.spam_grace.refusal(client, f"score {scan.score:g}; {detail}")
        return reject(self.rate_limit.name, replies.POLICY_VIOLATION.format(sid=client.sid),
                      detail)

    def _log_shadows(self, snapshot: Snapshot, client: Client, stage: str, rate_ops: list[Op],
                     counts: tuple[int, ...], **extra: object) -> None:
        """Shadow limits (SPEC §3.12): where one would have refused, a ``shadow``
        decision with the reply it would have given; the transaction goes on."""
        hits = self.rate_limit.shadow_hits(snapshot, client, rate_ops, counts)
        for hit, verdict in self.rate_limit.shadow_verdicts(client, hits, stage):
            self._log(client, stage, verdict, **extra, **shadow_fields(hit))

    async def _release(self, reservation: str) -> None:
        try:
            await self.counters.release(reservation)
        except CounterUnavailable:
            pass  # it stays counted on its owner: that can only under-admit

    def _release_later(self, reservation: str) -> None:
        """Release without making anyone wait (or from a coroutine being cancelled)."""
        task = asyncio.get_running_loop().create_task(self._release(reservation))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _limit_facts(self, ops: Sequence[Op], counts: Sequence[int],
                           denied: int | None) -> dict[str, object]:
        """What a rate-limit refusal names: key, window, count, max and when it clears."""
        if denied is None:
            return {}
        op, count = ops[denied], counts[denied]
        return {"key": op.key, "window": window_text(op.window), "count": count, "max": op.max,
                "clears_at": iso_utc(await self._clears_at(op))}

    async def _clears_at(self, op: Op) -> float | None:
        """When the oldest counted message of the full window leaves it, by the owner's rows."""
        ident, now = (op.key, op.series, op.window), self.clock()
        known = self._clears.get(ident)
        # Kept briefly: a reset or a released reservation can move it.
        if known is not None and known[0] > now and now - known[1] < _CLEARS_FOR:
            return known[0]
        try:
            rows = (await self.counters.inspect([op.key])).get(op.key, [])
        except CounterUnavailable:
            return None
        row = next((row for row in rows if row.get("series") == op.series
                    and row.get("window") == op.window), {})
        clears = fits_again_at(row, op.max or 0, op.amount)
        if clears is not None:
            if len(self._clears) >= _CLEARS_KEPT:
                self._clears.clear()
            self._clears[ident] = (float(clears), now)
            return float(clears)
        return None

    def log_decision(self, client: Client, stage: str, verdict: Verdict,
                     **extra: object) -> Verdict:
        """A decision made outside the engine (by the SMTP layer): logged and kept the same way."""
        return self._log(client, stage, verdict, **extra)

    def _log(self, client: Client, stage: str, verdict: Verdict, **extra: object) -> Verdict:
        return self._log_at(logging.INFO, client, stage, verdict, **extra)

    def _log_at(self, level: int, client: Client, stage: str, verdict: Verdict,
                **extra: object) -> Verdict:
        named = extra.pop("account", None)
        account = str(named) if named else (client.account.user if client.account else None)
        country = client.country
        if country is None:
            country = client_country(self.snapshot(), client)
        outcome = verdict.action.value if verdict.action is not Action.CONTINUE else "accept"
        log_event(
            "decision",
            level,
            sid=client.sid,
            client_ip=client.ip,
            account=account,
            stage=stage,
            policy=verdict.policy or None,
            verdict=outcome,
            reply=verdict.reply or None,
            detail=verdict.detail or None,
            country=country or None,
            **extra,
        )
        if self.recent is not None:
            self.recent.add(client.sid, client.ip, country or None, account, stage,
                            verdict.policy or None, outcome, verdict.reply or None,
                            verdict.detail or None, extra)
        if self.on_decision is not None:
            self.on_decision(stage, verdict)
        return Verdict(verdict.action, replies.Decided(verdict.reply), verdict.policy,
                       verdict.detail)


def fits_again_at(row: dict[str, object], limit: int, amount: int) -> float | None:
    """When enough of a full window's oldest counts have left it for ``amount`` more to fit
    under ``limit``, from an owner's row (``CounterShard.snapshot``)."""
    buckets = row.get("buckets")
    count = row.get("count")
    if not isinstance(buckets, list) or not isinstance(count, int):
        clears = row.get("clears_at")  # an owner that does not list its buckets
        return float(clears) if isinstance(clears, (int, float)) else None
    excess = count + amount - limit
    for ends_at, n in buckets:
        excess -= n
        if excess <= 0:
            return float(ends_at)
    return None  # it can never fit (a message larger than the limit)


def _scan_fields(scan: ScanResult) -> dict[str, object]:
    """What the decision line says about the content scan."""
    return {"score": scan.score, "symbols": list(scan.symbols), "backend": scan.backend,
            "scan_action": scan.action or None}


def _counter_tempfail(client: Client, policy: str, exc: Exception) -> Verdict:
    return tempfail(policy, replies.POLICY_TEMPFAIL.format(sid=client.sid), str(exc))
