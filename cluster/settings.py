"""The validated, immutable configuration snapshot (SPEC §5).

``load_settings(path)`` reads the TOML file, applies every default and
returns a frozen :class:`Settings`; anything wrong raises
:class:`~cluster.validate.ConfigError` naming the file, the key and the value.
The tenant directory is a separate file with its own loader
(:mod:`cluster.tenants`), because it is reloaded live.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cluster.hostport import split_host_port
from cluster.validate import ConfigError, Section, read_duration, read_toml

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


COUNT_MESSAGES = "messages"
COUNT_RECIPIENTS = "recipients"
MODE_ENFORCE = "enforce"
MODE_SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class Limit:
    """One rate-limit window (SPEC §3.4, §3.11, §3.12).

    ``count``: what one accepted message adds, 1 (``messages``) or its
    accepted recipients (``recipients``). ``mode``: ``enforce`` refuses,
    ``shadow`` only logs where it would refuse.
    """

    window: float
    max: int
    count: str = COUNT_MESSAGES
    mode: str = MODE_ENFORCE

    @property
    def shadow(self) -> bool:
        return self.mode == MODE_SHADOW


DEFAULT_LIMITS = (Limit(60.0, 250), Limit(3600.0, 1000), Limit(43200.0, 10000))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    hostname: str
    listen: tuple[tuple[str, int], ...]
    listen_tls: tuple[tuple[str, int], ...]
    tls_cert: Path | None
    tls_key: Path | None
    require_tls_for_auth: bool
    proxy_protocol: bool
    proxy_networks: tuple[Network, ...]
    proxy_timeout: float
    trusted_networks: tuple[Network, ...]
    max_message_size: int
    max_recipients: int
    workers: int
    drain_timeout: float
    max_connections_per_ip: int   # 0: no cap
    command_timeout: float
    max_session_time: float
    max_errors: int               # 0: no limit


@dataclass(frozen=True, slots=True)
class PolicySettings:
    from_alignment: str           # enforce | log | off


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    request_timeout: float
    runtime_dir: Path
    state_dir: Path


@dataclass(frozen=True, slots=True)
class CounterSettings:
    backend: str                                # "ring" | "redis"
    redis_url: str                              # one server
    redis_cluster: tuple[tuple[str, int], ...]  # Redis Cluster seed nodes


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: tuple[str, int] | None
    users_file: Path | None
    # For ``sendguard why``: how many recent decisions the host keeps in memory (shared
    # out among its workers), and for how long.
    recent_decisions: int
    recent_decisions_for: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    max_failures: int
    failure_window: float
    max_pending: int


@dataclass(frozen=True, slots=True)
class GeoipSettings:
    database: Path | None
    default_countries: frozenset[str]
    unknown: str


@dataclass(frozen=True, slots=True)
class BounceSettings:
    window: float
    min_messages: int
    max_ratio: float


@dataclass(frozen=True, slots=True)
class SpamSettings:
    backend: str
    rspamd_spam_actions: tuple[str, ...]
    url: str
    grace: int
    window: float
    on_error: str
    timeout: float


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[str, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    mode: str
    tls: str                      # may | encrypt | verify
    tls_ca: Path | None
    smarthost: str
    port: int
    spool: Path
    retry: tuple[float, ...]
    max_queue_time: float


@dataclass(frozen=True, slots=True)
class DkimSettings:
    keys_dir: Path  # {keys_dir}/{domain}/{selector}.pem


@dataclass(frozen=True, slots=True)
class CompromiseSettings:
    """SPEC §3.10: when an account counts as compromised, and what then."""

    window: float
    countries: int            # distinct countries of successful logins; 0: not a signal
    spam_messages: int        # spam-classified messages; 0: not a signal
    suspend_for: float
    notify_url: str           # "" : no notification


@dataclass(frozen=True, slots=True)
class Settings:
    path: Path
    server: ServerSettings
    policy: PolicySettings
    tenants_file: Path
    cluster: ClusterSettings
    counters: CounterSettings
    metrics_listen: tuple[str, int] | None
    admin: AdminSettings
    auth: AuthSettings
    geoip: GeoipSettings
    limits: tuple[Limit, ...]
    bounce: BounceSettings
    spam: SpamSettings
    dns: DnsSettings
    log_file: Path | None
    delivery: DeliverySettings
    dkim: DkimSettings
    compromise: CompromiseSettings | None = None  # None: [compromise] absent, detection off
    raw: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)


def load_settings(path: str | Path) -> Settings:
    path = Path(path).absolute()
    return parse_settings(path, read_toml(path)[1])


def parse_settings(path: Path, data: dict[str, Any]) -> Settings:
    top = Section(path, "", data)
    base = path.parent
    settings = Settings(
        path=path,
        server=_server(Section(path, "server", top.raw("server")), base),
        policy=_policy(Section(path, "policy", top.raw("policy"))),
        tenants_file=_tenants_file(Section(path, "tenants", top.raw("tenants")), base),
        cluster=_cluster(Section(path, "cluster", top.raw("cluster")), path),
        counters=_counters(Section(path, "counters", top.raw("counters"))),
        metrics_listen=_metrics(Section(path, "metrics", top.raw("metrics"))),
        admin=_admin(Section(path, "admin", top.raw("admin")), base),
        auth=_auth(Section(path, "auth", top.raw("auth"))),
        geoip=_geoip(Section(path, "geoip", top.raw("geoip")), base),
        limits=read_limits(path, "limits", top.raw("limits"), DEFAULT_LIMITS),
        bounce=_bounce(Section(path, "bounce", top.raw("bounce"))),
        spam=_spam(Section(path, "spam", top.raw("spam"))),
        dns=_dns(Section(path, "dns", top.raw("dns"))),
        log_file=_log(Section(path, "log", top.raw("log")), base),
        delivery=_delivery(Section(path, "delivery", top.raw("delivery")), base),
        dkim=_dkim(Section(path, "dkim", top.raw("dkim")), base),
        compromise=_compromise(Section(path, "compromise", top.raw("compromise")),
                               geoip=top.raw("geoip"), present=top.has("compromise")),
        raw=data,
    )
    top.reject_unknown()
    return settings


def read_limits(file: Path, key: str, value: Any, default: tuple[Limit, ...]) -> tuple[Limit, ...]:
    """A ``[[limits]]`` array (or an inline ``limits = [...]`` of a tenant)."""
    if value is None:
        return default
    if not isinstance(value, list):
        raise ConfigError(file, key, "must be a list of {window, max} tables", value)
    limits = []
    for index, item in enumerate(value):
        section = Section(file, f"{key}[{index}]", item)
        for name in ("window", "max"):
            if not section.has(name):
                raise section.error(name, "is required", show_value=False)
        window = read_duration(section, "window", section.raw("window"))
        maximum = section.integer("max", -1, minimum=0)
        count = section.choice("count", COUNT_MESSAGES, (COUNT_MESSAGES, COUNT_RECIPIENTS))
        mode = section.choice("mode", MODE_ENFORCE, (MODE_ENFORCE, MODE_SHADOW))
        section.reject_unknown()
        limits.append(Limit(window, maximum, count, mode))
    # One enforced and one shadow limit may share a window (trying a new
    # maximum beside the current one); two of the same kind would be two
    # maxima for one count.
    kinds = [(limit.window, limit.count, limit.mode) for limit in limits]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(file, key, "lists the same window twice", value)
    return tuple(limits)


def _server(s: Section, base: Path) -> ServerSettings:
    listen_tls = s.endpoints("listen_tls", [])
    cert = s.path("tls_cert", "", base)
    key = s.path("tls_key", "", base)
    if listen_tls and cert is None:
        raise s.error("listen_tls", "needs server.tls_cert", list(s.raw("listen_tls")))
    if (cert is None) != (key is None):
        raise s.error("tls_key" if key is None else "tls_cert",
                      "must be set together with server.tls_cert and server.tls_key",
                      s.raw("tls_key") if key is None else s.raw("tls_cert"))
    proxy_protocol = s.boolean("proxy_protocol", False)
    proxy_networks = s.networks("proxy_networks")
    if proxy_protocol and not proxy_networks:
        raise s.error("proxy_networks", "must list the load balancers when proxy_protocol is on",
                      [])
    settings = ServerSettings(
        hostname=s.string("hostname", socket.getfqdn()) or socket.getfqdn(),
        listen=s.endpoints("listen", ["0.0.0.0:587"]),
        listen_tls=listen_tls,
        tls_cert=cert,
        tls_key=key,
        require_tls_for_auth=s.boolean("require_tls_for_auth", True),
        proxy_protocol=proxy_protocol,
        proxy_networks=proxy_networks,
        proxy_timeout=s.duration("proxy_timeout", "5s"),
        trusted_networks=s.networks("trusted_networks"),
        max_message_size=s.integer("max_message_size", 36700160, minimum=1),
        max_recipients=s.integer("max_recipients", 100, minimum=1),
        workers=s.integer("workers", 0, minimum=0),
        drain_timeout=s.duration("drain_timeout", "10s", allow_zero=True),
        max_connections_per_ip=s.integer("max_connections_per_ip", 20, minimum=0),
        command_timeout=s.duration("command_timeout", "5m"),
        max_session_time=s.duration("max_session_time", "1h"),
        max_errors=s.integer("max_errors", 10, minimum=0),
    )
    if not settings.listen and not settings.listen_tls:
        raise s.error("listen", "no listening address: set server.listen or server.listen_tls", [])
    s.reject_unknown()
    return settings


def _policy(s: Section) -> PolicySettings:
    settings = PolicySettings(
        from_alignment=s.choice("from_alignment", "enforce", ("enforce", "log", "off")),
    )
    s.reject_unknown()
    return settings


def _tenants_file(s: Section, base: Path) -> Path:
    value = s.raw("file")
    if value is None or value == "":
        raise s.error("file", "is required: the tenant directory", show_value=value is not None)
    path = s.path("file", "", base)
    assert path is not None
    s.reject_unknown()
    return path


def _cluster(s: Section, config_path: Path) -> ClusterSettings:
    runtime = s.string("runtime_dir", "")
    if runtime:
        runtime_dir = Path(runtime)
        if not runtime_dir.is_absolute():
            runtime_dir = config_path.parent / runtime_dir
    else:
        runtime_dir = default_runtime_dir()
    settings = ClusterSettings(
        request_timeout=s.duration("request_timeout", "500ms"),
        runtime_dir=runtime_dir,
        state_dir=_state_dir(s, config_path.parent),
    )
    s.reject_unknown()
    return settings


def _state_dir(s: Section, base: Path) -> Path:
    path = s.path("state_dir", "", base) or default_state_dir()
    if path.exists() and not path.is_dir():
        raise s.error("state_dir", "is not a folder", str(path))
    return path


def default_state_dir() -> Path:
    """Where the coordinator keeps suspensions, country exceptions and the audit log."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)  # StateDirectory= of the service unit
    if os.geteuid() == 0:
        return Path("/var/lib/sendguard")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG specification says to ignore a relative value.
    base = Path(xdg) if xdg.startswith("/") else Path.home() / ".local" / "state"
    return base / "sendguard"


