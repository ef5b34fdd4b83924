"""The support console's helpers: finding a session id in pasted text, its form tokens."""

from __future__ import annotations

from coordinator.console import Console, session_ids

SID = "0h3kq2Pd7YtT1cJrXbH2aa"
QUEUE_ID = "28hujJtU7QmGd7MCjYEmUc"  # also 22 characters


def test_the_session_id_after_a_reply_code_comes_first() -> None:
    text = (f"Your message {QUEUE_ID} could not be sent.\n"
            f"Remote server said: 550 5.1.0 {SID} policy violation\n")
    assert session_ids(text) == [SID, QUEUE_ID]
    assert session_ids(f"220 smtp.example.net ESMTP sendguard {SID}") == [SID]
    assert session_ids(f"id={SID}x, {SID}") == [SID]
    assert session_ids("nothing here, not even a 21-char AAAAAAAAAAAAAAAAAAAAA") == []


def test_a_form_token_is_bound_to_its_user_and_expires() -> None:
    now = [1_700_000_000.0]
    console = Console(call=None, clock=lambda: now[0])  # type: ignore[arg-type]
    token = console._token("anna")
    assert console._token_ok("anna", token)
    assert not console._token_ok("bob", token)
    assert not console._token_ok("anna", token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not console._token_ok("anna", "")
    now[0] += 12 * 3600 + 1
    assert not console._token_ok("anna", token)
    assert not Console(call=None)._token_ok("anna", console._token("anna"))  # type: ignore
