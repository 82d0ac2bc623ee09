"""Site status events: what a local operator (or the center) learns by asking a site's agent.

`SiteStatusQuery` is answered with a `SiteStatusReport`; both work with the center unreachable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.catalog import config_kind, event
from schemas.envelope import EventData


class IngestCounters(BaseModel):
    """Device-ingest counters since the agent started."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    received: int = Field(default=0, ge=0, description="raw device messages taken from INGEST")
    ingested: int = Field(default=0, ge=0, description="turned into a reading and logged")
    rejected: dict[str, int] = Field(default_factory=dict, description="dead-lettered, by reason")
    refused: int = Field(default=0, ge=0, description="readings the full replay log refused")
    duplicates: int = Field(default=0, ge=0, description="re-ingested after a crash, deduped")
    redelivered: int = Field(default=0, ge=0, description="raw messages delivered again")
    append_retries: int = Field(default=0, ge=0, description="replay-log appends retried")
    published_local: int = Field(default=0, ge=0, description="readings sent to local subscribers")


@event("edgebus.site.status.query", version=1)
class SiteStatusQuery(EventData):
    """Ask a site's agent for its status (no parameters)."""


@event("edgebus.site.status.report", version=1)
class SiteStatusReport(EventData):
    """A site's agent status, answered locally whether or not the center is reachable."""

    site: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    agent_version: str = Field(max_length=64)
    started_at: datetime
    uptime_s: float = Field(ge=0)
    ingest: IngestCounters
    dead_letters: dict[str, int] = Field(
        default_factory=dict, description="dead letters recorded by this agent, by reason"
    )
    replay: dict[str, Any] = Field(
        default_factory=dict,
        description="replay-log snapshot: backlog depth, bytes, max_bytes, oldest_unsent_age_s, "
        "forward_rate_per_s, forwarded, dropped, refused, link_up",
    )
    active_alarms: list[str] = Field(default_factory=list, description="ids of raised alarms")
    bridge: dict[str, int] = Field(
        default_factory=dict, description="external-broker bridge counters (empty: not bridged)"
    )


@config_kind("replay")
class ReplayLogConfig(BaseModel):
    """Bounds of the site's replay log (config kind `replay`); a site whose storage cannot
    hold `max_bytes` fails the apply and keeps its previous bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    policy: Literal["refuse_new", "drop_oldest"] = "refuse_new"
    near_full_ratio: float = Field(default=0.8, gt=0, lt=1)
