"""structlog set up once for every edgebus process: JSON in production, readable in a terminal.

Bind `site`, `device`, `event_id`, `subject`, `correlation_id` with `bind_event` where they apply.
The level can change while running (`set_level`); `add_tap` copies records to another sink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog
from structlog.exceptions import DropEvent

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
    _levels.printed = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _copy_to_taps,
            renderer,
        ],
        # A bound logger keeps its wrapper class for life: this one reads the level at each
        # call, so `set_level` and taps apply to loggers made earlier too.
        wrapper_class=_LiveLevelLogger,
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


# -- live level and taps ----------------------------------------------------------------

_LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def level_number(name: str) -> int:
    """`"warning"` -> 30; ValueError for a name that is not one of the five levels."""
    try:
        return _LEVEL_NUMBERS[name.lower()]
    except KeyError:
        known = ", ".join(_LEVEL_NUMBERS)
        raise ValueError(f"unknown log level {name!r} (one of {known})") from None


@dataclass(eq=False)
class LogTap:
    """Is given every record at or above `level` (a `logging` number), whatever is printed.

    `write(level_name, record)` runs inside the logging call, on whichever thread logged: it
    must be quick, must not block and must not raise (errors are swallowed), and must copy
    what it keeps (the renderer consumes `record` next). A record logged from inside `write`
    is printed but given to no tap. `level` may be changed at any time.
    """

    write: Callable[[str, Mapping[str, Any]], None]
    level: int = logging.WARNING


@dataclass
class _Levels:
    printed: int = logging.INFO
    taps: tuple[LogTap, ...] = ()


_levels = _Levels()
_in_tap: ContextVar[bool] = ContextVar("edgebus_log_in_tap", default=False)


def set_level(level: str) -> None:
    """Change the printed level of this process now, for loggers already made too."""
    _levels.printed = level_number(level)


def add_tap(tap: LogTap) -> None:
    if not _configured:
        configure_logging()
    if tap not in _levels.taps:
        _levels.taps = (*_levels.taps, tap)


def remove_tap(tap: LogTap) -> None:
    _levels.taps = tuple(t for t in _levels.taps if t is not tap)


def _wanted(number: int) -> bool:
    """Whether a record at level `number` is printed or wanted by a tap."""
    if number >= _levels.printed:
        return True
    for tap in _levels.taps:  # noqa: SIM110 - a plain loop: no generator on the hot drop path
        if number >= tap.level:
            return True
    return False


class _LiveLevelLogger(structlog.make_filtering_bound_logger(logging.DEBUG)):  # type: ignore[misc]
    """structlog's native bound logger, dropping at once (before any processor runs) what
    nobody wants; structlog documents `_proxy_to_logger` for wrapper classes to override."""

    def _proxy_to_logger(self, method_name: str, event: str | None = None, **event_kw: Any) -> Any:
        if not _wanted(_LEVEL_NUMBERS.get(method_name, logging.INFO)):
            return None
        return super()._proxy_to_logger(method_name, event, **event_kw)


def _copy_to_taps(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Hand the finished record to the taps that want it, then drop it if it is not printed."""
    number = _LEVEL_NUMBERS.get(method_name, logging.INFO)
    if _levels.taps and not _in_tap.get():
        token = _in_tap.set(True)
        try:
            level = str(event_dict.get("level", method_name))
            for tap in _levels.taps:
                if number >= tap.level:
                    # A sink must never break the caller's logging.
                    with contextlib.suppress(Exception):
                        tap.write(level, event_dict)
        finally:
            _in_tap.reset(token)
    if number < _levels.printed:
        raise DropEvent
    return event_dict
