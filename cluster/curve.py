"""ZeroMQ CURVE between hosts: key files, who may connect, which key a server holds.

Each host has one key pair (``cluster.curve_secret_key``, the z85
certificate format of ``zmq.auth``) and a folder of the other hosts'
public keys (``cluster.curve_public_keys``, ``*.key`` files). Every server
of a cluster that uses tcp:// (the coordinator's ROUTER and PUB, the
workers' counter ROUTERs) is a CURVE server with its host's pair and lets
in only the keys in that folder and its host's own; clients use their
host's pair and the server's public key.

A host's name is its key file's name without ``.key_secret`` (``sendguard
keygen DIR --name mx1`` writes ``mx1.key_secret`` and ``mx1.key``), and its
workers are named after it (``mx1-w0``). So a ring member's name says which
public key its counter socket must prove: a host that registered workers
under another host's name cannot serve them.

The folder is read again when it changes: a host added to it may connect
without a restart.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from cluster.validate import ConfigError

SECRET_SUFFIX = ".key_secret"
PUBLIC_SUFFIX = ".key"
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
_RELOAD_EVERY = 1.0


@dataclass(frozen=True)
class HostKeys:
    """This host's name and key pair (z85), and the folder of the others' public keys."""

    host: str
    public: bytes
    secret: bytes
    folder: Path | None


def host_name(secret_file: Path) -> str:
    name = secret_file.name
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return secret_file.stem or name


def load_host_keys(config: Path, secret_file: Path, folder: Path | None) -> HostKeys:
    """Raises ConfigError naming the setting when a file cannot be used."""
    key = "cluster.curve_secret_key"
    host = host_name(secret_file)
    if not HOST_RE.fullmatch(host):
        raise ConfigError(config, key, "the file name must be HOST.key_secret, HOST made of "
                          "letters, digits, '.', '_' and '-'", str(secret_file))
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(config, key, f"cannot be read: {exc}", str(secret_file)) from None
    if secret is None:
        raise ConfigError(config, key, "holds no secret-key (is it the .key_secret file?)",
                          str(secret_file))
    keys = HostKeys(host, public, secret, folder)
    if folder is not None:
        if not folder.is_dir():
            raise ConfigError(config, "cluster.curve_public_keys", "is not a directory",
                              str(folder))
        other = read_public_keys(folder).get(host)
        if other is not None and other != public:
            raise ConfigError(config, "cluster.curve_public_keys",
                              f"holds {host}.key, a key other than this host's: two hosts "
                              f"must not share the name {host!r}", str(folder))
    return keys


def read_public_keys(folder: Path) -> dict[str, bytes]:
    """Host name -> public key (z85) for every readable ``*.key`` file in ``folder``."""
    found: dict[str, bytes] = {}
    try:
        entries = sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))
    except OSError:
        return found
    for path in entries:
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue
        found[path.name[: -len(PUBLIC_SUFFIX)]] = public
    return found


class PublicKeys(Mapping[str, bytes]):
    """Host name, or a worker named after its host, -> that host's public key.

    Iterates over host names: this host and those in the folder. The folder
    is looked at again at most once a second."""

    def __init__(self, keys: HostKeys) -> None:
        self.host_keys = keys
        self._hosts: dict[str, bytes] = {}
        self._signature: Any = None
        self._checked = float("-inf")

    def hosts(self) -> dict[str, bytes]:
        now = time.monotonic()
        if now - self._checked >= _RELOAD_EVERY:
            self._checked = now
            folder = self.host_keys.folder
            signature = _signature(folder) if folder is not None else None
            if signature != self._signature or not self._hosts:
                found = read_public_keys(folder) if folder is not None else {}
                found[self.host_keys.host] = self.host_keys.public
                self._hosts, self._signature = found, signature
        return self._hosts

    def __getitem__(self, name: str) -> bytes:
        hosts = self.hosts()
        if name in hosts:
            return hosts[name]
        return hosts[host_of(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.hosts())

    def __len__(self) -> int:
        return len(self.hosts())

    def others(self) -> list[bytes]:
        return [key for host, key in self.hosts().items() if host != self.host_keys.host]


def _signature(folder: Path) -> Any:
    try:
        return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                     for e in sorted(os.scandir(folder), key=lambda e: e.name))
    except OSError:
        return None


def host_of(worker: str) -> str:
    """``"mx1-w3"`` -> ``"mx1"``; a name without a host part -> ``""``."""
    head, sep, tail = worker.rpartition("-w")
    return head if sep and tail.isdigit() else ""


# -- sockets ---------------------------------------------------------------------

def make_server(sock: zmq.Socket[Any], keys: HostKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket[Any], keys: HostKeys, server_key: bytes) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key


class AllowedKeys:
    """ZAP check for CURVE clients: the keys of ``PublicKeys``, read when a client connects."""

    def __init__(self, keys: PublicKeys) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return key in set(self.keys.values())
        except Exception:
            return False


# -- keygen ----------------------------------------------------------------------

_BANNER = """#   ZeroMQ CURVE {what} of sendguard host {host}
#   {advice}

metadata
curve
"""


def write_key_pair(folder: Path, host: str) -> tuple[Path, Path]:
    """``HOST.key_secret`` (0600) and ``HOST.key`` in ``folder``; never overwrites."""
    if not HOST_RE.fullmatch(host):
        raise ValueError(f"host name {host!r}: use letters, digits, '.', '_' and '-'")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    secret_path = folder / f"{host}{SECRET_SUFFIX}"
    public_path = folder / f"{host}{PUBLIC_SUFFIX}"
    for path in (secret_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first to make a new key")
    secret_text = _BANNER.format(what="secret key", host=host,
                                 advice="keep it on this host only, readable by sendguard only")
    secret_text += f'    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n'
    _write(secret_path, secret_text, 0o600)
    public_text = _BANNER.format(what="public key", host=host,
                                 advice="copy it into the other hosts' curve_public_keys folders")
    public_text += f'    public-key = "{public.decode()}"\n'
    _write(public_path, public_text, 0o644)
    return secret_path, public_path


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def add_parser(commands: Any, name: str, config_arg: Any) -> None:
    keygen = commands.add_parser(name, help="make this host's CURVE key pair for tcp:// clusters")
    keygen.add_argument("folder", metavar="DIR", help="where to write HOST.key_secret and HOST.key")
    keygen.add_argument("--name", default="",
                        help="the host's name in the cluster (default: the short hostname)")


def run(args: Any) -> int:
    import socket
    import sys

    host = args.name or socket.gethostname().split(".")[0]
    try:
        secret, public = write_key_pair(Path(args.folder), host)
    except ValueError as exc:
        print(f"sendguard: keygen: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sendguard: keygen: {exc}", file=sys.stderr)
        return 1
    print(f"{secret}: this host's secret key, for [cluster] curve_secret_key")
    print(f"{public}: its public key; copy it into every other host's curve_public_keys folder")
    return 0