_REDIS_SCHEMES = ("redis", "rediss", "unix")
DNS_PORT = 53


def _counters(s: Section) -> CounterSettings:
    backend = s.choice("backend", "ring", ("ring", "redis"))
    url = s.string("redis_url", "")
    nodes = s.strings("redis_cluster", [])
    if backend == "ring":
        # A Redis address left with the ring would look shared and not be.
        for name, value in (("redis_url", url), ("redis_cluster", list(nodes))):
            if value:
                raise s.error(name, 'is only used with counters.backend = "redis"', value)
    elif url and nodes:
        raise s.error("redis_cluster", "set either counters.redis_url (one server) or "
                      "counters.redis_cluster (seed nodes), not both", list(nodes))
    elif not url and not nodes:
        raise s.error("redis_url", 'with counters.backend = "redis", set redis_url (one '
                      "server) or redis_cluster (seed nodes of a Redis Cluster)", url)
    if url:
        parsed = urlsplit(url)
        if parsed.scheme not in _REDIS_SCHEMES or not (parsed.hostname or parsed.path):
            raise s.error("redis_url", 'must be like "redis://HOST:PORT/DB" (or rediss://, '
                          "unix://)", url)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise s.error("redis_url", "has a bad port", url)
    seeds = []
    for item in nodes:
        try:
            seeds.append(split_host_port(item))
        except ValueError:
            raise s.error("redis_cluster", 'must list seed nodes like "10.0.0.5:7000"',
                          item) from None
    settings = CounterSettings(backend=backend, redis_url=url, redis_cluster=tuple(seeds))
    s.reject_unknown()
    return settings


