"""How a host's processes reach the coordinator: endpoints, CURVE keys, host-local settings.

One host (neither ``cluster.bind`` nor ``cluster.coordinator``): ipc:// in
the runtime folder, no CURVE, workers named w0, w1, ...

Several hosts: each names its own ``bind = "tcp://ADDR:P"`` (an address the
other hosts reach it at) and its workers are named ``HOST-w0``, ... after
its key (:mod:`cluster.curve`). Ports, from P:

    P          the coordinator's ROUTER   (only on the host that runs it)
    P + 1      the coordinator's PUB      (only on the host that runs it)
    P + 2 + n  worker ``HOST-wn``'s counter ROUTER

The host that runs the coordinator also binds it on ipc:// for its own
processes, with CURVE there too: a socket has one security mechanism for
all its endpoints. A host with ``coordinator = "tcp://ADDR:P"`` (the other
host's ``bind``) runs none; its supervisor, workers and admin commands
connect to P and P + 1.

The coordinator's public key is not named in the configuration: with one
key in ``curve_public_keys`` it is that one; with several the supervisor
tries each (:class:`KeyProbe`) and keeps the one whose handshake succeeds.
It writes what its workers need, its validated configuration and that key,
to the host file in the runtime folder, so a worker restarted after the
file on disk was edited badly still starts as the others did.

Workers on a joining host take the cluster-wide sections from the
coordinator's snapshot (tenants, GeoIP, limits, auth, bounce, spam) and keep
their own host's :data:`HOST_SECTIONS`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster import wire
from cluster.curve import HostKeys, PublicKeys, load_host_keys, make_client
from cluster.settings import Settings, parse_settings
from cluster.validate import ConfigError

HOST_SECTIONS = ("server", "cluster", "log", "delivery", "dns", "metrics")
HOST_FILE = "host.msgpack"
_INDEX_RE = re.compile(r"(?:^|-)w(\d+)$")


def worker_index(name: str) -> int | None:
    match = _INDEX_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Uplink:
    runtime_dir: Path
    settings: Settings | None = None   # the host's own settings, when it uses tcp://
    keys: HostKeys | None = None
    server_key: bytes | None = None    # the coordinator's public key, once known

    @classmethod
    def local(cls, runtime_dir: Path) -> Uplink:
        return cls(runtime_dir)

    @property
    def tcp(self) -> bool:
        return self.settings is not None

    @property
    def remote(self) -> bool:
        """The coordinator runs on another host."""
        return self.settings is not None and bool(self.settings.cluster.coordinator)

    @property
    def coordinator(self) -> str:
        if self.remote:
            assert self.settings is not None
            return self.settings.cluster.coordinator
        return wire.coordinator_endpoint(self.runtime_dir)

    @property
    def events(self) -> str:
        if self.remote:
            return wire.events_tcp_endpoint(self.coordinator)
        return wire.events_endpoint(self.runtime_dir)

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the coordinator (nothing to do on one host)."""
        if self.keys is None:
            return
        if self.server_key is None:
            raise RuntimeError("the coordinator's public key is not known yet")
        make_client(sock, self.keys, self.server_key)

    def candidates(self) -> list[bytes]:
        """Public keys the coordinator may hold: the other hosts'."""
        return PublicKeys(self.keys).others() if self.keys is not None else []

    def worker_name(self, index: int) -> str:
        return f"{self.keys.host}-w{index}" if self.keys is not None else f"w{index}"

    def worker_endpoint(self, name: str) -> str:
        bind = self.settings.cluster.bind if self.settings is not None else ""
        return wire.worker_endpoint(self.runtime_dir, bind, name)

    def adapt(self, message: wire.SnapshotMessage) -> wire.SnapshotMessage:
        """The coordinator's snapshot with this host's own sections, on a joining host."""
        if not self.remote:
            return message
        assert self.settings is not None
        config = {k: v for k, v in message.config.items() if k not in HOST_SECTIONS}
        config.update({k: v for k, v in self.settings.raw.items() if k in HOST_SECTIONS})
        return dataclasses.replace(message, config_path=str(self.settings.path), config=config)

    def with_server_key(self, key: bytes) -> Uplink:
        return dataclasses.replace(self, server_key=key)


def uplink_for(settings: Settings) -> Uplink:
    """Raises ConfigError when a key file cannot be used."""
    cluster = settings.cluster
    if not cluster.bind and not cluster.coordinator:
        return Uplink.local(cluster.runtime_dir)
    assert cluster.curve_secret_key is not None  # settings require it with tcp://
    keys = load_host_keys(settings.path, cluster.curve_secret_key, cluster.curve_public_keys)
    uplink = Uplink(cluster.runtime_dir, settings, keys)
    if not uplink.remote:
        return uplink.with_server_key(keys.public)
    candidates = uplink.candidates()
    if not candidates:
        raise ConfigError(settings.path, "cluster.curve_public_keys",
                          "must hold the public key of the host that runs the coordinator",
                          str(cluster.curve_public_keys or ""))
    return uplink.with_server_key(candidates[0]) if len(candidates) == 1 else uplink


