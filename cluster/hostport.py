"""``HOST:PORT`` as configuration writes it: the one parser for every address setting.

``[2001:db8::1]:25`` brackets an IPv6 address. With a port required, the
last colon separates it (``::1:587`` is ``::1`` port 587, as the settings
have always read it); with a default port, a bare IPv6 address is all host.
"""

from __future__ import annotations


class BadPort(ValueError):
    """The port is not a number in range (the host part was well formed)."""


def split_host_port(text: str, default_port: int | None = None, *,
                    allow_zero: bool = False) -> tuple[str, int]:
    """``(host, port)``, the host without brackets; ValueError when ``text`` is not
    ``HOST:PORT`` (or ``HOST`` when there is a ``default_port``), BadPort when the
    port is not from 1 (0 with ``allow_zero``) to 65535."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"not HOST:PORT: {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1 or (default_port is None and ":" in text):
        host, _, port_text = text.rpartition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"no port in {text!r}")
        return host, default_port
    if not port_text.isdigit() or not (0 if allow_zero else 1) <= int(port_text) <= 65535:
        raise BadPort(f"bad port in {text!r}")
    return host, int(port_text)
