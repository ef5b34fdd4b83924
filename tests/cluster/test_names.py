"""Address normalisation: A-labels, and the client key of IPv4, IPv6 and mapped addresses."""

from __future__ import annotations

import pytest

from cluster.names import BadDomain, client_key, normalise_address, plain_ip, to_alabel


@pytest.mark.parametrize("domain, alabel", [
    ("Kowalski.PL", "kowalski.pl"),
    ("zażółć.pl", "xn--za-6ja4f8n1l.pl"),
    ("ZAŻÓŁĆ.PL", "xn--za-6ja4f8n1l.pl"),
    ("xn--za-6ja4f8n1l.pl", "xn--za-6ja4f8n1l.pl"),
    ("example.com.", "example.com"),
])
def test_alabel(domain: str, alabel: str) -> None:
    assert to_alabel(domain) == alabel


@pytest.mark.parametrize("domain", ["", ".", "a..b", "-" * 64 + ".pl", "bad domain.pl"])
def test_not_a_domain(domain: str) -> None:
    with pytest.raises(BadDomain):
        to_alabel(domain)


def test_local_part_kept_as_sent() -> None:
    assert normalise_address("Jan.Kowalski@Zażółć.PL") == "Jan.Kowalski@xn--za-6ja4f8n1l.pl"


@pytest.mark.parametrize("ip, key", [
    ("127.0.0.5", "127.0.0.5"),
    ("::ffff:127.0.0.5", "127.0.0.5"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_plain_ip() -> None:
    assert plain_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert plain_ip("::1") == "::1"
