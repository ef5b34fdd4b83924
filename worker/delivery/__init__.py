"""Outbound delivery of one worker's spool: queue manager, SMTP client, DSNs.

- ``agent``: :class:`DeliveryAgent`, the queue manager (scheduling, retries,
  expiry, the operator's list/flush/delete);
- ``sessions``: per-destination queues and connection limits;
- ``route`` / ``transport``: next hops (MX or smarthost) and the SMTP client;
- ``dsn``: RFC 3464 delivery status notifications;
- ``feedback``: delivery outcomes into the bounce ratio (SPEC §3.6).
"""

from __future__ import annotations

from worker.delivery.agent import DeliveryAgent
from worker.delivery.dsn import build_dsn
from worker.delivery.result import BOUNCED, DEFERRED, DELIVERED, Result

__all__ = ["BOUNCED", "DEFERRED", "DELIVERED", "DeliveryAgent", "Result", "build_dsn"]
