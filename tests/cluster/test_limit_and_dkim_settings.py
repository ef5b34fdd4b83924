"""Settings of recipient and shadow limits, ``[dkim]`` and a tenant's ``dkim_selector``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.settings import Limit, load_settings
from cluster.tenants import load_tenants
from cluster.validate import ConfigError

MINIMAL = '[tenants]\nfile = "tenants.toml"\n'


def write(folder: Path, text: str, name: str = "sendguard.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_count_and_mode(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[[limits]]\nwindow = "1h"\nmax = 100\n'
                 '[[limits]]\nwindow = "1h"\nmax = 500\ncount = "recipients"\n'
                 '[[limits]]\nwindow = "1h"\nmax = 50\nmode = "shadow"\n'
                 '[[limits]]\nwindow = "1h"\nmax = 200\ncount = "recipients"\nmode = "shadow"\n')
    assert load_settings(path).limits == (
        Limit(3600.0, 100), Limit(3600.0, 500, "recipients"),
        Limit(3600.0, 50, "messages", "shadow"), Limit(3600.0, 200, "recipients", "shadow"))
    assert [limit.shadow for limit in load_settings(path).limits] == [False, False, True, True]


def test_dkim_defaults_and_relative_folder(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, MINIMAL)).dkim.keys_dir == tmp_path / "dkim"
    path = write(tmp_path, MINIMAL + '[dkim]\nkeys_dir = "/etc/sendguard/dkim"\n')
    assert load_settings(path).dkim.keys_dir == Path("/etc/sendguard/dkim")


@pytest.mark.parametrize("body, message", [
    ('[[limits]]\nwindow = "1m"\nmax = 5\ncount = "rcpt"\n',
     'limits[0].count: must be one of messages, recipients (got "rcpt")'),
    ('[[limits]]\nwindow = "1m"\nmax = 5\nmode = "dry-run"\n',
     'limits[0].mode: must be one of enforce, shadow (got "dry-run")'),
    ('[[limits]]\nwindow = "1m"\nmax = 5\nmode = "shadow"\n'
     '[[limits]]\nwindow = "1m"\nmax = 6\nmode = "shadow"\n',
     'limits: lists the same window twice (got [{window = "1m", max = 5, mode = "shadow"}, '
     '{window = "1m", max = 6, mode = "shadow"}])'),
    ('[dkim]\nkeys_dir = ""\n', 'dkim.keys_dir: must name a folder (got "")'),
    ('[dkim]\nkey_dir = "k"\n', 'dkim.key_dir: is not a known setting (got "k")'),
])
def test_bad_settings(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + body)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: {message}"


def test_tenant_selector_and_limits(tmp_path: Path) -> None:
    path = write(tmp_path, '[domains."kowalski.pl"]\ndkim_selector = "sg2026.a"\n'
                 'limits = [{window = "1h", max = 9, count = "recipients", mode = "shadow"}]\n'
                 '[domains."nowak.pl"]\n', "tenants.toml")
    tenants = load_tenants(path)
    assert tenants.domains["kowalski.pl"].dkim_selector == "sg2026.a"
    assert tenants.domains["nowak.pl"].dkim_selector is None
    assert tenants.domains["kowalski.pl"].limits == (Limit(3600.0, 9, "recipients", "shadow"),)


@pytest.mark.parametrize("selector", ["../etc", "sg 1", "-sg", "a..b", "sg_1", ""])
def test_bad_selectors(tmp_path: Path, selector: str) -> None:
    if not selector:  # empty means "not signed", like an absent key
        path = write(tmp_path, '[domains."a.pl"]\ndkim_selector = ""\n', "tenants.toml")
        assert load_tenants(path).domains["a.pl"].dkim_selector is None
        return
    path = write(tmp_path, f'[domains."a.pl"]\ndkim_selector = "{selector}"\n', "tenants.toml")
    with pytest.raises(ConfigError) as caught:
        load_tenants(path)
    assert str(caught.value) == (
        f'{path}: domains."a.pl".dkim_selector: must be a DNS label like "sg2026" (letters, '
        f'digits, hyphens; dots between labels) (got "{selector}")')
