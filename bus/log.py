"""structlog set up once for every edgebus process: JSON in production, readable in a terminal.

Bind `site`, `device`, `event_id`, `subject`, `correlation_id` with `bind_event` where they apply.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


class _StderrLogger:
    """Writes each line to whatever `sys.stderr` is at that moment: test runners and CLI
    runners swap it, and a logger holding the old (closed) stream would raise on every call."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _stderr_logger(*args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Idempotent. `json=None` picks JSON unless stderr is a terminal; env overrides both."""
    global _configured
    level_name = (level or os.environ.get("EDGEBUS_LOG_LEVEL", "info")).upper()
    if json is None:
        env = os.environ.get("EDGEBUS_LOG_FORMAT")
        json = env == "json" if env else not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(component: str, **bound: Any) -> Any:
    """A structlog logger with `component` and any other context bound."""
    if not _configured:
        configure_logging()
    return structlog.get_logger(component).bind(component=component, **bound)


def bind_process(**context: Any) -> None:
    """Bind process-wide context (e.g. `site=`) into every later log line."""
    structlog.contextvars.bind_contextvars(**context)
