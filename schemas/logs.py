"""Log events: an agent's own log records at or above its ship level, forwarded to the center.

`LogConfig` (config kind `log`) sets an agent's printed level and ship level, live.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, field_validator

from schemas.catalog import config_kind as register_config_kind
from schemas.catalog import event
from schemas.envelope import EventData

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_FIELDS = 32
MAX_FIELDS_BYTES = 4096  # the structured fields, as compact JSON
MAX_MESSAGE_CHARS = 512
MAX_EXCEPTION_CHARS = 8192


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


LEVELS: tuple[LogLevel, ...] = tuple(LogLevel)  # lowest first


def levels_at_or_above(level: str) -> tuple[LogLevel, ...]:
    """`"warning"` -> (warning, error, critical); ValueError for an unknown level."""
    lowest = LogLevel(level.lower())
    return LEVELS[LEVELS.index(lowest) :]


def fields_size(fields: dict[str, Any]) -> int:
    """How many bytes `fields` take as compact JSON (what `MAX_FIELDS_BYTES` bounds)."""
    return len(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode())


@event("edgebus.log.record", version=1)
class LogRecord(EventData):
    """One structured log record of a site's agent, as it was logged (at `timestamp`).

    Travels on `up.<site>.log.<level>`: readers pick levels by subject.
    """

    site: str = Field(pattern=ID_PATTERN)
    level: LogLevel
    logger: str = Field(max_length=128, description="the component that logged it")
    message: str = Field(max_length=MAX_MESSAGE_CHARS, description="the structlog event name")
    timestamp: AwareDatetime = Field(description="when it was logged, at the site")
    fields: dict[str, JsonValue] = Field(
        default_factory=dict,
        max_length=MAX_FIELDS,
        description=f"the other bound and given values (at most {MAX_FIELDS_BYTES} bytes)",
    )
    device: str | None = Field(default=None, max_length=128)
    event_id: str | None = Field(default=None, max_length=128)
    correlation_id: str | None = Field(default=None, max_length=128)
    exception: str | None = Field(default=None, max_length=MAX_EXCEPTION_CHARS)

    @field_validator("fields")
    @classmethod
    def _bounded(cls, fields: dict[str, JsonValue]) -> dict[str, JsonValue]:
        size = fields_size(fields)
        if size > MAX_FIELDS_BYTES:
            raise ValueError(f"fields take {size} bytes as JSON, more than {MAX_FIELDS_BYTES}")
        return fields


ConfigLevel = Literal["debug", "info", "warning", "error"]


@register_config_kind("log")
class LogConfig(BaseModel):
    """An agent's logging (config kind `log`): what it prints, and what it ships to the center."""

    model_config = ConfigDict(extra="forbid")

    config_kind: ClassVar[str] = "log"

    level: ConfigLevel = Field(default="info", description="the agent's own (printed) level")
    ship_level: ConfigLevel = Field(
        default="warning", description="records at this level and above go to the center"
    )
