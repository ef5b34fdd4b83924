"""Limit accuracy under load: the checks of ``sendguard loadtest accuracy``, and a CI-sized run.

The run (2 workers, 30 users, 15 s of Locust against a real cluster) goes
through the CLI in a subprocess of its own: Locust gevent-patches whatever
process imports it. The checks themselves are plain functions, tested here
without Locust.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loadtest.accuracy import Scenario, compare
from loadtest.accuracy_load import OFF_STAGE, WRONG, classify

ROOT = Path(__file__).resolve().parents[2]
SID = "0VcDSZo4rkTLniBp6a3mcS"


@pytest.mark.parametrize(("step", "reply", "kind"), [
    ("MAIL", f"550 5.1.0 {SID} policy violation", "550 5.1.0 {sid} policy violation"),
    ("DATA", f"550 5.1.0 {SID} policy violation", "550 5.1.0 {sid} policy violation"),
    ("MAIL", "550 5.1.0 <a@loadtest.pl> sender rejected", "550 5.1.0 <{sender}> sender rejected"),
    ("RCPT", f"421 4.3.2 {SID} service shutting down", "421 4.3.2 {sid} service shutting down"),
    ("AUTH", f"451 4.3.0 {SID} temporary policy failure, try later",
     "451 4.3.0 {sid} temporary policy failure, try later" + OFF_STAGE),
    ("MAIL", f"550 5.1.0 {SID} policy violation.", WRONG),
    ("MAIL", "550 5.1.0 0VcDSZo4rkTLniBp6a3mcX policy violation", WRONG),
    ("MAIL", "550 5.1.0 <b@loadtest.pl> sender rejected", WRONG),
    ("DATA", f"550 5.7.1 {SID} policy violation", WRONG),
])
def test_refusals_are_checked_to_the_letter_with_the_sessions_own_id(
        step: str, reply: str, kind: str) -> None:
    assert classify(step, reply, SID, "a@loadtest.pl") == kind


def test_a_greeting_without_an_id_still_needs_an_id_of_the_right_form() -> None:
    assert classify("connect", f"421 4.3.2 {SID} service shutting down", "", "x") != WRONG
    assert classify("connect", "421 4.3.2 abc service shutting down", "", "x") == WRONG


def test_over_admission_counts_messages_delivered_though_their_reply_was_lost() -> None:
    scenario = Scenario(account_limits=(2,), ip_limit=100)
    load = {
        "sent": {t: ["a1@loadtest.pl", "127.0.20.1"] for t in ("t1", "t2", "t3", "t4")},
        "acked": {"t1": "q1", "t2": "q2"},
        "refusals": [["MAIL", "550 5.1.0 {sid} policy violation", "a1@loadtest.pl",
                      "127.0.20.1", 5]],
        "errors": {}, "wrong": [], "wrong_count": 0, "requests": {},
    }
    result = compare(scenario, load, Counter({"t1": 1, "t2": 1, "t3": 1}))
    rows = {row["key"]: row for row in result["rows"]}
    assert rows["acct:a1@loadtest.pl"] == {"key": "acct:a1@loadtest.pl", "limit": 2,
                                           "accepted": 3, "refused": 5, "over": 1, "lost": 0}
    assert result["failures"] == ["1 message(s) over a limit"]

    result = compare(scenario, load, Counter({"t1": 1}))
    assert result["lost"] == 1 and result["over_admission"] == 0
    assert result["failures"] == ["1 acknowledged message(s) never reached the sink"]


@pytest.mark.integration
@pytest.mark.timeout(400)
@pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                    reason="locust is not installed (pip install -e '.[load]')")
def test_no_key_admits_a_message_over_its_limit_and_nothing_acknowledged_is_lost() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "loadtest", "accuracy", "--workers", "2",
         "--users", "30", "--duration", "15", "--until-limits", "2", "--max-duration", "150",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert done.stdout.strip(), done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["failures"] == [], (result["failures"], result.get("wrong"))
    assert done.returncode == 0
    assert result["over_admission"] == 0
    assert result["lost"] == 0
    assert result["wrong_count"] == 0
    # The two smallest account limits are reached (the load goes on until they
    # are, however slow the machine): exactly, not one less.
    rows = {row["key"]: row for row in result["rows"]}
    for key in ("acct:a1@loadtest.pl", "acct:a2@loadtest.pl"):
        assert rows[key]["refused"] > 0, rows[key]
        assert rows[key]["accepted"] == rows[key]["limit"], rows[key]
    # An address refused for its limit had exactly its limit accepted.
    for key in ("ip:127.0.30.1", "ip:127.0.30.2", "ip:127.0.30.3"):
        assert rows[key]["refused"] == 0 or rows[key]["accepted"] == rows[key]["limit"], rows[key]
    assert result["acknowledged"] > 0
