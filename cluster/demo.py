"""``sendguard demo``: the bundled example, ready to run on a fresh machine.

It uses ``examples/`` next to the package (or ``--dir``), and makes what a
first start needs and the repository does not carry: a self-signed
certificate under ``examples/tls/`` and the spool folder.
"""

from __future__ import annotations

from pathlib import Path

from cluster.selfsigned import write_self_signed
from cluster.settings import load_settings


def bundled_examples() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"


def prepare_demo(folder: Path | None = None) -> Path:
    folder = (folder or bundled_examples()).resolve()
    config = folder / "sendguard.toml"
    if not config.is_file():
        raise SystemExit(f"sendguard demo: no example configuration at {config}")
    settings = load_settings(config)
    cert, key = settings.server.tls_cert, settings.server.tls_key
    if cert is not None and key is not None and not (cert.exists() and key.exists()):
        write_self_signed(cert, key, settings.server.hostname)
    settings.delivery.spool.mkdir(parents=True, exist_ok=True)
    return config
