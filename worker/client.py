"""What the policies know of one SMTP connection, from its banner to its end.

The protocol object (worker/smtp.py) makes one per connection; the engine,
the policies, the decision log, DKIM signing and the trace header read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.tenants import Account


@dataclass(slots=True)
class Client:
    """What the policies know of one SMTP connection; lives as long as it."""

    sid: str
    ip: str
    key: str
    trusted: bool
    tls: bool = False
    helo: str = ""
    account: Account | None = None
    # Looked up once per session when first needed: None not yet, "" not in the database.
    country: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
