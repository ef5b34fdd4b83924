"""Configuration loading: every default, and the exact message for each kind of bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.settings import DEFAULT_LIMITS, Limit, load_settings
from cluster.tenants import load_tenants
from cluster.validate import ConfigError, parse_duration

MINIMAL = '[tenants]\nfile = "tenants.toml"\n'


def write(folder: Path, text: str, name: str = "sendguard.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value)


def tenants_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_tenants(path)
    return str(caught.value)


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("12h", 43200.0), ("5d", 432000.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2", "1.5s", "2 s", "s", "-1s", "1w", "", "1m30s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    server = settings.server
    assert server.listen == (("0.0.0.0", 587),)
    assert server.listen_tls == ()
    assert server.require_tls_for_auth is True
    assert server.proxy_protocol is False
    assert server.proxy_timeout == 5.0
    assert server.max_message_size == 36700160
    assert server.max_recipients == 100
    assert server.workers == 0
    assert server.drain_timeout == 10.0
    assert (server.max_connections_per_ip, server.command_timeout, server.max_session_time,
            server.max_errors) == (20, 300.0, 3600.0, 10)
    assert settings.policy.from_alignment == "enforce"
    assert settings.tenants_file == tmp_path / "tenants.toml"
    assert settings.cluster.request_timeout == 0.5
    assert settings.counters.backend == "ring"
    assert settings.counters.redis_url == ""
    assert settings.counters.redis_cluster == ()
    assert len(str(settings.cluster.runtime_dir)) < 60
    assert settings.metrics_listen is None
    assert settings.auth.max_failures == 10
    assert settings.auth.failure_window == 600.0
    assert settings.auth.max_pending == 64
    assert settings.geoip.database is None
    assert settings.geoip.default_countries == frozenset({"PL"})
    assert settings.geoip.unknown == "allow"
    assert settings.limits == DEFAULT_LIMITS == (
        Limit(60.0, 250), Limit(3600.0, 1000), Limit(43200.0, 10000))
    assert (settings.bounce.window, settings.bounce.min_messages, settings.bounce.max_ratio) == (
        3600.0, 100, 0.5)
    spam = settings.spam
    assert (spam.backend, spam.rspamd_spam_actions, spam.url, spam.grace, spam.window,
            spam.on_error, spam.timeout) == ("builtin", ("reject",), "", 3, 3600.0, "tempfail",
                                             10.0)
    assert settings.dns.nameservers == () and settings.dns.timeout == 5.0
    assert settings.log_file is None
    delivery = settings.delivery
    assert (delivery.mode, delivery.smarthost, delivery.port) == ("mx", "", 25)
    assert (delivery.tls, delivery.tls_ca) == ("may", None)
    assert delivery.spool == Path("/var/spool/sendguard")
    assert delivery.retry == (60.0, 300.0, 900.0, 3600.0, 14400.0)
    assert delivery.max_queue_time == 432000.0
    admin = settings.admin
    assert (admin.listen, admin.users_file, admin.recent_decisions,
            admin.recent_decisions_for) == (None, None, 2_000_000, 86400.0)


def test_state_dir_defaults_by_user_and_follows_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    if os.geteuid() == 0:
        assert load_settings(path).cluster.state_dir == Path("/var/lib/sendguard")
    else:
        monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
        assert load_settings(path).cluster.state_dir == Path("/srv/state/sendguard")
        monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
        assert load_settings(path).cluster.state_dir == \
            Path.home() / ".local" / "state" / "sendguard"
    path = write(tmp_path, MINIMAL + '[cluster]\nstate_dir = "state"\n')
    assert load_settings(path).cluster.state_dir == tmp_path / "state"
    (tmp_path / "file").write_text("")
    path = write(tmp_path, MINIMAL + '[cluster]\nstate_dir = "file"\n')
    assert error_of(path) == f'{path}: cluster.state_dir: is not a folder (got "{tmp_path}/file")'


def test_admin_settings(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[admin]\nlisten = "127.0.0.1:8026"\nusers_file = "u"\n'
                 'recent_decisions = 10\nrecent_decisions_for = "1h"\n')
    admin = load_settings(path).admin
    assert (admin.listen, admin.users_file, admin.recent_decisions,
            admin.recent_decisions_for) == (("127.0.0.1", 8026), tmp_path / "u", 10, 3600.0)


def test_the_default_runtime_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cluster.settings import default_runtime_dir

    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    expected = Path("/run/sendguard") if os.geteuid() == 0 else Path("/run/user/1000/sendguard")
    assert default_runtime_dir() == expected
    assert load_settings(write(tmp_path, MINIMAL)).cluster.runtime_dir == expected
    # Under systemd's RuntimeDirectory=, the folder systemd made.
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/sendguard-test")
    assert default_runtime_dir() == Path("/run/sendguard-test")


def test_relative_paths_follow_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[server]\ntls_cert = "c.pem"\ntls_key = "/k.pem"\n'
                 '[geoip]\ndatabase = "geo/c.mmdb"\n[delivery]\nspool = "q"\n')
    settings = load_settings(path)
    assert settings.server.tls_cert == tmp_path / "c.pem"
    assert settings.server.tls_key == Path("/k.pem")
    assert settings.geoip.database == tmp_path / "geo/c.mmdb"
    assert settings.delivery.spool == tmp_path / "q"


def test_limits_list(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[[limits]]\nwindow = "2s"\nmax = 3\n')
    assert load_settings(path).limits == (Limit(2.0, 3),)


@pytest.mark.parametrize("body, message", [
    ('[server]\nmax_recipients = "ten"\n',
     'server.max_recipients: must be a whole number (got "ten")'),
    ('[server]\nmax_recipients = 0\n', "server.max_recipients: must be at least 1 (got 0)"),
    ('[server]\ndrain_timeout = "10"\n',
     'server.drain_timeout: must be a duration like "500ms", "2s", "1m", "12h" or "5d" '
     '(got "10")'),
    ('[server]\nlisten = ["0.0.0.0"]\n',
     'server.listen: must be "ADDRESS:PORT" like "0.0.0.0:587" (got "0.0.0.0")'),
    ('[server]\nlisten_tls = ["0.0.0.0:465"]\n',
     'server.listen_tls: needs server.tls_cert (got ["0.0.0.0:465"])'),
    ('[server]\ntrusted_networks = ["10.0.0.0/33"]\n',
     'server.trusted_networks: is not a network like 10.0.0.0/8 (got "10.0.0.0/33")'),
    ('[server]\nrequire_tls_for_auth = "yes"\n',
     'server.require_tls_for_auth: must be true or false (got "yes")'),
    ('[server]\nproxy_protocol = true\n',
     "server.proxy_networks: must list the load balancers when proxy_protocol is on (got [])"),
    ('[server]\nhostnme = "x"\n', 'server.hostnme: is not a known setting (got "x")'),
    ('[geoip]\nunknown = "maybe"\n',
     'geoip.unknown: must be one of allow, reject (got "maybe")'),
    ('[geoip]\ndefault_countries = ["Poland"]\n',
     'geoip.default_countries: must list two-letter country codes like "PL" (got "Poland")'),
    ('[bounce]\nmax_ratio = 1.5\n', "bounce.max_ratio: must be between 0.0 and 1.0 (got 1.5)"),
    ('[spam]\nbackend = "clamav"\n',
     'spam.backend: must be one of builtin, rspamd, spamd (got "clamav")'),
    ('[spam]\nbackend = "rspamd"\n',
     'spam.url: is required with spam.backend = "rspamd" (got "")'),
    ('[spam]\non_error = "ignore"\n',
     'spam.on_error: must be one of tempfail, accept (got "ignore")'),
    ('[dns]\nnameservers = ["dns.google"]\n',
     'dns.nameservers: must list addresses like "127.0.0.1" or "127.0.0.1:5353" '
     '(got "dns.google")'),
    ('[delivery]\nmode = "smarthost"\n',
     'delivery.smarthost: must be "HOST:PORT" with delivery.mode = "smarthost" (got "")'),
    ('[delivery]\nretry = ["1m", "soon"]\n',
     'delivery.retry: must be a duration like "500ms", "2s", "1m", "12h" or "5d" (got "soon")'),
    ('[[limits]]\nwindow = "1m"\nmax = -5\n', "limits[0].max: must be at least 0 (got -5)"),
    ('[[limits]]\nwindow = "1 minute"\nmax = 5\n',
     'limits[0].window: must be a duration like "500ms", "2s", "1m", "12h" or "5d" '
     '(got "1 minute")'),
    ('[[limits]]\nwindow = "1m"\nmax = 5\n[[limits]]\nwindow = "1m"\nmax = 6\n',
     "limits: lists the same window twice (got [{window = \"1m\", max = 5}, "
     "{window = \"1m\", max = 6}])"),
    ('[cluster]\ncoordinator = "tcp://10.0.0.1:7700"\n',
     'cluster.coordinator: is not a known setting (got "tcp://10.0.0.1:7700")'),
    ('[counters]\nbackend = "memcached"\n',
     'counters.backend: must be one of ring, redis (got "memcached")'),
    ('[counters]\nbackend = "redis"\n',
     'counters.redis_url: with counters.backend = "redis", set redis_url (one server) or '
     'redis_cluster (seed nodes of a Redis Cluster) (got "")'),
    ('[counters]\nbackend = "redis"\nredis_url = "redis://10.0.0.5:6379/0"\n'
     'redis_cluster = ["10.0.0.5:7000"]\n',
     "counters.redis_cluster: set either counters.redis_url (one server) or "
     'counters.redis_cluster (seed nodes), not both (got ["10.0.0.5:7000"])'),
    ('[counters]\nredis_url = "redis://10.0.0.5:6379/0"\n',
     'counters.redis_url: is only used with counters.backend = "redis" '
     '(got "redis://10.0.0.5:6379/0")'),
    ('[counters]\nbackend = "redis"\nredis_url = "10.0.0.5:6379"\n',
     'counters.redis_url: must be like "redis://HOST:PORT/DB" (or rediss://, unix://) '
     '(got "10.0.0.5:6379")'),
    ('[counters]\nbackend = "redis"\nredis_url = "redis://10.0.0.5:99999/0"\n',
     'counters.redis_url: has a bad port (got "redis://10.0.0.5:99999/0")'),
    ('[counters]\nbackend = "redis"\nredis_cluster = ["10.0.0.5"]\n',
     'counters.redis_cluster: must list seed nodes like "10.0.0.5:7000" (got "10.0.0.5")'),
    ('[metrics]\nlisten = "9464"\n',
     'metrics.listen: must be "ADDRESS:PORT" like "0.0.0.0:587" (got "9464")'),
    ('[sever]\nhostname = "x"\n', 'sever: is not a known setting (got {hostname = "x"})'),
    ('[server]\nmax_connections_per_ip = -1\n',
     "server.max_connections_per_ip: must be at least 0 (got -1)"),
    ('[server]\ncommand_timeout = "0s"\n',
     'server.command_timeout: must be longer than zero (got "0s")'),
    ('[server]\nmax_session_time = 3600\n',
     'server.max_session_time: must be a duration like "500ms", "2s", "1m", "12h" or "5d" '
     '(got 3600)'),
    ('[server]\nmax_errors = "ten"\n', 'server.max_errors: must be a whole number (got "ten")'),
    ('[policy]\nfrom_alignment = "strict"\n',
     'policy.from_alignment: must be one of enforce, log, off (got "strict")'),
    ('[policy]\nfrom_align = "off"\n', 'policy.from_align: is not a known setting (got "off")'),
    ('[auth]\nmax_pending = 0\n', "auth.max_pending: must be at least 1 (got 0)"),
    ('[delivery]\ntls = "required"\n',
     'delivery.tls: must be one of may, encrypt, verify (got "required")'),
    ('[admin]\nlisten = "127.0.0.1:8026"\n',
     'admin.users_file: is required when admin.listen is set (got "")'),
    ('[admin]\nlisten = "localhost"\nusers_file = "u"\n',
     'admin.listen: must be "ADDRESS:PORT" like "0.0.0.0:587" (got "localhost")'),
    ('[admin]\nrecent_decisions = -1\n', "admin.recent_decisions: must be at least 0 (got -1)"),
    ('[admin]\nrecent_decisions_for = "forever"\n',
     'admin.recent_decisions_for: must be a duration like "500ms", "2s", "1m", "12h" or "5d" '
     '(got "forever")'),
    ('[admin]\nport = 1\n', "admin.port: is not a known setting (got 1)"),
    ('[cluster]\nstate_dir = 5\n', "cluster.state_dir: must be a string (got 5)"),
])
def test_bad_settings(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + body)
    assert error_of(path) == f"{path}: {message}"


def test_redis_backends(tmp_path: Path) -> None:
    one = load_settings(write(tmp_path, MINIMAL + '[counters]\nbackend = "redis"\n'
                              'redis_url = "redis://10.0.0.5:6379/0"\n'))
    assert one.counters.redis_url == "redis://10.0.0.5:6379/0"
    many = load_settings(write(tmp_path, MINIMAL + '[counters]\nbackend = "redis"\n'
                               'redis_cluster = ["10.0.0.5:7000", "[2001:db8::6]:7001"]\n'))
    assert many.counters.redis_cluster == (("10.0.0.5", 7000), ("2001:db8::6", 7001))


def test_tenants_file_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\n")
    assert error_of(path) == f"{path}: tenants.file: is required: the tenant directory"


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    assert error_of(path).startswith(f"{path}: (file): is not valid TOML: ")


def test_a_file_that_is_not_utf8_is_one_line_too(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "\xb3\xf3d\xbc.pl"\n')
    assert error_of(path).startswith(f"{path}: (file): is not valid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: (file): cannot be read: no such file"


TENANT = '[domains."kowalski.pl"]\n[accounts."jan@kowalski.pl"]\npassword = "{PLAIN}x"\n'


def test_tenants(tmp_path: Path) -> None:
    path = write(tmp_path, TENANT + '[domains."Zażółć.PL"]\naliases = ["Kowalski.COM.pl"]\n'
                 'countries = ["pl", "DE"]\nlimits = [{window = "1h", max = 2}]\n'
                 '[accounts."Ewa@ZAŻÓŁĆ.pl"]\npassword = "{PLAIN}y"\n'
                 'limits = [{window = "1m", max = 1}]\n', "tenants.toml")
    tenants = load_tenants(path)
    domain = tenants.domain("xn--za-6ja4f8n1l.pl")
    assert domain is not None
    assert domain.aliases == frozenset({"kowalski.com.pl"})
    assert domain.countries == frozenset({"PL", "DE"})
    ewa = tenants.account("Ewa@zażółć.pl")
    assert ewa is not None and ewa.user == "Ewa@xn--za-6ja4f8n1l.pl"
    assert tenants.limits(ewa, DEFAULT_LIMITS) == (Limit(60.0, 1),)
    jan = tenants.account("jan@KOWALSKI.pl")
    assert jan is not None
    assert tenants.limits(jan, DEFAULT_LIMITS) == DEFAULT_LIMITS
    assert tenants.countries(jan, frozenset({"PL"})) == frozenset({"PL"})


@pytest.mark.parametrize("body, message", [
    ('[accounts."ewa@nowak.pl"]\npassword = "{PLAIN}x"\n',
     'accounts."ewa@nowak.pl": its domain is not listed under [domains."nowak.pl"] '
     '(got "ewa@nowak.pl")'),
    ('[accounts."nobody"]\npassword = "{PLAIN}x"\n',
     'accounts."nobody": is not an address like user@domain (got "nobody")'),
    ('[accounts."ewa@kowalski.pl"]\n',
     'accounts."ewa@kowalski.pl".password: is required'),
    ('[accounts."ewa@kowalski.pl"]\npassword = "{MD5}abc"\n',
     'accounts."ewa@kowalski.pl".password: unknown password scheme {MD5}; supported schemes: '
     'ARGON2ID, ARGON2I, BLF-CRYPT, SHA512-CRYPT, PLAIN (got "{MD5}...")'),
    ('[domains."nowak.pl"]\ncountries = ["POL"]\n',
     'domains."nowak.pl".countries: must list two-letter country codes like "PL" (got "POL")'),
    ('[domains."nowak.pl"]\nlimits = [{window = "1h"}]\n',
     'domains."nowak.pl".limits[0].max: is required'),
    ('[domains."nowak.pl"]\nalias = ["x.pl"]\n',
     'domains."nowak.pl".alias: is not a known setting (got ["x.pl"])'),
])
def test_bad_tenants(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, TENANT + body, "tenants.toml")
    assert tenants_error(path) == f"{path}: {message}"


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[server]\nmax_recipients = "ten"\n')
    write(tmp_path, TENANT, "tenants.toml")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "run", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f'{path}: server.max_recipients: must be a whole number (got "ten")\n'


def test_cli_bad_tenant_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    tenants = write(tmp_path, TENANT + '[accounts."ewa@nowak.pl"]\npassword = "{PLAIN}x"\n',
                    "tenants.toml")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f'{tenants}: accounts."ewa@nowak.pl": its domain is not listed '
                             f'under [domains."nowak.pl"] (got "ewa@nowak.pl")\n')
