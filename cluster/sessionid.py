"""Session ids: 22 characters of [A-Za-z0-9], unique across workers, hosts and restarts.

Eight characters of millisecond time (so ids sort roughly by start and never
repeat across restarts) and fourteen of randomness (~83 bits, so two workers
or hosts starting sessions in the same millisecond do not collide).
"""

from __future__ import annotations

import os
import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def new_session_id() -> str:
    millis = time.time_ns() // 1_000_000
    return base62(millis, 8) + base62(int.from_bytes(os.urandom(11), "big"), 14)
