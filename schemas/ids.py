"""Time-ordered, globally unique event ids (UUIDv7, RFC 9562).

The id is the idempotency key end to end, so it is assigned once, where an event is born.
"""

from __future__ import annotations

import os
import threading
from time import time_ns as _time_ns

_COUNTER_BITS = 12
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


class _Generator:
    """48-bit ms timestamp + 12-bit counter (RFC 9562 method 1) + 62 random bits.

    The random bits are drawn once per process (and again after fork): within a process the
    (ms, counter) pair is already unique and monotonic, across processes the 62 random bits
    separate them. Drawing them per id would cost more than the rest of the id together.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._tail = ""
        self._prefix = ""  # the id's first 15 characters: `_ms_prefix(self._last_ms)`
        self.reseed()

    def reseed(self) -> None:
        rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        low = f"{(0b10 << 62) | rand_b:016x}"  # RFC variant bits, then the random bits
        self._tail = f"{low[:4]}-{low[4:]}"
        self._last_ms = 0
        self._prefix = _ms_prefix(0)

    def next_id(self) -> str:
        with self._lock:
            now_ms = _time_ns() // 1_000_000
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                self._counter = 0
                self._prefix = _ms_prefix(now_ms)
            else:
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    # Counter exhausted: borrow the next millisecond rather than lose ordering.
                    self._last_ms += 1
                    self._counter = 0
                    self._prefix = _ms_prefix(self._last_ms)
            # Only the 12-bit counter changes within a millisecond: format just that.
            return f"{self._prefix}{self._counter:03x}-{self._tail}"


def _ms_prefix(ms: int) -> str:
    """`tttttttt-tttt-7`: the 48-bit timestamp and the version nibble of a UUIDv7 string."""
    h = f"{(ms << 16) | (0x7 << 12):016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12]}"


_generator = _Generator()
os.register_at_fork(after_in_child=_generator.reseed)


def new_event_id() -> str:
    """Return a new UUIDv7 as its canonical 36-character string."""
    return _generator.next_id()


def event_id_millis(event_id: str) -> int:
    """Unix time in milliseconds encoded in a UUIDv7 string."""
    return int(event_id.replace("-", "")[:12], 16)
