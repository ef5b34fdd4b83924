"""The policy engine: the decisions of one SMTP session, stage by stage.

The SMTP handler calls one method per protocol stage; each returns a
:class:`Verdict` whose reply goes to the client unchanged, and logs one
structured line. Counter-based policies share one counter request per
decision (one ``check`` at MAIL, one ``reserve`` at the end of DATA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.counting import Op, Outcome
from cluster.logjson import log_event
from cluster.passwords import PasswordSchemeError
from worker import replies
from worker.auth import PasswordVerifier
from worker.counters.client import CounterClient, CounterUnavailable
from worker.dkim import DkimSigner
from worker.policies import CONTINUE, Action, Client, Verdict, reject, tempfail
from worker.policies.auth_throttle import AuthThrottlePolicy
from worker.policies.bounce_ratio import BounceRatioPolicy
from worker.policies.geoip import GeoipPolicy
from worker.policies.rate_limit import RateLimitPolicy, shadow_fields
from worker.policies.recipient_domain import RecipientDomainPolicy
from worker.policies.sender_domain import SenderDomainPolicy
from worker.policies.spam_grace import SpamGracePolicy
from worker.snapshot import Snapshot
from worker.spam import ScannerUnavailable, ScanRequest, ScanResult, SpamScanner
from worker.spool import BaseSpool, SpoolError, new_queue_id
from worker.spool.record import SpoolRecord
from worker.submission import complete_headers, spam_headers, trace_headers


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
    ) -> None:
        self.snapshot = snapshot
        self.counters = counters
        self.verifier = verifier
        self.scanner = scanner
        self.spool = spool
        self.clock = clock
        self.on_queued = on_queued
        self.auth_throttle = AuthThrottlePolicy()
        self.sender_domain = SenderDomainPolicy()
        self.geoip = GeoipPolicy()
        self.bounce_ratio = BounceRatioPolicy()
        self.rate_limit = RateLimitPolicy()
        self.recipient_domain = recipient_domain
        self.spam_grace = SpamGracePolicy()
        self.dkim = DkimSigner()
        # Told every verdict that is logged (the worker's metrics).
        self.on_decision: Callable[[str, Verdict], None] | None = None

    # -- AUTH ---------------------------------------------------------------

    async def auth_allowed(self, client: Client) -> Verdict:
        """Before the credentials are read: is this address locked out?"""
        snapshot = self.snapshot()
        ops = self.auth_throttle.ops(snapshot, client)
        if not ops:
            return CONTINUE
        try:
            outcome = await self.counters.check(ops)
        except CounterUnavailable as exc:
            return self._log(client, "AUTH", _counter_tempfail(client, self.auth_throttle.name,
                                                               exc))
        verdict = self.auth_throttle.judge(client, ops, outcome.counts)
        if not verdict.ok:
            self._log(client, "AUTH", verdict)
        return verdict

    async def authenticate(self, client: Client, user: str, password: str) -> Verdict:
        snapshot = self.snapshot()
        account = snapshot.tenants.account(user)
        ok = False
        if account is not None:
            try:
                ok = await self.verifier.verify(account.user, account.password, password)
            except PasswordSchemeError as exc:
                log_event("bad_password_hash", logging.ERROR, sid=client.sid,
                          account=account.user, error=str(exc))
        if ok:
            assert account is not None
            client.account = account
            return self._log(client, "AUTH", Verdict(Action.CONTINUE, replies.AUTH_OK, "auth"),
                             account=account.user)
        failure_ops = self.auth_throttle.failure_ops(snapshot, client)
        if failure_ops:
            try:
                await self.counters.add(failure_ops)
            except CounterUnavailable as exc:
                logging.getLogger(__name__).warning("auth failure not counted: %s", exc)
        return self._log(client, "AUTH",
                         reject("auth", replies.AUTH_FAILED.format(sid=client.sid),
                                "unknown user" if account is None else "wrong password"),
                         account=user)

    # -- MAIL ---------------------------------------------------------------

    async def mail(self, client: Client, sender: str) -> Verdict:
        snapshot = self.snapshot()
        for policy in (self.sender_domain, self.geoip):
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
        if verdict.ok:
            verdict = self.rate_limit.judge(client, rate_ops, outcome.counts[split:])
        if verdict.ok:
            self._log_shadows(snapshot, client, "MAIL", rate_ops, outcome.counts[split:],
                              sender=sender)
            verdict = Verdict(Action.CONTINUE, replies.SENDER_OK, "mail")
        return self._log(client, "MAIL", verdict, sender=sender)

    # -- RCPT ---------------------------------------------------------------

    async def rcpt(self, client: Client, recipient: str) -> Verdict:
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
        content = complete_headers(transaction.content, hostname, queue_id, now)
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
        if not outcome.ok:
            verdict = self._refusal(client, ops, outcome, scan, spam_ops)
            return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned))
        rate_counts = outcome.counts[len(spam_ops):len(spam_ops) + len(rate_ops)]
        self._log_shadows(snapshot, client, "DATA", rate_ops, rate_counts, queue_id=queue_id)

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
            message=trace_headers(hostname, client, queue_id, spam_headers(scan, skipped), now)
            + content,
        )
        try:
            await self.spool.store(record)
        except SpoolError as exc:
            await self._release(reservation)
            verdict = tempfail("spool", replies.SPOOL_TEMPFAIL.format(sid=client.sid), str(exc))
            return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned))
        if self.on_queued is not None:
            self.on_queued(record)
        # The reservation stands as the message's count: owners keep an open
        # reservation when it expires, so no confirm round trip is needed
        # before the 250 (only a failed spool write releases it).
        verdict = Verdict(Action.CONTINUE, replies.QUEUED.format(queue_id=queue_id),
                          "spam" if scan.spam else "data", "spam within grace" if scan.spam else "")
        return Acceptance(self._log(client, "DATA", verdict, queue_id=queue_id, **scanned,
                                    recipients=len(transaction.rcpt_tos),
                                    size=len(record.message), dkim=signed.by,
                                    dkim_skipped=signed.skipped), queue_id)

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
            pass  # it expires on its owner and is released there

    def _log(self, client: Client, stage: str, verdict: Verdict, **extra: object) -> Verdict:
        account = extra.pop("account", None) or (client.account.user if client.account else None)
        log_event(
            "decision",
            sid=client.sid,
            client_ip=client.ip,
            account=account,
            stage=stage,
            policy=verdict.policy or None,
            verdict=verdict.action.value if verdict.action is not Action.CONTINUE else "accept",
            reply=verdict.reply or None,
            detail=verdict.detail or None,
            **extra,
        )
        if self.on_decision is not None:
            self.on_decision(stage, verdict)
        return verdict


def _scan_fields(scan: ScanResult) -> dict[str, object]:
    """What the decision line says about the content scan."""
    return {"score": scan.score, "symbols": list(scan.symbols), "backend": scan.backend,
            "scan_action": scan.action or None}


def _counter_tempfail(client: Client, policy: str, exc: Exception) -> Verdict:
    return tempfail(policy, replies.POLICY_TEMPFAIL.format(sid=client.sid), str(exc))
