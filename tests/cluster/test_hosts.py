"""Between hosts: key files, names, ports, the coordinator's key, whose settings a worker uses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cluster import curve, wire
from cluster.curve import AllowedKeys, PublicKeys, host_of, load_host_keys, write_key_pair
from cluster.hosts import KeyProbe, Uplink, find_coordinator, uplink_for, worker_index
from cluster.settings import load_settings
from cluster.validate import ConfigError


def keys_for(folder: Path, *names: str) -> dict[str, tuple[bytes, bytes]]:
    pairs = {}
    for name in names:
        secret, _ = write_key_pair(folder / name, name)
        pairs[name] = zmq.auth.load_certificate(secret)
    return pairs


def config(folder: Path, cluster: str, extra: str = "") -> Path:
    path = folder / "sendguard.toml"
    path.write_text(f'[tenants]\nfile = "tenants.toml"\n[cluster]\n{cluster}\n{extra}')
    return path


def test_names_ports_and_hosts() -> None:
    assert host_of("mx-1-w12") == "mx-1" and host_of("w0") == ""
    assert worker_index("mx1-w3") == 3 and worker_index("w7") == 7
    assert worker_index("coordinator") is None
    assert wire.worker_endpoint("/run", "tcp://10.0.0.5:7700", "mx1-w3") == "tcp://10.0.0.5:7705"
    assert wire.worker_endpoint("/run", "", "w1") == "ipc:///run/w-w1.sock"
    assert wire.coordinator_tcp_endpoints("tcp://10.0.0.5:7700") == (
        "tcp://10.0.0.5:7700", "tcp://10.0.0.5:7701")


def test_keygen_files_and_refusals(tmp_path: Path) -> None:
    secret, public = write_key_pair(tmp_path / "k", "mx1")
    assert secret.name == "mx1.key_secret" and public.name == "mx1.key"
    assert secret.stat().st_mode & 0o777 == 0o600
    pub, sec = zmq.auth.load_certificate(secret)
    assert sec is not None and zmq.auth.load_certificate(public) == (pub, None)
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "k", "mx1")
    with pytest.raises(ValueError):
        write_key_pair(tmp_path / "k", "../x")


def test_host_keys_refuse_a_public_key_under_this_hosts_name(tmp_path: Path) -> None:
    keys_for(tmp_path, "mx1", "other")
    peers = tmp_path / "peers"
    peers.mkdir()
    shutil.copy(tmp_path / "other" / "other.key", peers / "mx1.key")
    with pytest.raises(ConfigError, match="must not share the name 'mx1'"):
        load_host_keys(tmp_path / "c.toml", tmp_path / "mx1" / "mx1.key_secret", peers)
    with pytest.raises(ConfigError, match="holds no secret-key"):
        load_host_keys(tmp_path / "c.toml", tmp_path / "mx1" / "mx1.key", None)


def test_public_keys_follow_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curve, "_RELOAD_EVERY", 0.0)
    pairs = keys_for(tmp_path, "mx1", "mx2")
    peers = tmp_path / "peers"
    peers.mkdir()
    keys = PublicKeys(load_host_keys(tmp_path / "c.toml", tmp_path / "mx1" / "mx1.key_secret",
                                     peers))
    allowed = AllowedKeys(keys)
    assert keys["mx1-w4"] == pairs["mx1"][0] and "mx2-w0" not in keys
    assert not allowed.callback("*", pairs["mx2"][0])
    shutil.copy(tmp_path / "mx2" / "mx2.key", peers)
    assert keys["mx2-w0"] == pairs["mx2"][0]
    assert allowed.callback("*", pairs["mx2"][0]) and keys.others() == [pairs["mx2"][0]]


def test_uplinks(tmp_path: Path) -> None:
    pairs = keys_for(tmp_path, "mx1", "mx2")
    (tmp_path / "peers").mkdir()
    one = uplink_for(load_settings(config(tmp_path, 'runtime_dir = "run"')))
    assert one.coordinator.startswith("ipc://") and one.keys is None and one.worker_name(2) == "w2"

    here = uplink_for(load_settings(config(tmp_path, '''bind = "tcp://10.0.0.5:7700"
curve_secret_key = "mx1/mx1.key_secret"
curve_public_keys = "peers"''')))
    assert here.coordinator.startswith("ipc://") and here.server_key == pairs["mx1"][0]
    assert here.worker_name(0) == "mx1-w0"

    joining = '''coordinator = "tcp://10.0.0.5:7700"
bind = "tcp://10.0.0.6:7700"
curve_secret_key = "mx2/mx2.key_secret"
curve_public_keys = "peers"'''
    with pytest.raises(ConfigError, match="public key of the host that runs the coordinator"):
        uplink_for(load_settings(config(tmp_path, joining)))
    shutil.copy(tmp_path / "mx1" / "mx1.key", tmp_path / "peers")
    there = uplink_for(load_settings(config(tmp_path, joining)))
    assert (there.coordinator, there.events) == ("tcp://10.0.0.5:7700", "tcp://10.0.0.5:7701")
    assert there.server_key == pairs["mx1"][0] and there.remote


def test_a_joining_host_keeps_its_own_sections(tmp_path: Path) -> None:
    keys_for(tmp_path, "mx1", "mx2")
    (tmp_path / "peers").mkdir()
    shutil.copy(tmp_path / "mx1" / "mx1.key", tmp_path / "peers")
    path = tmp_path / "sendguard.toml"
    path.write_text('''[server]
listen = ["127.0.0.1:2525"]
[cluster]
coordinator = "tcp://10.0.0.5:7700"
bind = "tcp://10.0.0.6:7700"
curve_secret_key = "mx2/mx2.key_secret"
curve_public_keys = "peers"
[[limits]]
window = "1m"
max = 999
''')
    uplink = uplink_for(load_settings(path))  # no [tenants]: the coordinator's host has them
    theirs = {"server": {"listen": ["0.0.0.0:587"]}, "tenants": {"file": "t.toml"},
              "limits": [{"window": "1h", "max": 5}], "cluster": {"bind": "tcp://10.0.0.5:7700"}}
    message = wire.SnapshotMessage(3, "/elsewhere/sendguard.toml", theirs, {}, "t1", None, "")
    mine = uplink.adapt(message)
    assert mine.config_path == str(path)
    assert mine.config["server"] == {"listen": ["127.0.0.1:2525"]}
    assert mine.config["limits"] == [{"window": "1h", "max": 5}]
    assert mine.config["cluster"]["coordinator"] == "tcp://10.0.0.5:7700"


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:7700", "tcp://*:7700", "tcp://10.0.0.5",
                                  "tcp://10.0.0.5:65500"])
def test_bind_must_be_a_reachable_address_with_room_for_the_ports(tmp_path: Path,
                                                                  bind: str) -> None:
    path = config(tmp_path, f'bind = "{bind}"\ncurve_secret_key = "k"')
    with pytest.raises(ConfigError, match="cluster.bind"):
        load_settings(path)


def test_the_probe_finds_the_coordinators_key_among_several(tmp_path: Path) -> None:
    pairs = keys_for(tmp_path, "mx1", "mx2", "mx3")
    peers = tmp_path / "peers"
    peers.mkdir()
    for name in ("mx1", "mx3"):
        shutil.copy(tmp_path / name / f"{name}.key", peers)
    context = zmq.Context()
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(tmp_path / "mx2"))
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.curve_publickey, router.curve_secretkey = pairs["mx1"]
    router.curve_server = True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        path = config(tmp_path, f'''coordinator = "tcp://127.0.0.1:{port}"
bind = "tcp://127.0.0.1:7700"
curve_secret_key = "mx2/mx2.key_secret"
curve_public_keys = "peers"''')
        uplink = uplink_for(load_settings(path))
        assert uplink.server_key is None  # two candidates
        found = find_coordinator(uplink, 10.0)
        assert found is not None and found.server_key == pairs["mx1"][0]

        # A server that does not list our key: no handshake, and the refusal is seen.
        authenticator.configure_curve(domain="*", location=str(tmp_path / "mx3"))
        probe = KeyProbe(context, uplink, [pairs["mx1"][0]])
        try:
            for _ in range(50):
                if probe.poll(0.2) is not None or probe.refused:
                    break
            assert probe.refused
        finally:
            probe.close()
    finally:
        router.close()
        authenticator.stop()
        context.term()


def test_a_local_uplink_is_plain_ipc(tmp_path: Path) -> None:
    uplink = Uplink.local(tmp_path)
    assert uplink.events == wire.events_endpoint(tmp_path) and not uplink.tcp
    assert uplink.counter_keys() is None
