"""The AUTH decision (SPEC §3.1): throttle, verify, and nothing an attacker can race.

Order, for one AUTH whose credentials have been read:

1. A failure is counted before anything is verified: a reservation of one
   on the client's ``auth-fail:`` key, refused when the address already has
   ``auth.max_failures`` in ``auth.failure_window`` (454). Racing AUTHs from
   one address therefore never get more than ``max_failures``
   verifications, and an AUTH abandoned mid-check (the client hung up, the
   task was cancelled) leaves its failure behind. Only a success releases
   the reservation. Trusted networks are not counted.
2. An authorization id that is neither empty nor the login is a failure.
3. The password is verified in the hashing pool; an unknown user is
   verified against a decoy hash of the scheme and cost most accounts use,
   so neither the reply nor its timing reveals whether the account exists.
   When more than ``auth.max_pending`` verifications already wait for a
   thread, the AUTH gets 454 and its reservation is released (the client
   did nothing wrong).

An internal error releases the reservation too (nothing counted) and goes
on to the SMTP layer, which answers 451.

One shortcut: credentials the verifier's cache knows as good (this exact
user, stored hash and password succeeded lately) need no hashing, so they
need no failure slot either; they only read the address's failures (454
when it is locked out). Only the right password can take that path, and
it spares the busy client that logs in for every message a reservation
and its release.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

from cluster.counting import Op, judge
from cluster.logjson import log_event
from cluster.names import BadDomain, normalise_address
from cluster.passwords import PasswordSchemeError
from cluster.tenants import Account, TenantDirectory
from worker import replies
from worker.auth import PasswordVerifier, VerifierBusy, typical_hash
from worker.client import Client
from worker.counters.client import CounterClient, CounterUnavailable
from worker.policies import Action, Verdict, reject, tempfail
from worker.policies.auth_throttle import AuthThrottlePolicy
from worker.policies.base import Counts, Decision
from worker.sasl import Credentials
from worker.snapshot import Snapshot

_attempts = itertools.count()


class Authenticator:
    def __init__(self, snapshot: Callable[[], Snapshot], counters: CounterClient,
                 verifier: PasswordVerifier, release: Callable[[str], None]) -> None:
        self.snapshot = snapshot
        self.counters = counters
        self.verifier = verifier
        self.throttle = AuthThrottlePolicy()
        # Undoes a reservation without making the client wait for it.
        self._release = release
        self._decoy_for: tuple[TenantDirectory | None, str | None] = (None, None)

    async def authenticate(self, client: Client, credentials: Credentials) -> Verdict:
        """The verdict for one AUTH; sets ``client.account`` on success. Not logged here."""
        snapshot = self.snapshot()
        decision = Decision(snapshot, client, "AUTH")
        ops = self.throttle.ops(decision)
        known = self._known_good(snapshot, credentials)
        if known is not None:
            return await self._without_hashing(decision, ops, known)
        reservation = ""
        if ops:
            reservation = f"{client.sid}.auth{next(_attempts)}"
            try:
                outcome = await self.counters.reserve(reservation, ops)
            except CounterUnavailable as exc:
                return _counter_tempfail(client, exc)
            if not outcome.ok:
                return await self.throttle.judge(decision, Counts(ops, outcome.counts,
                                                                  outcome.denied))
        try:
            verdict = await self._verify(snapshot, client, credentials)
        except VerifierBusy as exc:
            self._undo(reservation)
            return tempfail(self.throttle.name, replies.AUTH_THROTTLED.format(sid=client.sid),
                            f"hashing queue full ({exc})")
        except Exception:
            self._undo(reservation)
            raise
        # Cancelled (the client hung up): CancelledError is no Exception, so
        # the reservation stays and the abandoned AUTH counts as a failure.
        if verdict.ok:
            self._undo(reservation)
        return verdict

    def _known_good(self, snapshot: Snapshot, credentials: Credentials) -> Account | None:
        """The account, when these exact credentials succeeded lately (the verifier's cache).

        Only the right password can hit that cache, and it costs no hash: such a
        login needs no failure slot, so the busy client that logs in for every
        message pays one counter read instead of a reservation and its release.
        """
        if credentials.authzid and not _same_user(credentials.authzid, credentials.login):
            return None
        account = snapshot.tenants.account(credentials.login)
        if account is None:
            return None
        if self.verifier.known_good(account.user, account.password, credentials.password):
            return account
        return None

    async def _without_hashing(self, decision: Decision, ops: Sequence[Op],
                               account: Account) -> Verdict:
        # A locked-out address stays locked out, whatever it knows.
        client = decision.client
        if ops:
            try:
                counts = (await self.counters.check(ops)).counts
            except CounterUnavailable as exc:
                return _counter_tempfail(client, exc)
            # Would one more failure fit? (The check itself counts nothing.)
            verdict = await self.throttle.judge(decision, Counts(ops, counts,
                                                                 judge(ops, counts).denied))
            if not verdict.ok:
                return verdict
        client.account = account
        return Verdict(Action.CONTINUE, replies.AUTH_OK, "auth")

    def _undo(self, reservation: str) -> None:
        if reservation:
            self._release(reservation)

    async def _verify(self, snapshot: Snapshot, client: Client,
                      credentials: Credentials) -> Verdict:
        failed = reject("auth", replies.AUTH_FAILED.format(sid=client.sid))
        if credentials.authzid and not _same_user(credentials.authzid, credentials.login):
            return _because(failed, "authorization id names another user")
        max_waiting = snapshot.settings.auth.max_pending
        account = snapshot.tenants.account(credentials.login)
        if account is None:
            model = self._decoy_model(snapshot.tenants)
            if model is not None:
                await self.verifier.verify_decoy(model, credentials.password,
                                                 max_waiting=max_waiting)
            return _because(failed, "unknown user")
        try:
            ok = await self.verifier.verify(account.user, account.password, credentials.password,
                                            max_waiting=max_waiting)
        except PasswordSchemeError as exc:
            log_event("bad_password_hash", logging.ERROR, sid=client.sid, account=account.user,
                      error=str(exc))
            return _because(failed, "stored password unusable")
        if not ok:
            return _because(failed, "wrong password")
        client.account = account
        return Verdict(Action.CONTINUE, replies.AUTH_OK, "auth")

    def _decoy_model(self, tenants: TenantDirectory) -> str | None:
        directory, model = self._decoy_for
        if directory is not tenants:
            model = typical_hash(a.password for a in tenants.accounts.values())
            self._decoy_for = (tenants, model)
        return model


def _counter_tempfail(client: Client, exc: Exception) -> Verdict:
    return tempfail("auth_throttle", replies.POLICY_TEMPFAIL.format(sid=client.sid), str(exc))


def _same_user(authzid: str, login: str) -> bool:
    if authzid == login:
        return True
    try:
        return normalise_address(authzid) == normalise_address(login)
    except BadDomain:
        return False


def _because(verdict: Verdict, detail: str) -> Verdict:
    return Verdict(verdict.action, verdict.reply, verdict.policy, detail)
