"""The supervisor's DEALER to the coordinator, on this host or on another.

On the coordinator's own host the line exists from the start. On a host that
joins another's coordinator it exists only once one of the candidate keys
was let in (:class:`~cluster.hosts.KeyProbe`): until then :attr:`ready` is
false and the supervisor starts no worker. After that, every new CURVE
handshake (the other host's coordinator restarted, the network came back)
makes :meth:`step` return true, so the supervisor introduces itself again:
a new coordinator would not know this host's supervisor otherwise.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster.hosts import KeyProbe, Uplink
from cluster.logjson import log_event

WAITING_LOG_EVERY = 10.0


class SupervisorLine:
    def __init__(self, context: zmq.Context[Any], poller: zmq.Poller, uplink: Uplink) -> None:
        self.uplink = uplink
        self.poller = poller
        self.dealer: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.probe: KeyProbe | None = None
        if uplink.remote:
            self.probe = KeyProbe(context, uplink, uplink.candidates())
            self._logged_at = time.monotonic()
            self._refusal_logged = False
            return
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        uplink.secure(dealer)
        dealer.connect(uplink.coordinator)
        self._attach(dealer, None)

    @property
    def ready(self) -> bool:
        return self.dealer is not None

    def _attach(self, dealer: zmq.Socket[bytes], monitor: zmq.Socket[bytes] | None) -> None:
        self.dealer, self.monitor = dealer, monitor
        self.poller.register(dealer, zmq.POLLIN)
        if monitor is not None:
            self.poller.register(monitor, zmq.POLLIN)

    def step(self, events: dict[Any, int]) -> bool:
        """After a poll: True when the coordinator was (re)joined and should hear from us."""
        if self.probe is not None:
            return self._look_for_coordinator()
        joined = False
        if self.monitor is not None and self.monitor in events:
            while self.monitor.poll(0):
                event = parse_monitor_message(self.monitor.recv_multipart())["event"]
                joined = joined or event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        return joined

    def _look_for_coordinator(self) -> bool:
        assert self.probe is not None
        found = self.probe.poll(0)
        if found is None:
            now = time.monotonic()
            refused = self.probe.refused and not self._refusal_logged
            if refused or now - self._logged_at >= WAITING_LOG_EVERY:
                self._logged_at, self._refusal_logged = now, self.probe.refused
                log_event("coordinator_unreachable", logging.WARNING,
                          endpoint=self.uplink.coordinator, key_refused=self.probe.refused,
                          host=self.uplink.keys.host if self.uplink.keys else None)
            return False
        self.probe = None
        self.uplink, dealer, monitor = found
        log_event("coordinator_reached", endpoint=self.uplink.coordinator)
        self._attach(dealer, monitor)
        return True

    def send(self, frame: bytes) -> None:
        if self.dealer is None:
            return
        try:
            self.dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the coordinator is down; it learns the state again when it restarts

    def receive(self) -> list[bytes]:
        frames: list[bytes] = []
        while self.dealer is not None:
            try:
                frames.append(self.dealer.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        return frames

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.dealer is not None:
            if self.monitor is not None:
                self.dealer.disable_monitor()
                self.monitor.close()
            self.dealer.close()
