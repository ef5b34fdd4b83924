"""Tenant, GeoIP and configuration changes reach every worker within 5 s; bad ones do not."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from clusterproc import Cluster, free_port, wait_for
from dnsserver import TestDNSServer
from gateway import COUNTRIES, MESSAGE, TENANTS, UNKNOWN_IP
from geoipdb import write_country_db

from cluster.selfsigned import write_self_signed

pytestmark = pytest.mark.integration

IN_FORCE_WITHIN = 5.0
GERMAN = "127.0.0.42"          # DE in the test database
ANNA = "anna@nowak.pl"         # nowak.pl lists no countries: PL only by default
SENDER_REJECTED = (550, f"5.1.0 <{ANNA}> sender rejected")
COMMENTED_TENANTS = "# Tenants of the test provider; keep this comment.\n" + TENANTS


def mail_reply(cluster: Cluster, source: str, user: str = ANNA) -> tuple[int, str]:
    client = cluster.login(source, user)
    try:
        code, text = client.mail(user)
        return code, text.decode()
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def in_force(cluster: Cluster, changed_after: int, source: str, accepted: bool,
             user: str = ANNA) -> float:
    """Seconds until every worker holds a snapshot newer than ``changed_after`` and a new
    session from ``source`` gets the expected answer at MAIL."""
    start = time.monotonic()

    def done() -> bool:
        status = cluster.status()
        newest = [w["snapshot_version"] for w in status["workers"]]
        if min(newest) <= changed_after:
            return False
        code, _ = mail_reply(cluster, source, user)
        return (code == 250) == accepted

    wait_for(done, IN_FORCE_WITHIN, f"the change in force ({'accepted' if accepted else 'refused'} "
             f"from {source})", every=0.1)
    return time.monotonic() - start


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    temp = path.with_name(f".{path.name}.new")
    write(temp)
    os.replace(temp, path)


def version(cluster: Cluster) -> int:
    return int(cluster.status()["config_version"])


def test_changes_on_disk_and_through_the_cli_are_in_force_within_5s(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2, tenants=COMMENTED_TENANTS).start()
    assert mail_reply(cluster, GERMAN) == SENDER_REJECTED

    # The tenant file edited on disk: nowak.pl now allows Germany.
    before = version(cluster)
    cluster.tenants_path.write_text(COMMENTED_TENANTS.replace(
        '[domains."nowak.pl"]\n', '[domains."nowak.pl"]\ncountries = ["PL", "DE"]\n'))
    in_force(cluster, before, GERMAN, accepted=True)

    # A new GeoIP database puts the address in the United States.
    before = version(cluster)
    replace_file(cluster.geoip_path,
                 lambda p: write_country_db(p, {**COUNTRIES, f"{GERMAN}/32": "US"}))
    in_force(cluster, before, GERMAN, accepted=False)

    # Support staff allow the US for the domain.
    before = version(cluster)
    done = cluster.admin("tenant", "allow-country", "nowak.pl", "us")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("nowak.pl: countries now DE, PL, US")
    in_force(cluster, before, GERMAN, accepted=True)
    text = cluster.tenants_path.read_text()
    assert text.startswith("# Tenants of the test provider; keep this comment.\n")
    assert 'countries = ["DE", "PL", "US"]' in text
    assert text.replace('countries = ["DE", "PL", "US"]\n', "") == COMMENTED_TENANTS
    again = cluster.admin("tenant", "allow-country", "nowak.pl", "US")
    assert again.returncode == 0
    assert again.stdout.strip() == "nowak.pl: unchanged, countries DE, PL, US"

    # A broken file is refused: the old directory stays in force, the CLI will not edit it.
    good = cluster.tenants_path.read_text()
    before = version(cluster)
    cluster.tenants_path.write_text(good + "\n[accounts.\n")
    wait_for(lambda: any(line["event"] == "reload_refused" for line in cluster.log_lines()), 5,
             "the broken tenant file to be refused")
    assert version(cluster) == before
    assert mail_reply(cluster, GERMAN)[0] == 250
    refused = cluster.admin("tenant", "disallow-country", "nowak.pl", "US")
    assert refused.returncode == 1
    assert "the tenant file is not valid now" in refused.stderr
    assert cluster.admin("tenant", "allow-country", "nowhere.pl", "US").returncode == 1

    cluster.tenants_path.write_text(good)
    before = version(cluster)
    assert cluster.admin("tenant", "disallow-country", "nowak.pl", "US").returncode == 0
    in_force(cluster, before, GERMAN, accepted=False)


def test_sighup_rereads_the_configuration_and_keeps_the_old_one_when_bad(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    jan = "jan@kowalski.pl"
    assert mail_reply(cluster, UNKNOWN_IP, jan) == (550, f"5.1.0 <{jan}> sender rejected")

    config = cluster.config_path.read_text()
    cluster.config_path.write_text(config.replace('unknown = "reject"', 'unknown = "allow"'))
    before = version(cluster)
    cluster.signal(signal.SIGHUP)
    in_force(cluster, before, UNKNOWN_IP, accepted=True, user=jan)

    cluster.config_path.write_text(config.replace('unknown = "reject"', 'unknown = "maybe"'))
    before = version(cluster)
    cluster.signal(signal.SIGHUP)
    refusal = wait_for(lambda: [line for line in cluster.log_lines()
                                if line["event"] == "reload_refused"], 5, "the bad file refused")
    assert refusal[0]["error"].startswith(f"{cluster.config_path}: geoip.unknown: ")
    assert version(cluster) == before
    assert mail_reply(cluster, UNKNOWN_IP, jan)[0] == 250


def reload_and_wait(cluster: Cluster) -> None:
    """SIGHUP, then wait until every worker holds the new snapshot."""
    before = version(cluster)
    cluster.signal(signal.SIGHUP)
    wait_for(lambda: version(cluster) > before and all(
        (w["snapshot_version"] or 0) > before for w in cluster.status()["workers"]),
        IN_FORCE_WITHIN, "every worker on the new configuration", every=0.1)


def edit_config(cluster: Cluster, *changes: tuple[str, str]) -> None:
    text = cluster.config_path.read_text()
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new)
    cluster.config_path.write_text(text)


def partial_reloads(cluster: Cluster) -> list[dict[str, object]]:
    return [line for line in cluster.log_lines() if line["event"] == "reload_partial"]


def test_sighup_applies_sizes_recipients_limits_and_names_what_needs_a_restart(
        make_cluster: Callable[..., Cluster]) -> None:
    metrics = free_port()
    cluster = make_cluster(workers=2, server={"max_recipients": 2, "max_message_size": 100000},
                           limits=[{"window": "1h", "max": 100}]).start()
    client = cluster.login()
    assert client.esmtp_features["size"] == "100000"
    assert client.mail("jan@kowalski.pl")[0] == 250
    assert [client.rcpt(f"r{i}@example.org")[0] for i in range(3)] == [250, 250, 452]
    client.quit()

    edit_config(cluster, ("max_recipients = 2", "max_recipients = 3"),
                ("max_message_size = 100000", "max_message_size = 50000"),
                ("max = 100", "max = 1"),
                (f'listen = ["127.0.0.1:{cluster.port}"]',
                 f'listen = ["127.0.0.1:{cluster.port}", "127.0.0.1:{free_port()}"]'),
                ("[log]", f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n[log]'))
    reload_and_wait(cluster)

    client = cluster.login()
    assert client.esmtp_features["size"] == "50000"  # EHLO says the new SIZE
    assert client.mail("jan@kowalski.pl", ["SIZE=60000"])[0] == 552
    assert client.mail("jan@kowalski.pl")[0] == 250
    assert [client.rcpt(f"r{i}@example.org")[0] for i in range(4)] == [250, 250, 250, 452]
    assert client.data(MESSAGE)[0] == 250
    code, text = client.mail("jan@kowalski.pl")  # the new limit: 1 an hour
    assert code == 550 and text.decode().endswith(" policy violation")
    client.quit()
    # One warning, naming exactly what waits for a restart.
    [partial] = partial_reloads(cluster)
    assert partial["keys"] == ["server.listen", "metrics.listen"]
    assert partial["level"] == "warning"


def test_sighup_applies_the_worker_count_resolvers_and_a_renewed_certificate(
        make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=2).start()
    first_cert = served_certificate(cluster)
    code, _ = cluster.send_one(recipient="a@only-in-the-new-dns.test")
    assert code == 550  # the resolver in use has never heard of it

    with TestDNSServer() as other_dns:
        other_dns.add_mx("only-in-the-new-dns.test", "mx.example.org", 10)
        other_dns.add_mx("example.org", "mx.example.org", 10)
        # A renewed certificate and key, written over the old files.
        write_self_signed(cluster.folder / "cert.pem", cluster.folder / "key.pem", "mx.test")
        edit_config(cluster, ("workers = 2", "workers = 3"),
                    (f'nameservers = ["{cluster.dns_address}"]',
                     f'nameservers = ["{other_dns.address}"]'))
        reload_and_wait(cluster)
        cluster.wait_serving(3)
        # Every worker: connections land on any of them.
        wait_for(lambda: all(served_certificate(cluster) != first_cert for _ in range(6)),
                 IN_FORCE_WITHIN, "the renewed certificate served")
        wait_for(lambda: cluster.send_one(recipient="a@only-in-the-new-dns.test")[0] == 250,
                 IN_FORCE_WITHIN, "the new resolver in use")
        assert partial_reloads(cluster) == []

        # A key that does not match its certificate: refused, the old pair stays.
        renewed = served_certificate(cluster)
        other = cluster.folder / "other"
        other.mkdir()
        write_self_signed(other / "cert.pem", other / "key.pem", "mx.test")
        (cluster.folder / "key.pem").write_bytes((other / "key.pem").read_bytes())
        before = version(cluster)
        cluster.signal(signal.SIGHUP)
        refusal = wait_for(lambda: [line for line in cluster.log_lines()
                                    if line["event"] == "reload_refused"
                                    and line["process"] == "coordinator"], 5, "a refusal")
        assert refusal[0]["error"].startswith(f"{cluster.config_path}: server.tls_key: ")
        assert version(cluster) == before
        assert all(served_certificate(cluster) == renewed for _ in range(6))


def served_certificate(cluster: Cluster) -> bytes:
    client = cluster.connect()
    try:
        return client.sock.getpeercert(binary_form=True)
    finally:
        client.quit()