# -- the host file ------------------------------------------------------------------

def write_host_file(uplink: Uplink) -> Path:
    assert uplink.settings is not None
    path = uplink.runtime_dir / HOST_FILE
    temp = path.with_name(f".{HOST_FILE}.tmp")
    data = {"path": str(uplink.settings.path), "config": uplink.settings.raw,
            "coordinator_key": (uplink.server_key or b"").decode()}
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(msgpack.packb(data, use_bin_type=True))
    os.replace(temp, path)
    return path


def read_host_file(path: Path) -> Uplink:
    """Raises ConfigError (a key file) or OSError / ValueError (the host file itself)."""
    data = msgpack.unpackb(path.read_bytes(), raw=False)
    settings = parse_settings(Path(data["path"]), data["config"])
    uplink = uplink_for(settings)
    key = str(data.get("coordinator_key", "")).encode()
    return uplink.with_server_key(key) if key else uplink


# -- finding the coordinator's key ----------------------------------------------------

_PROBE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class KeyProbe:
    """One DEALER per candidate key to the coordinator: the first whose CURVE
    handshake succeeds wins, and is kept connected (``dealer``, ``monitor``)."""

    def __init__(self, context: zmq.Context[Any], uplink: Uplink,
                 candidates: list[bytes]) -> None:
        assert uplink.keys is not None
        self.uplink = uplink
        self.refused = False  # a server said our key is not on its list
        self.tries: list[tuple[bytes, zmq.Socket[Any], zmq.Socket[Any]]] = []
        for key in candidates:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            make_client(sock, uplink.keys, key)
            monitor = sock.get_monitor_socket(_PROBE_EVENTS)
            sock.connect(uplink.coordinator)
            self.tries.append((key, sock, monitor))

    def poll(self, timeout: float) -> tuple[Uplink, zmq.Socket[Any], zmq.Socket[Any]] | None:
        """(the uplink with the key, the DEALER, its monitor) once a handshake succeeded."""
        poller = zmq.Poller()
        for _, _, monitor in self.tries:
            poller.register(monitor, zmq.POLLIN)
        ready = dict(poller.poll(int(max(0.0, timeout) * 1000))) if self.tries else {}
        for key, sock, monitor in self.tries:
            while monitor in ready and monitor.poll(0):
                event = parse_monitor_message(monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.refused = True
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.tries.remove((key, sock, monitor))
                    self.close()
                    return self.uplink.with_server_key(key), sock, monitor
        return None

    def close(self) -> None:
        for _, sock, monitor in self.tries:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        self.tries = []


def find_coordinator(uplink: Uplink, timeout: float) -> Uplink | None:
    """The uplink with the coordinator's key, or None when no handshake succeeded in time."""
    if uplink.server_key is not None:
        return uplink
    context = zmq.Context()
    probe = KeyProbe(context, uplink, uplink.candidates())
    deadline = time.monotonic() + timeout
    try:
        found = None
        while found is None and time.monotonic() < deadline:
            found = probe.poll(deadline - time.monotonic())
        if found is None:
            return None
        result, sock, monitor = found
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        return result
    finally:
        probe.close()
        context.term()


# -- the coordinator's side ---------------------------------------------------------

def bind_coordinator(context: zmq.Context[Any], settings: Settings, router: zmq.Socket[Any],
                     pub: zmq.Socket[Any]) -> Any:
    """Bind the coordinator's sockets on ipc://, and with ``cluster.bind`` on tcp:// too,
    as CURVE servers. Returns the ZAP authenticator to stop at the end, or None.

    Must run inside the coordinator's event loop. Raises OSError when a key
    file cannot be used, zmq.ZMQError when a port is taken."""
    runtime_dir = settings.cluster.runtime_dir
    authenticator = None
    if settings.cluster.bind:
        from zmq.auth.asyncio import AsyncioAuthenticator

        from cluster.curve import AllowedKeys, make_server

        try:
            uplink = uplink_for(settings)
        except ConfigError as exc:
            raise OSError(str(exc)) from None
        assert uplink.keys is not None
        authenticator = AsyncioAuthenticator(context)
        authenticator.start()
        authenticator.configure_curve_callback("*", AllowedKeys(PublicKeys(uplink.keys)))
        for sock in (router, pub):
            make_server(sock, uplink.keys)
    try:
        router.bind(wire.coordinator_endpoint(runtime_dir))
        pub.bind(wire.events_endpoint(runtime_dir))
        if settings.cluster.bind:
            router_tcp, pub_tcp = wire.coordinator_tcp_endpoints(settings.cluster.bind)
            router.bind(router_tcp)
            pub.bind(pub_tcp)
    except zmq.ZMQError:
        if authenticator is not None:
            authenticator.stop()
        raise
    return authenticator
