"""SPEC §2 last row: 421 on shutdown, at once or after the transaction's end of DATA."""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path

from gateway import MESSAGE, Gateway


def read_reply(client: smtplib.SMTP) -> tuple[int, str]:
    code, text = client.getreply()
    return code, text.decode()


def test_drain_answers_idle_at_once_and_busy_after_their_data(short_tmp: Path, dns) -> None:
    gateway = Gateway(short_tmp, dns, server={"drain_timeout": "20s"}).start()
    idle = gateway.login("127.0.0.51")
    busy = gateway.login("127.0.0.52")
    assert busy.mail("jan@kowalski.pl")[0] == 250
    assert busy.rcpt("a@example.org")[0] == 250
    sessions = gateway.parts.server.sessions
    stopper = threading.Thread(target=gateway.stop)
    stopper.start()
    # The idle session is told at once, before the busy one finishes.
    code, text = read_reply(idle)
    assert code == 421 and text.endswith(" service shutting down")
    sid = text.split()[1]
    assert text == f"4.3.2 {sid} service shutting down"
    # The busy one finishes its message: 250, then 421.
    code, text = busy.data(MESSAGE)
    assert code == 250, text
    code, text = read_reply(busy)
    busy_sid = text.split()[1]
    assert (code, text) == (421, f"4.3.2 {busy_sid} service shutting down")
    assert busy_sid != sid and len(busy_sid) == 22
    stopper.join(60)
    assert not stopper.is_alive()
    assert len(sessions) == 0
    for client in (idle, busy):
        client.close()
    # Each 421 is the session's decision, as the other replies are.
    goodbyes = [(line["sid"], line["stage"], line["verdict"], line["reply"])
                for line in gateway.log_lines()
                if line.get("event") == "decision" and line.get("policy") == "shutdown"]
    assert sorted(goodbyes) == sorted(
        (s, "SESSION", "tempfail", f"421 4.3.2 {s} service shutting down")
        for s in (sid, busy_sid))


def test_drain_timeout_cuts_an_unfinished_data(short_tmp: Path, dns) -> None:
    gateway = Gateway(short_tmp, dns, server={"drain_timeout": "1s"}).start()
    client = gateway.login("127.0.0.53")
    assert client.mail("jan@kowalski.pl")[0] == 250
    assert client.rcpt("a@example.org")[0] == 250
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: half\r\n\r\nstill typing")
    stopper = threading.Thread(target=gateway.stop)
    stopper.start()
    code, text = read_reply(client)
    sid = text.split()[1]
    assert (code, text) == (421, f"4.3.2 {sid} service shutting down")
    stopper.join(60)
    assert not stopper.is_alive()
    client.close()
    # Nothing was acknowledged, so nothing was queued.
    lines = [line for line in gateway.log_lines() if line.get("sid") == sid]
    assert not [line for line in lines if line.get("stage") == "DATA"]


def test_goodbye_waits_for_the_last_line_of_a_multiline_reply() -> None:
    # The 421 of a drain goes after a reply, never between "250-" lines of EHLO.
    from worker.smtp import _continues

    assert _continues("250-mx.test") and _continues(b"250-SIZE 100")
    assert not _continues("250 HELP") and not _continues("421 4.3.2 x service shutting down")
