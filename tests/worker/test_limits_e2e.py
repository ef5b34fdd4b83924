"""Recipient limits (SPEC §3.11) and shadow limits (§3.12) over real SMTP, one worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import TENANTS, Gateway, running_gateway

POLICY_VIOLATION = "5.1.0 {sid} policy violation"


def rcpts(n: int) -> tuple[str, ...]:
    return tuple(f"r{i}@example.org" for i in range(n))


def session_id(gw: Gateway, source: str) -> str:
    return next(line["sid"] for line in reversed(gw.log_lines())
                if line.get("event") == "connect" and line.get("client_ip") == source)


def shadow_lines(gw: Gateway) -> list[dict[str, Any]]:
    return [line for line in gw.log_lines() if line.get("verdict") == "shadow"]


def test_recipient_limit_checked_at_mail_and_reserved_at_data(short_tmp: Path, dns: Any) -> None:
    tenants = TENANTS.replace('[accounts."jan@kowalski.pl"]',
                              '[accounts."jan@kowalski.pl"]\nlimits = [{window = "1h", max = 5, '
                              'count = "recipients"}, {window = "1h", max = 3}]')
    with running_gateway(short_tmp, dns, tenants_text=tenants) as gw:
        client = gw.login()
        sid = session_id(gw, "127.0.0.5")
        assert gw.send(client, recipients=rcpts(3))[0] == 250
        # 3 + 3 would overshoot 5: the reservation at the end of DATA refuses it.
        assert gw.send(client, recipients=rcpts(3)) == (
            550, POLICY_VIOLATION.format(sid=sid))
        assert gw.send(client, recipients=rcpts(2))[0] == 250
        # Full: MAIL is refused before any recipient.
        code, text = client.mail("jan@kowalski.pl")
        assert (code, text.decode()) == (550, POLICY_VIOLATION.format(sid=sid))
        client.quit()
        refusals = [line for line in gw.log_lines()
                    if line.get("event") == "decision" and line.get("verdict") == "reject"]
        assert [(r["stage"], r["detail"].split()[0]) for r in refusals] == [
            ("DATA", "acct:jan@kowalski.pl"), ("MAIL", "acct:jan@kowalski.pl")]
        # Two messages counted once each by the message limit beside it (3 not reached).
        accepted = [line for line in gw.log_lines() if line.get("stage") == "DATA"
                    and line.get("verdict") == "accept"]
        assert [line["recipients"] for line in accepted] == [3, 2]


def test_shadow_limits_never_refuse_and_log_what_they_would_have_done(
        short_tmp: Path, dns: Any) -> None:
    limits = [{"window": "1h", "max": 100},
              {"window": "1h", "max": 2, "mode": "shadow"},
              {"window": "1h", "max": 4, "count": "recipients", "mode": "shadow"}]
    with running_gateway(short_tmp, dns, limits=limits) as gw:
        client = gw.login("127.0.0.6")
        sid = session_id(gw, "127.0.0.6")
        replies = [gw.send(client, recipients=rcpts(n))[0] for n in (1, 1, 1, 3)]
        assert replies == [250, 250, 250, 250]
        client.quit()
        lines = shadow_lines(gw)
        # One line per limit and message where it would have refused, at the stage
        # it would have refused at; for the IP key and the account key alike.
        seen = [(line["stage"], line["key"], line["window"], line["count"], line["max"],
                 line["limit_count"]) for line in lines]
        assert seen == [
            ("MAIL", "ip:127.0.0.6", "1h", 2, 2, "messages"),
            ("MAIL", "acct:jan@kowalski.pl", "1h", 2, 2, "messages"),
            ("MAIL", "ip:127.0.0.6", "1h", 3, 2, "messages"),
            ("MAIL", "acct:jan@kowalski.pl", "1h", 3, 2, "messages"),
            ("DATA", "ip:127.0.0.6", "1h", 3, 4, "recipients"),
            ("DATA", "acct:jan@kowalski.pl", "1h", 3, 4, "recipients"),
        ]
        for line in lines:
            assert line["event"] == "decision" and line["sid"] == sid
            assert line["policy"] == "rate_limit"
            assert line["reply"] == f"550 5.1.0 {sid} policy violation"
            assert line["detail"] == (f"{line['key']} {line['window']} "
                                      f"{line['count']}/{line['max']}")


def test_a_tenant_shadow_limit_beside_the_enforced_one(short_tmp: Path, dns: Any) -> None:
    tenants = TENANTS.replace('[accounts."jan@kowalski.pl"]',
                              '[accounts."jan@kowalski.pl"]\nlimits = [{window = "1h", max = 3}, '
                              '{window = "1h", max = 1, mode = "shadow"}]')
    with running_gateway(short_tmp, dns, tenants_text=tenants) as gw:
        client = gw.login("127.0.0.7")
        replies = [gw.send(client)[0] for _ in range(4)]
        client.quit()
        # The enforced maximum is exact (one counter, not one per limit), the shadow
        # one logged for the 2nd and 3rd message; the 4th is refused, not shadowed.
        assert replies == [250, 250, 250, 550]
        assert [(line["stage"], line["count"]) for line in shadow_lines(gw)] == [
            ("MAIL", 1), ("MAIL", 2)]
