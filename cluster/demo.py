"""``sendguard demo``: the bundled example, ready to run on a fresh machine.

It uses ``examples/`` next to the package (or ``--dir``), and makes what a
first start needs and the repository does not carry: a self-signed
certificate under ``examples/tls/`` and the spool folder. It also runs a
catch-all sink on the example's smarthost address (cluster/demo_sink.py)
that writes every delivered message to ``examples/mail/`` as an ``.eml``
file, so a message can be seen going in and coming out.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

from cluster.quietstart import spawn_quietly
from cluster.selfsigned import write_self_signed
from cluster.settings import Settings, load_settings

MAIL_FOLDER = "mail"


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


def run_demo(folder: Path | None = None) -> int:
    """Prepare the example, start the sink, run the cluster until it stops."""
    from cluster.cli import load_or_exit
    from cluster.supervisor import run_cluster

    config = prepare_demo(folder)
    settings = load_or_exit(str(config), open_files=True)
    mail = config.parent / MAIL_FOLDER
    print(f"sendguard demo: configuration {config}", file=sys.stderr)
    sink = start_sink(settings, mail)
    try:
        return run_cluster(settings)
    finally:
        if sink is not None:
            sink.terminate()
            try:
                sink.wait(5)
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait()


def start_sink(settings: Settings, folder: Path) -> subprocess.Popen[bytes] | None:
    """The catch-all next hop on the smarthost address, or None (said why) if it cannot run."""
    delivery = settings.delivery
    if delivery.mode != "smarthost":
        return None
    host, _, port = delivery.smarthost.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        print(f"sendguard demo: no sink: delivery.smarthost {delivery.smarthost} is not an "
              "address of this host; mail goes there", file=sys.stderr)
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        print(f"sendguard demo: no sink: cannot listen on {delivery.smarthost} "
              f"({exc.strerror}); mail goes to whatever listens there", file=sys.stderr)
        return None
    with sock:
        process = spawn_quietly(
            [sys.executable, "-m", "cluster.demo_sink", "--fd", str(sock.fileno()),
             "--dir", str(folder), "--parent-pid", str(os.getpid())],
            pass_fds=(sock.fileno(),))
    print(f"sendguard demo: delivered mail is written to {folder}/ "
          f"(a sink on {delivery.smarthost})", file=sys.stderr)
    return process
