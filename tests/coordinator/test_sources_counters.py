"""A reload may not move the counters to another store: workers would split across two."""

from __future__ import annotations

from pathlib import Path

from coordinator.sources import SnapshotSources

TENANTS = '[domains."kowalski.pl"]\n[accounts."jan@kowalski.pl"]\npassword = "{PLAIN}x"\n'


def test_a_reload_that_changes_counters_is_refused_whole(tmp_path: Path) -> None:
    (tmp_path / "tenants.toml").write_text(TENANTS)
    config = tmp_path / "sendguard.toml"
    base = '[tenants]\nfile = "tenants.toml"\n[[limits]]\nwindow = "1m"\nmax = 5\n'
    config.write_text(base)
    sources = SnapshotSources(config)

    config.write_text(base.replace("max = 5", "max = 6") + '[counters]\nbackend = "redis"\n'
                      'redis_url = "redis://127.0.0.1:6379/0"\n')
    assert sources.reload_config() is False
    assert sources.settings.counters.backend == "ring"
    assert sources.settings.limits[0].max == 5

    config.write_text(base.replace("max = 5", "max = 6"))
    assert sources.reload_config() is True
    assert sources.settings.limits[0].max == 6
