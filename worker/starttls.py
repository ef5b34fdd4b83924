"""STARTTLS through the event loop's own TLS instead of aiosmtpd's.

aiosmtpd 1.4 upgrades a connection by wiring ``asyncio.sslproto`` in by
hand: every byte of the session then goes through the pure-Python TLS
layer, about a tenth of a worker's CPU. ``loop.start_tls()`` does the same
job in uvloop's compiled TLS layer, the one implicit-TLS listeners already
use (``create_server(ssl=...)``). It does not call ``connection_made``
again, so what aiosmtpd does there after a STARTTLS is done here: the
stream reader and writer move to the TLS transport, plaintext the client
sent after the command is discarded (RFC 3207 §4.2 asks for a new session
state, and bytes pipelined after STARTTLS were never protected), and a new
``Session`` starts with the TLS details in ``session.ssl``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP

from cluster.logjson import log_event

# What aiosmtpd's SSLProtocol put in ``session.ssl`` (its ``_extra``).
_TLS_DETAILS = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")


async def upgrade(protocol: SMTP, *, sid: str, client_ip: str) -> bool:
    """Answer a STARTTLS the session accepted and run the handshake; True once the
    session is encrypted.

    A failed handshake closes the connection and ends the session (the
    client is told nothing more: the wire is neither plaintext nor TLS).
    """
    assert protocol.tls_context is not None
    await protocol.push("220 Ready to start TLS")
    plain = protocol.transport
    assert plain is not None
    try:
        secure = await protocol.loop.start_tls(plain, protocol,  # type: ignore[arg-type]
                                               protocol.tls_context, server_side=True)
    except (OSError, ssl.SSLError, TimeoutError, RuntimeError) as exc:
        log_event("tls_failed", logging.INFO, sid=sid, client_ip=client_ip,
                  error=str(exc) or type(exc).__name__)
        plain.abort()  # type: ignore[attr-defined]
        # The plain transport now belongs to the TLS layer, which does not
        # report its loss to us: end the session as aiosmtpd would.
        protocol.connection_lost(exc)
        return False
    if secure is None:  # typeshed allows it; uvloop returns the transport or raises
        protocol.connection_lost(None)
        return False
    _switch(protocol, plain, secure)
    return True


def _switch(protocol: Any, plain: asyncio.BaseTransport, secure: asyncio.BaseTransport) -> None:
    """What aiosmtpd's ``connection_made`` does after its own STARTTLS."""
    protocol._original_transport = plain
    # aiosmtpd tests the truth of this to know the session is encrypted
    # (STARTTLS no longer offered, AUTH allowed with auth_require_tls).
    protocol._tls_protocol = secure
    protocol.transport = secure
    protocol._reader._transport = secure
    protocol._writer._transport = secure
    protocol._replace_writer(protocol._writer)
    protocol._reader._buffer.clear()
    protocol._set_rset_state()
    protocol.session = protocol._create_session()
    protocol.session.peer = secure.get_extra_info("peername")
    protocol.session.ssl = {name: secure.get_extra_info(name) for name in _TLS_DETAILS}
    protocol._reset_timeout()
    hook = protocol._handle_hooks.get("STARTTLS")
    protocol._tls_handshake_okay = True if hook is None else hook(
        protocol, protocol.session, protocol.envelope)
