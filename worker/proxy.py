"""PROXY protocol v1 and v2 (HAProxy's ``proxy-protocol.txt``): the header a load balancer
sends before the client's first byte, naming the client's real address.

The header is read straight from the accepted socket, before TLS and before
the SMTP protocol object exists, so it works the same on STARTTLS and on
implicit-TLS listeners. The reader never consumes a byte past the header:

- v1 (``PROXY TCP4 src dst sport dport\\r\\n``, at most 107 bytes): bytes are
  peeked and only those up to the first LF are taken;
- v2 (12-byte signature, version/command, family, 16-bit length): the fixed
  16 bytes, then exactly the declared length, which must not exceed
  ``MAX_V2_PAYLOAD``.

Anything else is a :class:`ProxyError`. The caller bounds the whole read with
``server.proxy_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

V1_MAX = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Addresses (at most 216 bytes, for AF_UNIX) plus the TLVs HAProxy may add
# (unique id, ALPN, authority, SSL details) fit well under this.
MAX_V2_PAYLOAD = 4096

_V2_COMMANDS = {0x0: "local", 0x1: "proxy"}
# family -> (address bytes, unpack format) for the families that carry IP addresses
_V2_INET = {0x1: (12, "!4s4sHH"), 0x2: (36, "!16s16sHH")}
_V2_UNSPEC, _V2_UNIX = 0x0, 0x3
_V2_STREAM = 0x1


class ProxyError(ValueError):
    """Not a valid PROXY header (or the connection ended inside it)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    command: str  # "proxy", or "local" for the balancer's own health checks
    # The client's (address, port); None when the header carries no usable
    # address (v2 LOCAL, UNSPEC or UNIX, v1 UNKNOWN): the connection's own
    # endpoints apply then.
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


# -- parsing --------------------------------------------------------------------

def parse_v1(line: bytes) -> ProxyHeader:
    """One complete v1 line, CRLF included."""
    if len(line) > V1_MAX:
        raise ProxyError(f"v1 header longer than {V1_MAX} bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyError("v1 header does not start with 'PROXY ' and end with CRLF")
    try:
        text = line[len(V1_PREFIX):-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    if "\r" in text or "\n" in text:
        raise ProxyError("v1 header has a stray CR or LF")
    if text == "UNKNOWN" or text.startswith("UNKNOWN "):
        return ProxyHeader(1, "proxy")
    parts = text.split(" ")
    if len(parts) != 5 or parts[0] not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 header is not 'TCP4|TCP6 src dst sport dport': {text[:60]!r}")
    version = 4 if parts[0] == "TCP4" else 6
    source = (_v1_address(parts[1], version), _v1_port(parts[3]))
    destination = (_v1_address(parts[2], version), _v1_port(parts[4]))
    return ProxyHeader(1, "proxy", source, destination)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1 header has a bad address {text[:45]!r}") from None
    if address.version != version:
        raise ProxyError(f"v1 header has an IPv{address.version} address for TCP{version}")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535:
        raise ProxyError(f"v1 header has a bad port {text[:8]!r}")
    return int(text)


def v2_payload_length(fixed: bytes) -> int:
    """The declared length from the first 16 bytes of a v2 header, once they are checked."""
    if len(fixed) != 16 or not fixed.startswith(V2_SIGNATURE):
        raise ProxyError("v2 header has a bad signature")
    if fixed[12] >> 4 != 2:
        raise ProxyError(f"v2 header has version {fixed[12] >> 4}, not 2")
    if fixed[12] & 0x0F not in _V2_COMMANDS:
        raise ProxyError(f"v2 header has unknown command {fixed[12] & 0x0F}")
    (length,) = struct.unpack("!H", fixed[14:16])
    if length > MAX_V2_PAYLOAD:
        raise ProxyError(f"v2 header declares {length} bytes, more than {MAX_V2_PAYLOAD}")
    return length


def parse_v2(fixed: bytes, payload: bytes) -> ProxyHeader:
    """A v2 header: its fixed 16 bytes and the declared number of payload bytes."""
    if len(payload) != v2_payload_length(fixed):
        raise ProxyError("v2 header is shorter than its declared length")
    command = _V2_COMMANDS[fixed[12] & 0x0F]
    family, transport = fixed[13] >> 4, fixed[13] & 0x0F
    if command == "local":
        # A health check from the balancer itself; the addresses, if any, are ignored.
        return ProxyHeader(2, "local")
    if family in (_V2_UNSPEC, _V2_UNIX):
        return ProxyHeader(2, "proxy")
    if family not in _V2_INET:
        raise ProxyError(f"v2 header has unknown address family {family}")
    if transport != _V2_STREAM:
        raise ProxyError(f"v2 header has transport {transport}, not STREAM")
    size, layout = _V2_INET[family]
    if len(payload) < size:
        raise ProxyError(f"v2 header's {len(payload)} bytes cannot hold its addresses")
    src, dst, sport, dport = struct.unpack(layout, payload[:size])
    return ProxyHeader(2, "proxy", (str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport))


# -- reading from a socket --------------------------------------------------------

class _Reader:
    """Length-bounded reads from a non-blocking socket that is not yet a transport's."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.taken = 0

    async def _readable(self) -> None:
        waiter = self.loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await waiter
        finally:
            self.loop.remove_reader(fd)

    async def _recv(self, size: int, flags: int = 0) -> bytes:
        while True:
            try:
                data = self.sock.recv(size, flags)
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if not data:
                raise ProxyError(f"connection closed after {self.taken} bytes of the header")
            return data

    async def exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            data = await self._recv(size - len(chunks))
            self.taken += len(data)
            chunks += data
        return bytes(chunks)

    async def line(self, limit: int) -> bytes:
        """Up to and including the first LF, at most ``limit`` bytes; nothing after it."""
        chunks = bytearray()
        while True:
            peeked = await self._recv(limit - len(chunks), socket.MSG_PEEK)
            end = peeked.find(b"\n")
            # Only header bytes are taken: up to the LF, or all of them while none has come.
            take = len(peeked) if end < 0 else end + 1
            chunks += await self.exactly(take)
            if end >= 0:
                return bytes(chunks)
            if len(chunks) >= limit:
                raise ProxyError(f"v1 header longer than {V1_MAX} bytes")


async def read_header(sock: socket.socket) -> ProxyHeader:
    """Read and parse the PROXY header at the start of ``sock`` (non-blocking)."""
    reader = _Reader(sock)
    start = await reader.exactly(len(V1_PREFIX))
    if start == V1_PREFIX:
        return parse_v1(start + await reader.line(V1_MAX - len(V1_PREFIX)))
    if start == V2_SIGNATURE[:len(start)]:
        fixed = start + await reader.exactly(16 - len(start))
        return parse_v2(fixed, await reader.exactly(v2_payload_length(fixed)))
    raise ProxyError(f"not a PROXY header: starts with {start!r}")
