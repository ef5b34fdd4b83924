"""The policy engine: the decisions of one SMTP session, stage by stage.

The SMTP layer (worker/smtp.py through worker/handler.py) calls one method
per decision; each returns a :class:`Verdict` whose reply goes to the client
unchanged, and hands it to the decision log (worker/decisions.py: one
line, one metric). That holds for the refusals the protocol makes itself
too (syntax, sequence, size, timeouts): :meth:`refused`.

MAIL, RCPT and the end of DATA run their stage's policies (worker/stages.py)
through :meth:`_decide`: the policies that need no counter one by one, then
one counter request for the rest (a ``check`` at MAIL, the message's
reservation at the end of DATA). AUTH is worker/authentication.py. An
accepted message is then signed, stored and handed to delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cluster.counting import Op, Outcome, judge
from worker import replies
from worker.auth import PasswordVerifier
from worker.authentication import Authenticator
from worker.client import Client
from worker.connections import ConnectionTable
from worker.counters.client import CounterClient, CounterUnavailable
from worker.decisions import DecisionLog
from worker.dkim import DkimSigner
from worker.evidence import EvidenceNotes
from worker.policies import CONTINUE, Action, Verdict, reject, tempfail
from worker.policies.base import NO_COUNTS, Counts, Decision, Policy
from worker.policies.spam_grace import SpamGracePolicy
from worker.sasl import Credentials
from worker.snapshot import Snapshot
from worker.spool import BaseSpool, SpoolError, new_queue_id
from worker.spool.record import SpoolRecord
from worker.stages import Stages
from worker.submission import complete_headers, spam_headers, trace_headers

Count = Callable[[Sequence[Op]], Awaitable[Outcome]]


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
        stages: Stages,
        spool: BaseSpool,
        decisions: DecisionLog,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[SpoolRecord], None] | None = None,
        connections: ConnectionTable | None = None,
        evidence: EvidenceNotes | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.counters = counters
        self.stages = stages
        self.spool = spool
        self.log = decisions
        self.clock = clock
        self.on_queued = on_queued
        self.connections = connections or ConnectionTable()
        # Successful logins and spam for compromise detection, sent to the coordinator.
        self.evidence = evidence or EvidenceNotes()
        self.authenticator = Authenticator(snapshot, counters, verifier, self._release_later)
        self.dkim = DkimSigner()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def verifier(self) -> PasswordVerifier:
        return self.authenticator.verifier

    @verifier.setter
    def verifier(self, verifier: PasswordVerifier) -> None:
        # Tests put a verifier of their own in (tests/worker/test_auth_abuse.py).
        self.authenticator.verifier = verifier

    # -- the connection and the protocol's own refusals ------------------------------

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
        return self.log(client, "CONNECT", tempfail(
            "connection_cap", replies.TOO_MANY_CONNECTIONS.format(sid=client.sid),
            f"{held} here, {others} on other workers, cap {cap}"))

    def disconnect(self, client: Client) -> None:
        if not client.trusted:
            self.connections.release(client.key)

    def refused(self, client: Client, stage: str, policy: str, reply: str,
                detail: str = "") -> Verdict:
        """A refusal the protocol decides (syntax, sequence, size, limits, timeouts), logged."""
        action = Action.TEMPFAIL if reply[:1] == "4" else Action.REJECT
        return self.log(client, stage or "SESSION", Verdict(action, reply, policy, detail))

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
        return self.log.at(logging.ERROR, client, stage or "SESSION", tempfail(
            "internal", replies.INTERNAL_ERROR.format(sid=client.sid),
            f"{type(error).__name__}: {error}{where}"))

    # -- AUTH, MAIL, RCPT ------------------------------------------------------------

    async def authenticate(self, client: Client, credentials: Credentials) -> Verdict:
        try:
            verdict = await self.authenticator.authenticate(client, credentials)
        except asyncio.CancelledError:
            # The client hung up during the check: its failure stays counted.
            self.log(client, "AUTH", reject("auth", "", "abandoned during the check"),
                     account=credentials.login, mechanism=credentials.mechanism)
            raise
        if verdict.ok:
            self.evidence.login(self.snapshot(), client)
        return self.log(client, "AUTH", verdict, account=credentials.login,
                        mechanism=credentials.mechanism)

    async def mail(self, client: Client, sender: str) -> Verdict:
        # The login as AUTH left it: the re-check may withdraw it.
        login = client.account.user if client.account else None
        decision = Decision(self.snapshot(), client, "MAIL", sender=sender)
        verdict = await self._decide(self.stages.mail, decision, self._check)
        if verdict.ok:
            self._log_shadows(decision, sender=sender)
            verdict = Verdict(Action.CONTINUE, replies.SENDER_OK, "mail")
        return self.log(client, "MAIL", verdict, sender=sender, account=login, **decision.found)

    async def rcpt(self, client: Client, recipient: str, accepted: int = 0) -> Verdict:
        """``accepted``: recipients this transaction already has."""
        decision = Decision(self.snapshot(), client, "RCPT", recipient=recipient,
                            accepted=accepted)
        verdict = await self._decide(self.stages.rcpt, decision, self._check)
        if verdict.ok:
            verdict = Verdict(Action.CONTINUE, replies.RECIPIENT_OK, "rcpt")
        return self.log(client, "RCPT", verdict, recipient=recipient, **decision.found)

    # -- end of DATA -----------------------------------------------------------------

    async def data(self, client: Client, transaction: Transaction) -> Acceptance:
        snapshot = self.snapshot()
        queue_id = new_queue_id()
        now = self.clock()
        hostname = snapshot.settings.server.hostname
        content = complete_headers(transaction.content, hostname, queue_id, now,
                                   sender=transaction.mail_from)
        decision = Decision(snapshot, client, "DATA", sender=transaction.mail_from,
                            rcpt_tos=transaction.rcpt_tos, content=content)
        reservation = f"{client.sid}.{queue_id}"
        verdict = await self._decide(self.stages.data, decision,
                                     lambda ops: self._reserve(reservation, ops))
        scan = decision.scan
        if not verdict.ok:
            if scan is not None and scan.spam and verdict.policy == SpamGracePolicy.name:
                self.evidence.spam(snapshot, client, queue_id)
            return Acceptance(self.log(client, "DATA", verdict, queue_id=queue_id,
                                       **decision.found))
        assert scan is not None, "the content scan is one of the policies at DATA"
        self._log_shadows(decision, queue_id=queue_id)

        try:
            # Signed as it will be delivered; the trace headers added below are not signed.
            signed = await self.dkim.sign(snapshot.dkim, snapshot.tenants, client, content)
            record = SpoolRecord.new(
                queue_id=queue_id,
                session_id=client.sid,
                client_ip=client.ip,
                account=client.account.user if client.account else "",
                helo=client.helo,
                mail_from=transaction.mail_from,
                rcpt_tos=list(transaction.rcpt_tos),
                received_at=now,
                message=trace_headers(hostname, client, queue_id,
                                      spam_headers(scan, decision.skipped), now) + signed.content,
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
            return Acceptance(self.log(client, "DATA", verdict, queue_id=queue_id,
                                       **decision.found))
        if scan.spam:
            self.evidence.spam(snapshot, client, queue_id)
        # The reservation stands as the message's count: owners keep an open
        # reservation when it expires, so no confirm round trip is needed
        # before the 250 (only a failed spool write releases it).
        verdict = Verdict(Action.CONTINUE, replies.QUEUED.format(queue_id=queue_id),
                          "spam" if scan.spam else "data", "spam within grace" if scan.spam else "")
        return Acceptance(self.log(client, "DATA", verdict, queue_id=queue_id, **decision.found,
                                   recipients=len(transaction.rcpt_tos),
                                   size=len(record.message), dkim=signed.by,
                                   dkim_skipped=signed.skipped, **decision.noted), queue_id)

    def _log_unheard(self, client: Client, commit: asyncio.Future[SpoolError | None],
                     queue_id: str, size: int) -> None:
        """What became of a message whose client left before its reply."""
        if commit.cancelled() or commit.exception() is not None or commit.result() is not None:
            verdict = tempfail("spool", replies.SPOOL_TEMPFAIL.format(sid=client.sid),
                               "not stored; the client had left")
        else:
            verdict = Verdict(Action.CONTINUE, replies.QUEUED.format(queue_id=queue_id), "data",
                              "queued; the client left before the reply")
        self.log(client, "DATA", verdict, queue_id=queue_id, size=size)

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

    # -- a stage's policies ----------------------------------------------------------

    async def _decide(self, policies: Sequence[Policy], decision: Decision,
                      count: Count) -> Verdict:
        """The first refusal of ``policies``, in order, or CONTINUE.

        The policies before the first that needs counters are judged one by
        one; that one and every policy after it share one counter request.
        """
        for index, policy in enumerate(policies):
            ops = policy.ops(decision)
            if ops:
                return await self._counted(policies[index:], ops, decision, count)
            verdict = await policy.judge(decision, NO_COUNTS)
            if not verdict.ok:
                return verdict
        return CONTINUE

    async def _counted(self, policies: Sequence[Policy], first: Sequence[Op],
                       decision: Decision, count: Count) -> Verdict:
        asked = [first, *(policy.ops(decision) for policy in policies[1:])]
        try:
            outcome = await count([op for ops in asked for op in ops])
        except CounterUnavailable as exc:
            return tempfail("counters", replies.POLICY_TEMPFAIL.format(sid=decision.client.sid),
                            str(exc))
        start = 0
        for policy, ops in zip(policies, asked, strict=True):
            end = start + len(ops)
            denied = outcome.denied
            share = Counts(ops, outcome.counts[start:end],
                           denied - start if denied is not None and start <= denied < end
                           else None)
            verdict = await policy.judge(decision, share)
            if not verdict.ok:
                return verdict
            start = end
        return CONTINUE

    async def _check(self, ops: Sequence[Op]) -> Outcome:
        # Which op would not fit is judged here: a check across owners only counts.
        return judge(ops, (await self.counters.check(ops)).counts)

    async def _reserve(self, reservation: str, ops: Sequence[Op]) -> Outcome:
        try:
            return await self.counters.reserve(reservation, ops)
        except asyncio.CancelledError:
            self._release_later(reservation)  # the client is gone: count nothing
            raise

    def _log_shadows(self, decision: Decision, **extra: object) -> None:
        """Shadow limits (SPEC §3.12): where one would have refused, a ``shadow``
        decision with the reply it would have given; the transaction goes on."""
        for verdict, fields in decision.shadows:
            self.log(decision.client, decision.stage, verdict, **extra, **fields)

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