def default_runtime_dir() -> Path:
    """Where the ipc sockets and the lock live when ``cluster.runtime_dir`` is empty.

    The folder systemd made for the service (``RuntimeDirectory=``, passed as
    ``$RUNTIME_DIRECTORY``), else ``/run/sendguard`` for root, else
    ``$XDG_RUNTIME_DIR/sendguard`` (a 0700 folder of the user's own), else
    ``/tmp/sendguard-UID``. Whichever it is, the supervisor refuses to start
    unless it is a real folder of this user with no group or other access
    (``cluster.supervisor.lock_runtime_dir``), so a folder someone else made
    in ``/tmp`` beforehand cannot capture the sockets. ipc:// paths must stay
    under ~107 bytes, so a long ``$XDG_RUNTIME_DIR`` is not used.
    """
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if systemd and len(systemd) <= 60:
        return Path(systemd)
    if os.geteuid() == 0:
        return Path("/run/sendguard")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and len(xdg) <= 40:
        return Path(xdg) / "sendguard"
    return Path(f"/tmp/sendguard-{os.geteuid()}")


def _metrics(s: Section) -> tuple[str, int] | None:
    value = s.string("listen", "")
    s.reject_unknown()
    if not value:
        return None
    from cluster.validate import read_endpoint

    return read_endpoint(s, "listen", value)


