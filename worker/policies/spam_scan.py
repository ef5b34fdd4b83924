"""SPEC §3.7, first half: every message is classified at the end of DATA.

The classification itself refuses nothing (spam_grace.py decides what a
spam verdict costs); a scanner that gives no verdict follows
``spam.on_error``: ``tempfail`` answers 451, ``accept`` lets the message
through with an ``X-Spam-Scan: skipped`` header and a warning line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cluster.logjson import log_event
from worker import replies
from worker.policies import CONTINUE, Verdict, tempfail
from worker.policies.base import Counts, Decision, Policy
from worker.spam import ScannerUnavailable, ScanRequest, ScanResult, SpamScanner


class SpamScanPolicy(Policy):
    name = "spam"

    def __init__(self, scanner: Callable[[], SpamScanner]) -> None:
        # The scanner of the settings in force (a reload may replace it).
        self.scanner = scanner

    async def judge(self, decision: Decision, counts: Counts) -> Verdict:
        client = decision.client
        request = ScanRequest(
            message=decision.content,
            mail_from=decision.sender,
            rcpt_tos=decision.rcpt_tos,
            client_ip=client.ip,
            helo=client.helo,
            user=client.account.user if client.account else "",
            session_id=client.sid,
        )
        scanner = self.scanner()
        try:
            scan = await scanner.scan(request)
        except ScannerUnavailable as exc:
            if decision.snapshot.settings.spam.on_error == "tempfail":
                decision.found["backend"] = scanner.name
                return tempfail(self.name, replies.SCAN_UNAVAILABLE.format(sid=client.sid),
                                str(exc))
            log_event("scan_skipped", logging.WARNING, sid=client.sid, client_ip=client.ip,
                      policy=self.name, reason=str(exc))
            decision.skipped = str(exc) or f"{scanner.name}: unavailable"
            scan = ScanResult(False, 0.0, (), scanner.name, "skipped")
        decision.scan = scan
        decision.found.update(score=scan.score, symbols=list(scan.symbols), backend=scan.backend,
                              scan_action=scan.action or None)
        return CONTINUE
