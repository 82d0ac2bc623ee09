"""Dead-letter records: bad or unhandleable messages kept with their reason, never dropped.

The original bytes, subject and headers are stored verbatim in the scope's DEADLETTER stream.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext

from bus import subjects
from bus.log import get_logger

HEADER_PREFIX = "Edgebus-Dlq-"
ORIGINAL_HEADER_PREFIX = "Edgebus-Orig-"
MAX_DETAIL_CHARS = 1000
# Headers + body must fit the server's max_payload (1 MiB by default): leave headroom.
MAX_STORED_BYTES = 1024 * 1024 - 64 * 1024

_UNSAFE_HEADER_CHARS = re.compile(r"[\r\n\x00]")


def _header_value(value: object) -> str:
    return _UNSAFE_HEADER_CHARS.sub(" ", str(value))[:MAX_DETAIL_CHARS]


def dead_letter_headers(
    *,
    reason: str,
    detail: str,
    subject: str,
    component: str,
    original_headers: dict[str, str] | None,
    original_size: int,
) -> dict[str, str]:
    headers = {
        f"{HEADER_PREFIX}Reason": _header_value(reason),
        f"{HEADER_PREFIX}Detail": _header_value(detail),
        f"{HEADER_PREFIX}Subject": _header_value(subject),
        f"{HEADER_PREFIX}Component": _header_value(component),
        f"{HEADER_PREFIX}Time": datetime.now(UTC).isoformat(),
        f"{HEADER_PREFIX}Size": str(original_size),
    }
    for name, value in (original_headers or {}).items():
        headers[f"{ORIGINAL_HEADER_PREFIX}{name}"] = _header_value(value)
    return headers


@dataclass(frozen=True)
class DeadLetterNotice:
    """What a listener is told of one dead letter (the bytes stay in the stream)."""

    component: str
    subject: str
    reason: str
    detail: str
    at: datetime


DeadLetterListener = Callable[[DeadLetterNotice], None]


class DeadLetterSink:
    """Stores dead letters for one scope (`center` or a site id) and counts them by reason."""

    def __init__(self, js: JetStreamContext, scope: str) -> None:
        self._js = js
        self.scope = subjects.token(scope)
        self.counts: Counter[str] = Counter()
        self.store_failures = 0
        self._listeners: list[DeadLetterListener] = []
        self._log = get_logger("bus.deadletter", scope=scope)

    def add_listener(self, listener: DeadLetterListener) -> None:
        """`listener` is told of every dead letter as it is recorded (to raise an alarm, say);
        one that raises is logged and never stops the recording."""
        self._listeners.append(listener)

    async def record(
        self,
        *,
        component: str,
        subject: str,
        data: bytes,
        reason: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **log_context: Any,
    ) -> None:
        """Store one dead letter. Never raises: a failure to store is logged and counted."""
        self.counts[reason] += 1
        if self._listeners:
            self._tell(DeadLetterNotice(component, subject, reason, detail, datetime.now(UTC)))
        stored = data[:MAX_STORED_BYTES]
        dlq_headers = dead_letter_headers(
            reason=reason,
            detail=detail,
            subject=subject,
            component=component,
            original_headers=headers,
            original_size=len(data),
        )
        self._log.warning(
            "dead_letter",
            reason=reason,
            detail=detail[:MAX_DETAIL_CHARS],
            subject=subject,
            size=len(data),
            dlq_component=component,
            **log_context,
        )
        try:
            await self._js.publish(
                subjects.dead_letter(self.scope, subjects.token(component), reason),
                stored,
                headers=dlq_headers,
                timeout=5.0,
            )
        except Exception as exc:  # the store itself is down: say so loudly, keep going
            self.store_failures += 1
            self._log.error(
                "dead_letter_store_failed",
                reason=reason,
                subject=subject,
                error=repr(exc),
                payload_head=data[:200].decode("utf-8", "replace"),
            )

    def _tell(self, notice: DeadLetterNotice) -> None:
        for listener in self._listeners:
            try:
                listener(notice)
            except Exception as exc:
                self._log.error("dead_letter_listener_failed", error=repr(exc))
