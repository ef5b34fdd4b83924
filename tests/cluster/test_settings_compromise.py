"""``[compromise]``: off when absent, its defaults, and one line for each kind of bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.settings import CompromiseSettings, load_settings
from cluster.validate import ConfigError

BASE = '[tenants]\nfile = "tenants.toml"\n[geoip]\ndatabase = "country.mmdb"\n'


def write(folder: Path, text: str) -> Path:
    path = folder / "sendguard.toml"
    path.write_text(text)
    return path


def test_absent_is_off_and_an_empty_section_has_every_default(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, BASE)).compromise is None
    settings = load_settings(write(tmp_path, BASE + "[compromise]\n")).compromise
    assert settings == CompromiseSettings(window=3600.0, countries=3, spam_messages=3,
                                          suspend_for=86400.0, notify_url="")


def test_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '[compromise]\nwindow = "30m"\ncountries = 2\n'
                 'spam_messages = 5\nsuspend_for = "7d"\n'
                 'notify_url = "https://hooks.example.net/sendguard?token=x"\n')
    assert load_settings(path).compromise == CompromiseSettings(
        1800.0, 2, 5, 604800.0, "https://hooks.example.net/sendguard?token=x")


def test_spam_only_needs_no_geoip_database(tmp_path: Path) -> None:
    path = write(tmp_path, '[tenants]\nfile = "t.toml"\n[compromise]\ncountries = 0\n')
    compromise = load_settings(path).compromise
    assert compromise is not None and (compromise.countries, compromise.spam_messages) == (0, 3)


@pytest.mark.parametrize("body, message", [
    ('window = "1 hour"',
     'compromise.window: must be a duration like "500ms", "2s", "1m", "12h" or "5d" '
     '(got "1 hour")'),
    ('suspend_for = "0s"', 'compromise.suspend_for: must be longer than zero (got "0s")'),
    ("countries = 1", "compromise.countries: must be at least 2 (or 0: not a signal) (got 1)"),
    ("countries = -1", "compromise.countries: must be at least 0 (got -1)"),
    ('countries = "3"', 'compromise.countries: must be a whole number (got "3")'),
    ("spam_messages = -2", "compromise.spam_messages: must be at least 0 (got -2)"),
    ('notify_url = "hooks.example.net/x"',
     'compromise.notify_url: must be "" or an http:// or https:// URL '
     '(got "hooks.example.net/x")'),
    ('notify_url = "ftp://hooks.example.net/x"',
     'compromise.notify_url: must be "" or an http:// or https:// URL '
     '(got "ftp://hooks.example.net/x")'),
    ("notify = true", "compromise.notify: is not a known setting (got true)"),
])
def test_bad_values(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, BASE + "[compromise]\n" + body + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: {message}"


def test_countries_without_a_geoip_database_is_refused_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[tenants]\nfile = "t.toml"\n[compromise]\nspam_messages = 2\n')
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "check-config", "-c",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"{path}: compromise.countries: needs geoip.database to place "
                           "logins in countries; set 0 to watch spam only (got 3)\n")
    path.write_text('compromise = "on"\n[tenants]\nfile = "t.toml"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f'{path}: compromise: must be a table (got "on")'
