"""Counter keys (ARCHITECTURE "Counters and the ring") and their series names.

A key names what is counted (a client address or an account); a series names
which count of that key (messages, failures, accepted, undeliverable). The
ring routes by key, so every series of one key lives with the same owner.
"""

from __future__ import annotations

MESSAGES = "msg"
RECIPIENTS = "rcpt"  # limits with count = "recipients": their own counters, never MESSAGES
FAILURES = "fail"
ACCEPTED = "acc"
UNDELIVERABLE = "bad"
SPAM = "spam"


def ip_key(client: str) -> str:
    return f"ip:{client}"


def account_key(user: str) -> str:
    return f"acct:{user}"


def auth_failure_key(client: str) -> str:
    return f"auth-fail:{client}"


def bounce_key(client: str) -> str:
    return f"bounce:{client}"


def spam_key(client: str) -> str:
    return f"spam:{client}"
