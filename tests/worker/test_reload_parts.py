"""What a reload rebuilds in a worker (cluster/reload.py): the resolver and the spam scanner.

Over real parts: two DNS servers on loopback, the scanners' own classes.
The cluster-wide behaviour (SIGHUP through the coordinator) is in
tests/integration/test_cluster_reload.py.
"""

from __future__ import annotations

from dataclasses import replace

from dnsserver import TestDNSServer

from cluster.reload import RESTART_ONLY, needs_restart
from cluster.settings import SpamSettings, parse_settings
from worker.builder import ScannerSlot
from worker.dns import DestinationStatus, DomainResolver


async def test_a_reconfigured_resolver_asks_the_new_servers_and_forgets_old_answers() -> None:
    with TestDNSServer() as old, TestDNSServer() as new:
        old.add_mx("moved.test", "mx.moved.test", 10)
        resolver = DomainResolver([old.address], 2.0)
        try:
            assert await resolver.destination_status("moved.test") is DestinationStatus.OK
            assert not resolver.reconfigure([old.address], 2.0)  # the same: nothing to do
            assert resolver.reconfigure([new.address], 2.0)
            assert await resolver.destination_status("moved.test") is DestinationStatus.INVALID
            assert ("moved.test", "MX") in new.queries
        finally:
            await resolver.close()


async def test_the_scanner_is_replaced_when_how_to_reach_it_changes() -> None:
    spam = SpamSettings("builtin", ("reject",), "", 3, 3600.0, "tempfail", 0.05)
    slot = ScannerSlot(spam)
    first = slot()
    slot.follow(replace(spam, grace=5))  # read per use: no new scanner for it
    assert slot() is first
    slot.follow(replace(spam, backend="spamd", url="127.0.0.1:1"))
    assert slot().name == "spamd" and first.name == "builtin"
    slot.follow(replace(spam, backend="spamd", url="127.0.0.1:1", grace=1))
    assert slot().name == "spamd"
    await slot().close()


def test_needs_restart_names_only_what_changed(tmp_path) -> None:  # noqa: ANN001
    def settings(**server: object) -> object:
        return parse_settings(tmp_path / "s.toml", {
            "server": {"listen": ["127.0.0.1:2587"], **server}, "tenants": {"file": "t.toml"}})

    base = settings()
    assert needs_restart(base, settings(max_recipients=5, hostname="other.test")) == []
    assert needs_restart(base, settings(listen=["127.0.0.1:2588"], proxy_protocol=True,
                                        proxy_networks=["10.0.0.0/8"])) == [
        "server.listen", "server.proxy_protocol"]
    assert all(key.count(".") == 1 for key in RESTART_ONLY)