def _admin(s: Section, base: Path) -> AdminSettings:
    from cluster.validate import read_endpoint

    listen = s.string("listen", "")
    users_file = s.path("users_file", "", base)
    if listen and users_file is None:
        raise s.error("users_file", "is required when admin.listen is set", "")
    settings = AdminSettings(
        listen=read_endpoint(s, "listen", listen) if listen else None,
        users_file=users_file,
        recent_decisions=s.integer("recent_decisions", 2_000_000, minimum=0),
        recent_decisions_for=s.duration("recent_decisions_for", "24h"),
    )
    s.reject_unknown()
    return settings


def _auth(s: Section) -> AuthSettings:
    settings = AuthSettings(
        max_failures=s.integer("max_failures", 10, minimum=1),
        failure_window=s.duration("failure_window", "10m"),
        max_pending=s.integer("max_pending", 64, minimum=1),
    )
    s.reject_unknown()
    return settings


def _geoip(s: Section, base: Path) -> GeoipSettings:
    countries = s.strings("default_countries", ["PL"])
    for code in countries:
        if not is_country_code(code):
            raise s.error("default_countries", "must list two-letter country codes like \"PL\"",
                          code)
    settings = GeoipSettings(
        database=s.path("database", "", base),
        default_countries=frozenset(c.upper() for c in countries),
        unknown=s.choice("unknown", "allow", ("allow", "reject")),
    )
    s.reject_unknown()
    return settings


def is_country_code(code: object) -> bool:
    return isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha()


def _bounce(s: Section) -> BounceSettings:
    settings = BounceSettings(
        window=s.duration("window", "1h"),
        min_messages=s.integer("min_messages", 100, minimum=1),
        max_ratio=s.number("max_ratio", 0.5, 0.0, 1.0),
    )
    s.reject_unknown()
    return settings


