"""Tenant, GeoIP and configuration changes reach every worker within 5 s; bad ones do not."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from clusterproc import Cluster, wait_for
from gateway import COUNTRIES, TENANTS, UNKNOWN_IP
from geoipdb import write_country_db

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
