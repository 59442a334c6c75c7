"""Sortable identifiers: a ULID-style 48-bit millisecond timestamp + 80 random bits, Crockford base32.

Ids created later sort later as strings (monotonic within one process even inside the same
millisecond), so `ORDER BY id` is creation order and `after=<id>` cursors need no extra column.
"""

from __future__ import annotations

import secrets
import threading
import time

__all__ = ["is_id", "new_id"]

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 10  # 48 bits of milliseconds -> 10 base32 chars
RANDOM_BITS = 80
RANDOM_CHARS = 16  # 80 bits -> 16 base32 chars

_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(CROCKFORD[digit])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """`<prefix>_<26 chars>`; strictly increasing per process."""
    global _last_ms, _last_random
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            now_ms = _last_ms
            _last_random = (_last_random + 1) % (1 << RANDOM_BITS)
        else:
            _last_ms = now_ms
            _last_random = secrets.randbits(RANDOM_BITS - 1)  # headroom so increments never wrap
        return f"{prefix}_{_encode(now_ms, TIME_CHARS)}{_encode(_last_random, RANDOM_CHARS)}"


def is_id(value: str, prefix: str) -> bool:
    """True when `value` is spelled like an id `new_id(prefix)` makes (whether or not it exists)."""
    body = value.removeprefix(f"{prefix}_")
    return (body != value and len(body) == TIME_CHARS + RANDOM_CHARS
            and all(char in CROCKFORD for char in body))