def _spam(s: Section) -> SpamSettings:
    backend = s.choice("backend", "builtin", ("builtin", "rspamd", "spamd"))
    url = s.string("url", "")
    if backend != "builtin" and not url:
        raise s.error("url", f"is required with spam.backend = \"{backend}\"", url)
    settings = SpamSettings(
        backend=backend,
        rspamd_spam_actions=s.strings("rspamd_spam_actions", ["reject"]),
        url=url,
        grace=s.integer("grace", 3, minimum=0),
        window=s.duration("window", "1h"),
        on_error=s.choice("on_error", "tempfail", ("tempfail", "accept")),
        timeout=s.duration("timeout", "10s"),
    )
    s.reject_unknown()
    return settings


def _dns(s: Section) -> DnsSettings:
    nameservers = s.strings("nameservers", [])
    for item in nameservers:
        try:
            ipaddress.ip_address(split_host_port(item, DNS_PORT)[0])
        except ValueError:
            raise s.error("nameservers", 'must list addresses like "127.0.0.1" or '
                          '"127.0.0.1:5353"', item) from None
    settings = DnsSettings(nameservers=nameservers, timeout=s.duration("timeout", "5s"))
    s.reject_unknown()
    return settings


def _log(s: Section, base: Path) -> Path | None:
    path = s.path("file", "", base)
    s.reject_unknown()
    return path


def _dkim(s: Section, base: Path) -> DkimSettings:
    keys_dir = s.path("keys_dir", "dkim", base)
    if keys_dir is None:
        raise s.error("keys_dir", "must name a folder", "")
    s.reject_unknown()
    return DkimSettings(keys_dir=keys_dir)


def _delivery(s: Section, base: Path) -> DeliverySettings:
    mode = s.choice("mode", "mx", ("mx", "smarthost"))
    smarthost = s.string("smarthost", "")
    if mode == "smarthost":
        try:
            split_host_port(smarthost)
        except ValueError:
            raise s.error("smarthost", 'must be "HOST:PORT" with delivery.mode = "smarthost"',
                          smarthost) from None
    retry_raw = s.raw("retry", ["1m", "5m", "15m", "1h", "4h"])
    if not isinstance(retry_raw, list) or not retry_raw:
        raise s.error("retry", "must be a non-empty list of durations", retry_raw)
    retry = tuple(read_duration(s, "retry", item) for item in retry_raw)
    spool = s.path("spool", "/var/spool/sendguard", base)
    if spool is None:
        raise s.error("spool", "must name a folder", "")
    settings = DeliverySettings(
        mode=mode,
        tls=s.choice("tls", "may", ("may", "encrypt", "verify")),
        tls_ca=s.path("tls_ca", "", base),
        smarthost=smarthost,
        port=s.integer("port", 25, minimum=1),
        spool=spool,
        retry=retry,
        max_queue_time=s.duration("max_queue_time", "5d"),
    )
    if settings.port > 65535:
        raise s.error("port", "must be a TCP port (1-65535)", settings.port)
    s.reject_unknown()
    return settings


def _compromise(s: Section, geoip: Any, present: bool) -> CompromiseSettings | None:
    if not present:
        s.reject_unknown()
        return None
    countries = s.integer("countries", 3, minimum=0)
    if countries == 1:
        # One country is every login: the account would be suspended at its first.
        raise s.error("countries", "must be at least 2 (or 0: not a signal)", countries)
    database = geoip.get("database", "") if isinstance(geoip, dict) else ""
    if countries and not database:
        raise s.error("countries", "needs geoip.database to place logins in countries; "
                      "set 0 to watch spam only", countries)
    url = s.string("notify_url", "")
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise s.error("notify_url", 'must be "" or an http:// or https:// URL', url)
    settings = CompromiseSettings(
        window=s.duration("window", "1h"),
        countries=countries,
        spam_messages=s.integer("spam_messages", 3, minimum=0),
        suspend_for=s.duration("suspend_for", "24h"),
        notify_url=url,
    )
    s.reject_unknown()
    return settings
