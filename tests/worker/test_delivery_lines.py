"""Lines as delivered (SPEC §3): CRLF only, none over 998 octets, every byte kept."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re

from worker.delivery.lines import LINE_LIMIT, break_line, for_delivery


def lines_of(message: bytes) -> list[bytes]:
    assert message.endswith(b"\r\n")
    return message[:-2].split(b"\r\n")


def assert_wire_form(message: bytes) -> None:
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None, "a bare CR or LF"
    assert max(len(line) for line in lines_of(message)) <= LINE_LIMIT


def test_an_ordinary_message_is_left_as_it_is() -> None:
    message = b"Subject: hi\r\n\r\nHello.\r\n" + b"x" * LINE_LIMIT + b"\r\n"
    assert for_delivery(message) is message


def test_bare_lf_and_bare_cr_become_crlf_and_the_message_ends_with_crlf() -> None:
    assert for_delivery(b"Subject: a\n\nline\r\nbare cr\rend") == (
        b"Subject: a\r\n\r\nline\r\nbare cr\r\nend\r\n")


def test_a_long_line_with_spaces_is_folded_before_a_space_keeping_every_byte() -> None:
    words = " ".join(f"word{i}" for i in range(600)).encode()  # ~5,000 octets
    out = for_delivery(b"Subject: s\r\n\r\n" + words + b"\r\n")
    assert_wire_form(out)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body.replace(b"\r\n", b"") == words  # only CRLFs were added
    assert all(line.startswith(b" ") for line in lines_of(body)[1:])


def test_a_long_header_unfolds_to_what_was_sent() -> None:
    to = ", ".join(f"person{i}@example.org" for i in range(120))
    message = f"To: {to}\r\nSubject: s\r\n\r\nbody\r\n".encode()
    out = for_delivery(message)
    assert_wire_form(out)
    parsed = email.message_from_bytes(out, policy=email.policy.compat32)
    assert re.sub(r"\r\n(?=[ \t])", "", parsed["To"]) == to


def test_a_line_without_whitespace_gets_crlf_space_as_postfix_does() -> None:
    blob = base64.b64encode(os.urandom(3000))  # 4,000 octets, no whitespace
    out = for_delivery(b"\r\n" + blob + b"\r\n")
    assert_wire_form(out)
    pieces = lines_of(out)[1:]
    assert pieces[0] == blob[:LINE_LIMIT]
    assert all(piece.startswith(b" ") for piece in pieces[1:])
    assert b"".join(piece.removeprefix(b" ") for piece in pieces) == blob
    assert base64.b64decode(b"".join(pieces).replace(b" ", b"")) == base64.b64decode(blob)


def test_a_hard_break_never_splits_a_utf8_character_or_a_quoted_printable_escape() -> None:
    text = "zażółć gęślą jaźń".replace(" ", "").encode() * 200
    for piece in break_line(text):
        assert len(piece) <= LINE_LIMIT
        piece.decode("utf-8")  # every piece is whole characters
    qp = b"=C5=BC" * 400
    pieces = break_line(qp)
    assert all(len(p) <= LINE_LIMIT and re.fullmatch(rb" ?(=[0-9A-F]{2})+", p) for p in pieces)


def test_lines_at_the_limit_stay_whole_and_the_result_is_a_fixed_point() -> None:
    assert break_line(b"y" * LINE_LIMIT) == [b"y" * LINE_LIMIT]
    message = (b"Subject: s\r\n\r\n" + b"a " * 3000 + b"\n" + b"z" * 5000 + b"\r\n.dot\r\n")
    once = for_delivery(message)
    assert_wire_form(once)
    assert for_delivery(once) == once
