"""The tenant directory: hosted domains, their aliases and countries, accounts.

Loaded from ``tenants.file`` (SPEC §5) into an immutable snapshot; domains are
stored in A-label form so lookups work whichever form the client used.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.names import BadDomain, normalise_address, split_address, to_alabel
from cluster.passwords import PasswordSchemeError, check_scheme
from cluster.settings import Limit, is_country_code, read_limits
from cluster.validate import ConfigError, Section, read_toml

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    aliases: frozenset[str]
    countries: frozenset[str] | None
    limits: tuple[Limit, ...] | None
    dkim_selector: str | None = None  # signs this domain's and its aliases' mail


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    domain: str
    password: str
    alternate_sender: str | None
    limits: tuple[Limit, ...] | None


@dataclass(frozen=True, slots=True)
class TenantDirectory:
    domains: dict[str, Domain]
    accounts: dict[str, Account]
    version: str = ""

    def account(self, user: str) -> Account | None:
        try:
            return self.accounts.get(normalise_address(user))
        except BadDomain:
            return None

    def domain(self, name: str) -> Domain | None:
        return self.domains.get(name)

    def sender_domains(self, account: Account) -> frozenset[str]:
        domain = self.domains[account.domain]
        return domain.aliases | {domain.name}

    def countries(self, account: Account, default: frozenset[str]) -> frozenset[str]:
        countries = self.domains[account.domain].countries
        return default if countries is None else countries

    def limits(self, account: Account, default: tuple[Limit, ...]) -> tuple[Limit, ...]:
        if account.limits is not None:
            return account.limits
        domain_limits = self.domains[account.domain].limits
        return default if domain_limits is None else domain_limits


def load_tenants(path: str | Path) -> TenantDirectory:
    return read_tenant_file(path)[0]


def read_tenant_file(path: str | Path) -> tuple[TenantDirectory, dict[str, Any]]:
    """The validated directory and the plain data it was built from (workers rebuild it)."""
    path = Path(path)
    blob, data = read_toml(path)
    version = hashlib.blake2b(blob, digest_size=6).hexdigest()
    return parse_tenants(path, data, version=version), data


def parse_tenants(path: Path, data: dict[str, Any], version: str = "") -> TenantDirectory:
    top = Section(path, "", data)
    domains_raw = Section(path, "domains", top.raw("domains"))
    accounts_raw = Section(path, "accounts", top.raw("accounts"))
    top.reject_unknown()

    domains: dict[str, Domain] = {}
    for name in domains_raw.data:
        domain = _domain(Section(path, f'domains."{name}"', domains_raw.raw(name)), name)
        if domain.name in domains:
            raise domains_raw.error(f'"{name}"', "is listed twice", name)
        domains[domain.name] = domain

    accounts: dict[str, Account] = {}
    for user in accounts_raw.data:
        account = _account(Section(path, f'accounts."{user}"', accounts_raw.raw(user)), user)
        if account.domain not in domains:
            raise ConfigError(path, f'accounts."{user}"',
                              f'its domain is not listed under [domains."{account.domain}"]', user)
        if account.user in accounts:
            raise ConfigError(path, f'accounts."{user}"', "is listed twice", user)
        accounts[account.user] = account
    return TenantDirectory(domains=domains, accounts=accounts, version=version)


def _domain(s: Section, name: str) -> Domain:
    try:
        alabel = to_alabel(name)
    except BadDomain:
        raise ConfigError(s.file, s.prefix, "is not a domain name", name) from None
    aliases = []
    for alias in s.strings("aliases", []):
        try:
            aliases.append(to_alabel(alias))
        except BadDomain:
            raise s.error("aliases", "lists something that is not a domain name", alias) from None
    countries = None
    if s.has("countries"):
        codes = s.strings("countries", [])
        for code in codes:
            if not is_country_code(code):
                raise s.error("countries", 'must list two-letter country codes like "PL"', code)
        countries = frozenset(code.upper() for code in codes)
    limits = read_limits(s.file, s.key("limits"), s.raw("limits"), ()) if s.has("limits") else None
    selector = s.string("dkim_selector", "") or None
    if selector is not None and not selector_ok(selector):
        # It names a DNS record and a file: labels of letters, digits and hyphens only.
        raise s.error("dkim_selector", 'must be a DNS label like "sg2026" (letters, digits, '
                      "hyphens; dots between labels)", selector)
    s.reject_unknown()
    return Domain(alabel, frozenset(aliases), countries, limits, selector)


def selector_ok(selector: str) -> bool:
    return len(selector) <= 200 and _SELECTOR.fullmatch(selector) is not None


def _account(s: Section, user: str) -> Account:
    try:
        _, domain = split_address(user)
        normalised = normalise_address(user)
    except BadDomain:
        raise ConfigError(s.file, s.prefix, "is not an address like user@domain", user) from None
    password = s.string("password")
    try:
        check_scheme(password)
    except PasswordSchemeError as exc:
        raise s.error("password", str(exc), _redact(password)) from None
    alternate = s.string("alternate_sender", "") or None
    if alternate is not None:
        try:
            alternate = normalise_address(alternate)
        except BadDomain:
            raise s.error("alternate_sender", "is not an address like user@domain",
                          alternate) from None
    limits = read_limits(s.file, s.key("limits"), s.raw("limits"), ()) if s.has("limits") else None
    s.reject_unknown()
    return Account(normalised, domain, password, alternate, limits)


def _redact(password: str) -> str:
    # Never echo a {PLAIN} password into a log or terminal.
    scheme, closing, _ = password.partition("}")
    return f"{scheme}}}..." if closing else "..."
