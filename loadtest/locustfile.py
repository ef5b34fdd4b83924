"""Locust against any SMTP submission server (sendguard or another).

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host smtp://127.0.0.1:2587 --smtp-accounts accounts.csv \\
        --smtp-rcpt-domain example.org --source-ips 127.0.0.2-127.0.0.120

Options of this file (besides Locust's own):

--smtp-accounts FILE      CSV lines ``user,password[,sender]``; the sender
                          defaults to the user; an empty password (or no
                          file) sends without AUTH, as to a relay
--smtp-rcpt-domain DOMAIN recipients are random local parts at DOMAIN
--smtp-tls MODE           none | starttls (default) | implicit;
                          certificates are not verified
--source-ips FIRST-LAST   client source addresses, spread over users
--messages-per-session N  default 1
--message-size BYTES      default 1024

Each SMTP step (connect, AUTH, MAIL, RCPT, DATA) is a request of type
``SMTP``; a refusal fails it with the reply as the error (the session id
written ``{sid}``, so the failure table counts refusals by kind). Headless Locust
exits 1 when any request failed, so a run against a limit that refuses is
expected to exit 1: read the failure table.
"""

from __future__ import annotations

import sys
from typing import Any

from locust import events

from loadtest.smtp_user import TLS_MODES, SmtpUser, address_range, parse_host, read_accounts


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("SMTP submission")
    group.add_argument("--smtp-accounts", default="", metavar="FILE",
                       help="CSV lines user,password[,sender]; none: no AUTH")
    group.add_argument("--smtp-rcpt-domain", default="example.org", metavar="DOMAIN",
                       help="recipients are random local parts at this domain")
    group.add_argument("--smtp-tls", default="starttls", choices=TLS_MODES,
                       help="none | starttls | implicit (certificates are not verified)")
    group.add_argument("--source-ips", default="", metavar="FIRST-LAST",
                       help="client source addresses spread over users, "
                            "e.g. 127.0.0.2-127.0.0.120")
    group.add_argument("--messages-per-session", type=int, default=1, metavar="N")
    group.add_argument("--message-size", type=int, default=1024, metavar="BYTES")


@events.init.add_listener
def _configure(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # library use: the caller sets the class attributes
        return
    try:
        parse_host(options.host)
        SubmissionUser.accounts = read_accounts(options.smtp_accounts) \
            if options.smtp_accounts else []
        SubmissionUser.source_ips = address_range(options.source_ips) \
            if options.source_ips else []
        if options.messages_per_session < 1 or options.message_size < 0:
            raise ValueError("--messages-per-session must be 1 or more, "
                             "--message-size 0 or more")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"locustfile: {exc}\n")
        raise SystemExit(2) from None
    SubmissionUser.rcpt_domain = options.smtp_rcpt_domain
    SubmissionUser.tls = options.smtp_tls
    SubmissionUser.messages_per_session = options.messages_per_session
    SubmissionUser.message_size = options.message_size


class SubmissionUser(SmtpUser):
    """Configured by the options above."""
