"""Domain and address normalisation: A-labels, case, IPv6 /64 keys.

Domains are compared and looked up in their A-label form whichever form
the client or the tenant directory used (SPEC §3), and lower-cased; local
parts are kept as sent.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import idna


class BadDomain(ValueError):
    pass


@lru_cache(maxsize=65536)
def to_alabel(domain: str) -> str:
    """``"Zażółć.PL"`` → ``"xn--za-6ja4f8n1l.pl"``; raises BadDomain when not a domain."""
    name = domain.strip().rstrip(".")
    if not name:
        raise BadDomain(domain)
    if name.isascii():
        lowered = name.lower()
        if all(_ascii_label_ok(label) for label in lowered.split(".")):
            return lowered
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        raise BadDomain(domain) from None


def _ascii_label_ok(label: str) -> bool:
    return 0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)


def split_address(address: str) -> tuple[str, str]:
    """``"Jan@Kowalski.PL"`` → ``("Jan", "kowalski.pl")``; BadDomain when there is no domain."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise BadDomain(address)
    return local, to_alabel(domain)


# C0 and C1 controls and DEL, and the lone surrogates that stand for bytes
# that were not UTF-8 (aiosmtpd decodes command arguments with surrogateescape).
_UNUSABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def has_unusable_characters(text: str) -> bool:
    """A control character, or a byte that was not UTF-8 (a lone surrogate)."""
    return _UNUSABLE.search(text) is not None


def usable_text(text: str) -> str:
    """``text`` with each control character and byte that was not UTF-8 replaced by "?":
    what a client named itself (HELO) goes into the spool, a scanner's request and a
    header, and none of them can carry such characters."""
    return _UNUSABLE.sub("?", text)


def address_problem(address: str) -> str | None:
    """Why an envelope address (as parsed, without angle brackets) is unusable, or None.

    An address must be ``local@domain`` with a domain name (IDNA allowed) or
    an address literal, and hold no control character and no byte that is
    not UTF-8: such an address could not be written to the spool, sent to a
    scanner or delivered as it was given.
    """
    if _UNUSABLE.search(address):
        return "control character or bytes that are not UTF-8"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "not local@domain"
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
        elif ":" in literal:
            return "address literal"
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return "address literal"
        return None
    try:
        to_alabel(domain)
    except BadDomain:
        return "domain"
    return None


def normalise_address(address: str) -> str:
    local, domain = split_address(address)
    return f"{local}@{domain}"


def client_key(ip: str) -> str:
    """The address a client is counted under: IPv4 as is, IPv6 by its /64 prefix.

    An IPv4-mapped IPv6 address is an IPv4 client; a host can rotate through a
    whole /64, so every address in one counts as one client.
    """
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((int(address) >> 64 << 64, 64))
        return str(network)
    return str(address)


def plain_ip(ip: str) -> str:
    """The peer address with an IPv4-mapped IPv6 form turned back into IPv4."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
