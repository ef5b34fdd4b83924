"""Why an admin request was not done: one sentence for the person who asked, and a kind.

The admin socket sends the sentence; the HTTP API also needs the kind, as
its status code (:mod:`coordinator.http_api`).
"""

from __future__ import annotations


class AdminError(Exception):
    """The request cannot be done as asked (bad input, a state that forbids it)."""

    status = 400


class NotFound(AdminError):
    """What it names is not there: an account, a domain, a session no worker remembers."""

    status = 404


class Unavailable(AdminError):
    """The cluster cannot answer now: no worker in the ring, none answered in time."""

    status = 503
