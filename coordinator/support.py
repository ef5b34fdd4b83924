"""Support actions the coordinator carries out itself, and the audit trail of every change.

``account suspend|unsuspend``, ``tenant allow-country|disallow-country``
(``--for``: a time-limited exception kept in the state store; without it
the tenant file is edited, :mod:`coordinator.tenant_edit`) and
``tenant history``. Every change is made durable in the store first, then
put in force by publishing a new snapshot, then recorded in the audit log
with who, when, what, why and until when. Entries whose ``until`` passes
are removed by :meth:`SupportDesk.lapse` (workers already ignore them from
that moment) and the lapse is recorded too, once even when several hosts
share the store. :meth:`SupportDesk.sync` puts in force what another host
changed in a shared store; every change starts from it.

Changes are serialized by one lock, so two support staff changing the same
account at once end in one of their two states, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.admin_wire import (
    AllowCountryRequest,
    CountriesReply,
    CountriesRequest,
    DisallowCountryRequest,
    HistoryReply,
    HistoryRequest,
    SuspendRequest,
    SuspensionReply,
    UnsuspendRequest,
)
from cluster.logjson import log_event
from cluster.names import BadDomain, normalise_address, to_alabel
from cluster.settings import is_country_code
from cluster.support_state import (
    MAX_TEXT,
    AuditEntry,
    CountryException,
    SupportState,
    Suspension,
    iso_utc,
    text_problem,
)
from cluster.validate import parse_duration
from coordinator.errors import AdminError, NotFound, Unavailable
from coordinator.sources import SnapshotSources
from coordinator.state_store import StoreUnavailable, SupportStore
from coordinator.tenant_edit import EditError, edit_countries

SYSTEM = "sendguard"  # the ``by`` of what sendguard does by itself (a lapse)
AUTO = "auto"        # the ``by`` of a suspension made by compromise detection
LAPSE_SKEW = 5.0      # seconds: how far apart the hosts' clocks may be (they run NTP)


class SupportDesk:
    def __init__(self, store: SupportStore, sources: SnapshotSources,
                 publish: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.sources = sources
        self._publish = publish
        self._clock = clock
        self._lock = asyncio.Lock()
        # Told each account whose suspension another host lifted (compromise
        # detection forgets its evidence, as it does when support lifts one here).
        self.on_lifted: Callable[[str], None] = lambda account: None

    # -- suspensions -------------------------------------------------------------

    async def suspend(self, request: SuspendRequest) -> SuspensionReply:
        account = self._account(request.account)
        reason = text(request.reason, "reason", required=True)
        by = text(request.by, "by", required=True)
        lasting = duration(request.lasting, "for")
        async with self._lock:
            await self._sync()
            now = self._clock()
            item = Suspension(account, reason, by, now, None if lasting is None else now + lasting)
            await self._guard(self.store.put_suspension(item))
            await self._put_in_force(self.sources.support.with_suspension(item))
            await self.audit(by, "suspend", account, _domain_of(account), reason, item.until)
        log_event("account_suspended", account=account, by=by, reason=reason,
                  until=iso_utc(item.until))
        return SuspensionReply(account, True, True, **_suspension(item))

    async def unsuspend(self, request: UnsuspendRequest) -> SuspensionReply:
        account = normalised_account(request.account)
        by = text(request.by, "by", required=True)
        reason = text(request.reason, "reason")
        async with self._lock:
            await self._sync()
            current = self.sources.support.suspension(account, self._clock())
            if current is None:
                return SuspensionReply(account, False, False)
            await self._guard(self.store.drop_suspension(account))
            await self._put_in_force(self.sources.support.without_suspension(account))
            await self.audit(by, "unsuspend", account, _domain_of(account), reason,
                             details={"was": current.reason, "suspended_by": current.by})
        log_event("account_unsuspended", account=account, by=by)
        return SuspensionReply(account, False, True)

    async def suspend_automatically(self, account: str, reason: str, lasting: float,
                                    details: dict[str, Any]) -> Suspension | None:
        """Compromise detection's suspension (``by = "auto"``); None when the account is
        suspended already (one incident, one suspension) or no longer in the directory."""
        await self.lapse()  # a suspension that just ran out is recorded as lapsed first
        async with self._lock:
            await self._sync()  # suspended from another host already: that one stands
            now = self._clock()
            if (self.sources.tenants.directory.account(account) is None
                    or self.sources.support.suspension(account, now) is not None):
                return None
            item = Suspension(account, reason, AUTO, now, now + lasting)
            await self._guard(self.store.put_suspension(item))
            await self._put_in_force(self.sources.support.with_suspension(item))
            await self.audit(AUTO, "suspend", account, _domain_of(account), reason, item.until,
                             details)
        log_event("account_suspended", account=account, by=AUTO, reason=reason,
                  until=iso_utc(item.until), signal=details.get("signal"))
        return item

    def suspension_of(self, account: str) -> dict[str, Any] | None:
        found = self.sources.support.suspension(account, self._clock())
        return None if found is None else _suspension(found)

    # -- countries -----------------------------------------------------------------

    async def allow_country(self, request: AllowCountryRequest) -> CountriesReply:
        return await self._country(request, allow=True)

    async def disallow_country(self, request: DisallowCountryRequest) -> CountriesReply:
        return await self._country(request, allow=False)

    async def _country(self, request: AllowCountryRequest | DisallowCountryRequest,
                       allow: bool) -> CountriesReply:
        domain = self._domain(request.domain)
        given = request.country
        country = str("" if given is None else given).upper()
        if not is_country_code(country):
            raise AdminError(f'{given!r} is not a two-letter country code like "PL"')
        by = text(request.by, "by", required=True)
        reason = text(request.reason, "reason")
        lasting = duration(request.lasting, "for")
        if lasting is not None and not allow:
            raise AdminError("--for goes with allow-country only")
        async with self._lock:
            await self._sync()
            if lasting is not None:
                result = await self._grant(domain, country, by, reason, lasting)
            else:
                result = await self._edit(domain, country, by, reason, allow)
        return dataclasses.replace(self.countries_of(domain), **result)

    async def _grant(self, domain: str, country: str, by: str, reason: str,
                     lasting: float) -> dict[str, Any]:
        if country in self._permanent(domain):
            return {"changed": False, "note": f"{country} is allowed for {domain} already, "
                    "without a time limit"}
        now = self._clock()
        item = CountryException(domain, country, reason, by, now, now + lasting)
        await self._guard(self.store.put_exception(item))
        await self._put_in_force(self.sources.support.with_exception(item))
        await self.audit(by, "allow-country", domain, domain, reason, item.until,
                         details={"country": country})
        log_event("country_exception", domain=domain, country=country, by=by,
                  until=iso_utc(item.until))
        return {"changed": True, "granted": {"country": country, "until": iso_utc(item.until)}}

    async def _edit(self, domain: str, country: str, by: str, reason: str,
                    allow: bool) -> dict[str, Any]:
        settings = self.sources.settings
        try:
            edited = await asyncio.to_thread(
                edit_countries, settings.tenants_file, domain, country, allow,
                settings.geoip.default_countries)
        except (EditError, OSError) as exc:
            raise AdminError(str(exc)) from None
        changed = edited.changed
        if changed:
            log_event("tenant_edit", domain=edited.domain, countries=list(edited.countries),
                      allow=allow)
            self.sources.force_tenants()
        if not allow and country in self.sources.support.exceptions.get(domain, {}):
            await self._guard(self.store.drop_exception(domain, country))
            self.sources.set_support(self.sources.support.without_exception(domain, country))
            changed = True
        if changed:
            await self._publish()
            await self.audit(by, "allow-country" if allow else "disallow-country", domain,
                             domain, reason, details={"country": country})
        return {"changed": changed}

    def countries_of(self, domain: str) -> CountriesReply:
        now = self._clock()
        granted = self.sources.support.exceptions.get(domain, {})
        return CountriesReply(
            domain=domain,
            countries=sorted(self._permanent(domain)),
            exceptions=[{"country": e.country, "until": iso_utc(e.until), "reason": e.reason,
                         "by": e.by, "at": iso_utc(e.at)}
                        for e in sorted(granted.values(), key=lambda e: e.country)
                        if e.active(now)],
            tenants_version=self.sources.tenants.directory.version,
            config_version=self.sources.version,
        )

    def _permanent(self, domain: str) -> frozenset[str]:
        hosted = self.sources.tenants.directory.domain(domain)
        if hosted is None:
            return frozenset()
        return hosted.countries if hosted.countries is not None else \
            self.sources.settings.geoip.default_countries

    # -- the audit trail -------------------------------------------------------------

    async def audit(self, by: str, action: str, subject: str, domain: str, reason: str = "",
                    until: float | None = None, details: dict[str, Any] | None = None) -> None:
        entry = AuditEntry(self._clock(), by, action, subject, domain, reason, until,
                           details or {})
        try:
            await self.store.record(entry)
        except OSError as exc:
            # The change itself is made; losing its record must not undo it.
            log_event("audit_not_recorded", logging.ERROR, action=action, subject=subject,
                      by=by, error=str(exc))

    async def history(self, request: HistoryRequest) -> HistoryReply:
        domain = self._domain(request.domain, hosted=False)
        entries = await self._guard(self.store.history(domain))
        return HistoryReply(domain, [history_row(e) for e in entries])

    # -- lapses ------------------------------------------------------------------------

    async def lapse(self) -> int:
        """Remove what has run out and record it; returns how many entries went.

        Each removal and its record are one change of the store, made only
        if the entry is still there: with a shared store, the host that
        gets there first records it (``recorded`` in its log line), the
        others just stop publishing it."""
        if self.sources.support.lapsed(self._clock()) == ([], []):
            return 0
        async with self._lock:
            suspensions, exceptions = self.sources.support.lapsed(self._clock())
            support = self.sources.support
            for item in suspensions:
                entry = AuditEntry(self._clock(), SYSTEM, "suspension-lapsed", item.account,
                                   _domain_of(item.account), item.reason, item.until,
                                   {"suspended_by": item.by})
                recorded = await self._guard(self.store.expire_suspension(item, entry))
                log_event("suspension_lapsed", account=item.account, recorded=recorded)
                support = support.without_suspension(item.account)
            for grant in exceptions:
                entry = AuditEntry(self._clock(), SYSTEM, "exception-lapsed", grant.domain,
                                   grant.domain, grant.reason, grant.until,
                                   {"country": grant.country, "granted_by": grant.by})
                recorded = await self._guard(self.store.expire_exception(grant, entry))
                log_event("country_exception_lapsed", domain=grant.domain,
                          country=grant.country, recorded=recorded)
                support = support.without_exception(grant.domain, grant.country)
            await self._put_in_force(support)
        return len(suspensions) + len(exceptions)

    async def sync(self) -> bool:
        """Put in force what someone else changed in the store (another host's
        coordinator, with Redis); True when that changed anything. AdminError
        (Unavailable) when the store cannot be read: the state in force stays."""
        async with self._lock:
            return await self._sync()

    async def fresh(self) -> None:
        """Before showing suspensions or exceptions: another host's latest change (a
        shared store), when the store answers; else what is in force, at most a tick old."""
        with contextlib.suppress(AdminError):
            await self.sync()

    async def countries(self, request: CountriesRequest) -> CountriesReply:
        domain = self.hosted_domain(request.domain)
        await self.fresh()
        return self.countries_of(domain)

    async def _sync(self) -> bool:
        fresh = await self._guard(self.store.refresh())
        if fresh is None or fresh == self.sources.support:
            return False
        lifted = self._lifted(self.sources.support, fresh)
        await self._put_in_force(fresh)
        for account in lifted:
            self.on_lifted(account)
        log_event("support_state_synced", suspensions=len(fresh.suspensions),
                  exceptions=sum(len(per) for per in fresh.exceptions.values()))
        return True

    def _lifted(self, before: SupportState, after: SupportState) -> list[str]:
        """Accounts suspended in ``before`` and not in ``after`` while their suspension
        still ran: lifted by support on another host, not lapsed (a lapse removed
        by a host whose clock runs a little ahead counts as a lapse too)."""
        now = self._clock() + LAPSE_SKEW
        return [account for account, item in before.suspensions.items()
                if account not in after.suspensions and item.active(now)]

    # -- plumbing ----------------------------------------------------------------------

    async def _put_in_force(self, support: SupportState) -> None:
        self.sources.set_support(support)
        await self._publish()

    @staticmethod
    async def _guard(work: Awaitable[Any]) -> Any:
        try:
            return await work
        except StoreUnavailable as exc:
            raise Unavailable(f"the state store cannot be reached: {exc}") from None
        except OSError as exc:
            raise AdminError(f"the state store cannot be written: {exc}") from None

    def _account(self, raw: str) -> str:
        account = normalised_account(raw)
        if self.sources.tenants.directory.account(account) is None:
            raise NotFound(f"no account {account} in the tenant directory")
        return account

    def hosted_domain(self, raw: str) -> str:
        """``raw`` in A-label form; NotFound unless the tenant directory has it."""
        return self._domain(raw)

    def _domain(self, given: object, hosted: bool = True) -> str:
        raw = str(given)
        try:
            domain = to_alabel(raw)
        except BadDomain:
            raise AdminError(f"{raw!r} is not a domain name") from None
        if hosted and self.sources.tenants.directory.domain(domain) is None:
            raise NotFound(f"no domain {raw} in the tenant directory")
        return domain


def normalised_account(given: object) -> str:
    raw = str(given)
    try:
        return normalise_address(raw)
    except BadDomain:
        raise AdminError(f"{raw!r} is not an account like user@domain") from None


def text(value: object, name: str, required: bool = False) -> str:
    """A reason or a name as given: one printable line; "" when not given."""
    if value is None or value == "":
        if required:
            raise AdminError(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise AdminError(f"{name} must be one line of at most {MAX_TEXT} characters")
    problem = text_problem(value, name)
    if problem is not None:
        raise AdminError(problem)
    return value.strip()


def duration(value: Any, name: str) -> float | None:
    """Seconds of a duration like "12h" as given; None when not given."""
    if value is None or value == "":
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise AdminError(f'{name} must be a duration like "30m", "12h" or "7d" '
                           f"(got {value!r})") from None
    if seconds <= 0:
        raise AdminError(f"{name} must be longer than zero")
    return seconds


def history_row(entry: AuditEntry) -> dict[str, Any]:
    return {"ts": iso_utc(entry.ts), "by": entry.by, "action": entry.action,
            "subject": entry.subject, "reason": entry.reason, "until": iso_utc(entry.until),
            "details": dict(entry.details)}


def _suspension(item: Suspension) -> dict[str, Any]:
    return {"reason": item.reason, "by": item.by, "at": iso_utc(item.at),
            "until": iso_utc(item.until)}


def _domain_of(account: str) -> str:
    return account.rpartition("@")[2]
