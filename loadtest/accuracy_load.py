"""The Locust half of the accuracy scenario, in a process of its own (Locust gevent-patches).

    python -m loadtest.accuracy_load PLAN.json RESULT.json

The plan names the server, the duration and groups of users (accounts,
source addresses, messages per session). Locust runs as a library; every
request event is checked here against SPEC §2 with the session's own id,
and the result file lists, per message token, who sent it and whether it
was acknowledged, plus the refusals counted by kind, account and address.
It prints ``running`` on stdout once the users are spawned, so the caller
can time a scale or a kill against the load.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from typing import Any

# Exactly SPEC §2, per stage; "{sid}" is the session's id, "{sender}" its MAIL FROM.
SHUTTING_DOWN = "421 4.3.2 {sid} service shutting down"
SPEC_REFUSALS: dict[str, tuple[str, ...]] = {
    "connect": (),
    "AUTH": ("535 5.7.8 {sid} authentication failed",
             "538 5.7.11 Encryption required for requested authentication mechanism",
             "454 4.7.0 {sid} too many authentication failures, try later"),
    "MAIL": ("550 5.1.0 {sid} authentication failed",
             "550 5.1.0 <{sender}> sender rejected",
             "550 5.1.0 {sid} policy violation",
             "451 4.3.0 {sid} temporary policy failure, try later",
             "552 5.3.4 Message size exceeds fixed maximum message size"),
    "RCPT": ("550 5.1.1 {sid} invalid destination domains",
             "451 4.4.3 {sid} destination domain lookup failed, try later",
             "452 4.5.3 Too many recipients"),
    "DATA": ("550 5.1.0 {sid} policy violation",
             "550 5.1.0 {sid} spam detected",
             "451 4.7.1 {sid} content scan unavailable, try later",
             "451 4.3.0 {sid} temporary policy failure, try later",
             "552 5.3.4 Message size exceeds fixed maximum message size",
             "451 4.3.0 {sid} temporary failure, try later"),
}
_QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as ([A-Za-z0-9]{1,32})")
POLICY_VIOLATION = "550 5.1.0 {sid} policy violation"
WRONG = "wrong"


OFF_STAGE = " (a SPEC reply, at a stage SPEC does not name for it)"


def _matches(template: str, reply: str, sid: str, sender: str) -> bool:
    if sid:
        return reply == template.format(sid=sid, sender=sender)
    # No id in the greeting (a 421 instead of the banner): the reply's own id must
    # still have SPEC §1's form.
    pattern = re.escape(template).replace(re.escape("{sid}"), "[A-Za-z0-9]{22}")
    return re.fullmatch(pattern.replace(re.escape("{sender}"), re.escape(sender)),
                        reply) is not None


def classify(step: str, reply: str, sid: str, sender: str) -> str:
    """The SPEC §2 template ``reply`` is, else ``WRONG``.

    SPEC words the replies to the letter; the stages it names for each are
    checked too, but a SPEC text at another stage is marked, not failed.
    """
    for template in SPEC_REFUSALS.get(step, ()) + (SHUTTING_DOWN,):
        if _matches(template, reply, sid, sender):
            return template
    for templates in SPEC_REFUSALS.values():
        for template in templates:
            if _matches(template, reply, sid, sender):
                return template + OFF_STAGE
    return WRONG


class Collector:
    """What the request events said, reduced to what the comparison needs."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[str, str]] = {}
        self.acked: dict[str, str] = {}
        self.refusals: Counter[tuple[str, str, str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: list[dict[str, str]] = []
        self.wrong_count = 0
        self.requests: Counter[str] = Counter()

    def on_request(self, request_type: str, name: str, response_time: float,
                   response_length: int, exception: BaseException | None,
                   context: dict[str, Any], **_: Any) -> None:
        self.requests[name] += 1
        token = context.get("token", "")
        account, source = context.get("account", ""), context.get("source", "")
        if name == "DATA" and token:
            # Sent means the body went out: the gateway may have queued it even if
            # the reply never came back (a worker killed after its spool write).
            self.sent[token] = (account, source)
        reply = context.get("reply", "")
        if exception is None:
            if name == "DATA":
                match = _QUEUED.fullmatch(reply)
                if match is None:
                    self._wrong(name, reply, context)
                else:
                    self.acked[token] = match.group(1)
            return
        if not reply:  # no reply at all: the connection broke or timed out
            self.errors[f"{name}: {type(exception).__name__}"] += 1
            return
        kind = classify(name, reply, context.get("sid", ""), context.get("sender", ""))
        if kind == WRONG:
            self._wrong(name, reply, context)
        self.refusals[(name, kind, account, source)] += 1

    def _wrong(self, step: str, reply: str, context: dict[str, Any]) -> None:
        self.wrong_count += 1
        if len(self.wrong) < 50:
            self.wrong.append({"step": step, "reply": reply, "sid": context.get("sid", ""),
                               "account": context.get("account", "")})

    def result(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "refusals": [[*key, count] for key, count in sorted(self.refusals.items())],
            "errors": dict(self.errors),
            "wrong_count": self.wrong_count,
            "wrong": self.wrong,
            "requests": dict(self.requests),
        }


def user_classes(plan: dict[str, Any]) -> list[type]:
    from loadtest.smtp_user import Account, SmtpUser

    classes = []
    for group in plan["groups"]:
        classes.append(type(f"{group['name'].title()}User", (SmtpUser,), {
            "host": plan["host"],
            "fixed_count": group["users"],
            "accounts": [Account(*row) for row in group["accounts"]],
            "source_ips": group["source_ips"],
            "messages_per_session": group.get("messages_per_session", 1),
            "rcpt_domain": plan.get("rcpt_domain", "example.org"),
            "tls": plan.get("tls", "starttls"),
            "message_size": plan.get("message_size", 1024),
        }))
    return classes


def run(plan: dict[str, Any]) -> dict[str, Any]:
    import gevent
    from locust.env import Environment

    collector = Collector()
    classes = user_classes(plan)
    environment = Environment(user_classes=classes, host=plan["host"],
                              stop_timeout=plan.get("stop_timeout", 10.0))
    environment.events.request.add_listener(collector.on_request)
    runner = environment.create_local_runner()
    users = sum(group["users"] for group in plan["groups"])
    runner.start(users, spawn_rate=max(users, 1))
    print("running", flush=True)
    gevent.spawn(_stop_when_done, plan, collector, runner)
    runner.greenlet.join()
    return collector.result()


def _stop_when_done(plan: dict[str, Any], collector: Collector, runner: Any) -> None:
    """Stop after `duration`, or later (up to `max_duration`) while an account
    named in `until_refused` has not yet been refused for its limit."""
    import gevent

    started = time.monotonic()
    waiting = set(plan.get("until_refused", ()))
    longest = max(float(plan.get("max_duration", 0.0)), float(plan["duration"]))
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= longest:
            break
        if elapsed >= float(plan["duration"]):
            refused = {account for (_, kind, account, _), n in collector.refusals.items()
                       if kind == POLICY_VIOLATION and n}
            if waiting <= refused:
                break
        gevent.sleep(0.25)
    runner.quit()


def main(argv: list[str]) -> int:
    import locust  # noqa: F401  (patches the process before anything else opens a socket)

    if len(argv) != 2:
        print("usage: python -m loadtest.accuracy_load PLAN.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        plan = json.load(handle)
    result = run(plan)
    with open(argv[1], "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
