"""Stream-order gate for ingest: deliveries are handed on in stream-sequence order only.

JetStream redelivers in no particular order (and a dead instance's pull request may hold
messages until ack_wait); per-device order needs the gate. Pure: no I/O, tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class SequenceGate(Generic[T]):
    """Buffers deliveries by stream sequence; `release` hands on the contiguous run from
    `next_seq`. A gap blocks the rest until its messages arrive or prove to be gone."""

    next_seq: int
    _buffer: dict[int, T] = field(default_factory=dict)

    def offer(self, seq: int, item: T) -> None:
        """Buffer one delivery; a redelivered copy replaces the older one (same sequence)."""
        self._buffer[seq] = item

    def release(self) -> list[T]:
        """What may be processed now, in order: late copies of already passed sequences
        (redeliveries: idempotent downstream), then the contiguous run from `next_seq`."""
        out: list[T] = []
        for seq in sorted(s for s in self._buffer if s < self.next_seq):
            out.append(self._buffer.pop(seq))
        while self.next_seq in self._buffer:
            out.append(self._buffer.pop(self.next_seq))
            self.next_seq += 1
        return out

    @property
    def blocked_at(self) -> int | None:
        """The first missing sequence while later ones wait behind it, else None."""
        return self.next_seq if self._buffer else None

    @property
    def lowest_waiting(self) -> int | None:
        return min(self._buffer) if self._buffer else None

    def skip_to(self, seq: int) -> None:
        """The sequences before `seq` are gone from the stream (limits, purge): stop waiting."""
        self.next_seq = max(self.next_seq, seq)

    def waiting(self) -> list[T]:
        """Buffered deliveries, in sequence order (to keep them alive with in-progress acks)."""
        return [self._buffer[seq] for seq in sorted(self._buffer)]

    def __len__(self) -> int:
        return len(self._buffer)
