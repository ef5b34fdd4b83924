"""DKIM keys follow the tenant directory live: a selector added is signed with at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway import TENANTS, running_gateway

ROOT = Path(__file__).resolve().parents[2]


def signed_by(lines: list[dict[str, Any]]) -> list[str | None]:
    return [line.get("dkim") for line in lines
            if line.get("stage") == "DATA" and line.get("verdict") == "accept"]


def test_a_selector_added_live_is_signed_with(short_tmp: Path, dns: Any) -> None:
    with running_gateway(short_tmp, dns) as gw:
        client = gw.login()
        assert gw.send(client)[0] == 250
        made = subprocess.run([sys.executable, "-m", "cluster.cli", "dkim", "keygen",
                               "kowalski.pl", "--selector", "live1", "-c", str(gw.config_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        gw.tenants_path.write_text(TENANTS.replace(
            'countries = ["PL", "DE"]', 'countries = ["PL", "DE"]\ndkim_selector = "live1"'))
        assert gw.reload()
        assert gw.send(client)[0] == 250
        client.quit()
        assert signed_by(gw.log_lines()) == [None, "kowalski.pl/live1"]
