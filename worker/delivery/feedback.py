"""Delivery outcomes into the submitting client's bounce ratio (SPEC §3.6).

A message is counted at most once as undeliverable: the first time an
attempt leaves any recipient bounced or deferred, one is added to the
``bad`` series of ``bounce:<client>`` in the bucket of the message's
acceptance time, where the MAIL check compares it with the ``acc`` series.
If the message later ends with every recipient delivered, the one is taken
back. Whether it was counted is kept in the spool record itself, so a
restart neither counts it twice nor forgets to take it back.

Messages from the null sender (our own DSNs) and from trusted networks are
never counted. The mark is sent before the record is written: a crash in
between may count a message twice, never let one go uncounted, so a
failure can only make the check stricter, as every counter failure should.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cluster.counting import Op
from cluster.keys import UNDELIVERABLE, bounce_key
from cluster.logjson import log_event
from cluster.names import client_key
from worker.counters.client import CounterClient, CounterUnavailable
from worker.delivery.result import BOUNCED, DEFERRED, DELIVERED
from worker.spool import SpoolRecord


class BounceFeedback:
    def __init__(self, counters: CounterClient, window: Callable[[], float],
                 is_trusted: Callable[[str], bool]) -> None:
        self._counters = counters
        self._window = window
        self._is_trusted = is_trusted

    def exempt(self, record: SpoolRecord) -> bool:
        return record.mail_from == "" or self._is_trusted(record.client_ip)

    async def settle(self, record: SpoolRecord) -> None:
        """Count or uncount ``record`` after an attempt; updates its flag in place."""
        if self.exempt(record):
            return
        statuses = {r.status for r in record.recipients}
        if not record.counted_undeliverable and statuses & {BOUNCED, DEFERRED}:
            amount = 1
        elif record.counted_undeliverable and statuses == {DELIVERED}:
            amount = -1
        else:
            return
        op = Op(bounce_key(client_key(record.client_ip)), UNDELIVERABLE, self._window(), None,
                amount=amount, at=record.received_at)
        try:
            await self._counters.mark([op])
        except CounterUnavailable as exc:
            # Unchanged flag: the next attempt that ends the same way tries again.
            log_event("bounce_mark_failed", logging.WARNING, queue_id=record.queue_id,
                      client_ip=record.client_ip, amount=amount, error=str(exc))
            return
        record.counted_undeliverable = amount > 0
