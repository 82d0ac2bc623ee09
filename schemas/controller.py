"""Controller events: onboarding, heartbeats, availability, and operator requests on the registry.

The site registry record (`SiteRecord`) is the KV value; everything else travels as events.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from schemas.catalog import event
from schemas.envelope import EventData

SITE_ID = r"^[A-Za-z0-9_-]{1,64}$"
LABEL_KEY = r"^[A-Za-z0-9_.-]{1,63}$"
LABEL_VALUE_MAX = 256

SiteId = Annotated[str, StringConstraints(pattern=SITE_ID)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX)]
_LABEL_KEY_RE = re.compile(LABEL_KEY)


def _check_label_keys(labels: dict[str, str]) -> dict[str, str]:
    bad = [key for key in labels if not _LABEL_KEY_RE.match(key)]
    if bad:
        raise ValueError(f"label keys must match {LABEL_KEY}: {bad!r}")
    return labels


# Keys checked by a validator (JSON Schema: propertyNames) rather than `dict[LabelKey, ...]`,
# whose patternProperties many schema tools do not read.
Labels = Annotated[
    dict[str, LabelValue],
    AfterValidator(_check_label_keys),
    Field(json_schema_extra={"propertyNames": {"pattern": LABEL_KEY}}),
]

# Sites per `sites.add` request: a token with bootstrap creds is ~2 KB, and the reply
# (one token per site) must stay well under the 1 MiB max payload.
MAX_BATCH = 250
MAX_PAGE = 500  # records per `sites.query` reply (~1 KiB each, under the 1 MiB max payload)


class Availability(StrEnum):
    PENDING = "pending"  # added, not onboarded yet
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class _Plain(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Capacity(_Plain):
    cores: int = Field(ge=0)
    memory_bytes: int = Field(ge=0)
    disk_bytes: int = Field(ge=0)


class Load(_Plain):
    cpu_percent: float = Field(ge=0)
    load1: float = Field(ge=0)
    memory_used_bytes: int = Field(ge=0)
    disk_used_bytes: int = Field(ge=0)


class Inventory(_Plain):
    """What a site reports about itself on every heartbeat."""

    agent_version: str = Field(max_length=64)
    capacity: Capacity
    load: Load
    device_count: int = Field(default=0, ge=0)
    replay_backlog: int = Field(default=0, ge=0)
    replay_oldest_unsent_age_s: float = Field(default=0.0, ge=0)
    function_count: int = Field(default=0, ge=0)


class SiteRecord(_Plain):
    """One site in the registry (JetStream KV value, key = site id)."""

    schema_version: int = 1
    site: str = Field(pattern=SITE_ID)
    group: str = Field(default="default", pattern=SITE_ID)
    labels: Labels = Field(default_factory=dict)
    managed: bool = True
    availability: Availability = Availability.PENDING
    availability_since: datetime | None = None
    availability_reason: str = Field(default="", max_length=200)
    added_at: datetime
    onboarded_at: datetime | None = None
    last_seen: datetime | None = None
    user_public_key: str | None = None
    inventory: Inventory | None = None


# -- onboarding ----------------------------------------------------------------------


@event("edgebus.controller.sites.add", version=1)
class SitesAdd(EventData):
    """Operator: register sites and mint one single-use bootstrap token for each."""

    # A batch is bounded so its reply (one token per site) fits one NATS message;
    # the CLI splits larger batches.
    sites: list[SiteId] = Field(min_length=1, max_length=MAX_BATCH)
    group: str = Field(default="default", pattern=SITE_ID)
    labels: Labels = Field(default_factory=dict)
    token_ttl_s: float = Field(default=24 * 3600.0, gt=0, le=30 * 24 * 3600.0)


@event("edgebus.controller.sites.added", version=1)
class SitesAdded(EventData):
    tokens: dict[str, str]  # site -> encoded BootstrapToken
    expires_at: datetime
    refused: dict[str, str] = Field(default_factory=dict)  # site -> why no token was minted


@event("edgebus.controller.onboard", version=1)
class OnboardRequest(EventData):
    """A site presenting its bootstrap token and the public key of the nkey it generated."""

    site: str = Field(pattern=SITE_ID)
    token_secret: str = Field(min_length=16, max_length=256)
    user_public_key: str | None = Field(default=None, max_length=128)
    inventory: Inventory | None = None


@event("edgebus.controller.onboarded", version=1)
class OnboardReply(EventData):
    """Everything a site needs from then on; it never needs the token again."""

    site: str
    group: str
    labels: Labels
    user_jwt: str | None = None  # None when the center runs without auth (development)
    leaf_urls: list[str] = Field(default_factory=list)
    heartbeat_interval_s: float = Field(gt=0)
    desired_config: dict[str, Any] = Field(default_factory=dict)


@event("edgebus.audit", version=1)
class AuditEvent(EventData):
    """Who did what to which site, and whether it was allowed."""

    action: str = Field(max_length=64)
    site: str | None = None
    outcome: str = Field(pattern=r"^(allowed|refused)$")
    reason: str = Field(default="", max_length=500)
    actor: str = Field(default="", max_length=200)
    at: datetime


# -- heartbeats and availability -----------------------------------------------------


@event("edgebus.site.heartbeat", version=1)
class SiteHeartbeat(EventData):
    site: str = Field(pattern=SITE_ID)
    seq: int = Field(ge=0)
    sent_at: datetime
    inventory: Inventory


@event("edgebus.site.availability.changed", version=1)
class AvailabilityChanged(EventData):
    site: str = Field(pattern=SITE_ID)
    previous: Availability
    current: Availability
    reason: str = Field(max_length=200)
    at: datetime
    last_seen: datetime | None = None


# -- operator requests on the registry -----------------------------------------------


@event("edgebus.controller.sites.query", version=1)
class SitesQuery(EventData):
    """One page of the registry, sorted by site id; page on with `after` = `next_after`."""

    group: str | None = None
    availability: Availability | None = None
    label_selector: Labels = Field(default_factory=dict)
    site: str | None = None
    after: str | None = None
    limit: int = Field(default=MAX_PAGE, ge=1, le=MAX_PAGE)


@event("edgebus.controller.sites.list", version=1)
class SitesList(EventData):
    sites: list[SiteRecord]
    total: int = Field(default=0, ge=0)  # how many records match the query, over all pages
    next_after: str | None = None  # None: this was the last page


@event("edgebus.controller.sites.change", version=1)
class SiteChange(EventData):
    """Operator: manage/unmanage, move to a group, set or remove labels, delete."""

    site: str = Field(pattern=SITE_ID)
    managed: bool | None = None
    group: str | None = Field(default=None, pattern=SITE_ID)
    set_labels: Labels = Field(default_factory=dict)
    remove_labels: list[LabelKey] = Field(default_factory=list)
    delete: bool = False


@event("edgebus.controller.sites.changed", version=1)
class SiteChanged(EventData):
    """The record after a change, or `deleted` with the record as it was."""

    record: SiteRecord
    deleted: bool = False


# -- replica statistics --------------------------------------------------------------


@event("edgebus.controller.stats.query", version=1)
class ControllerStatsQuery(EventData):
    """Ask a controller replica for its counters (monitoring, the scale benchmark)."""


@event("edgebus.controller.stats", version=1)
class ControllerStats(EventData):
    """One replica's counters since it started; `counters` keys may grow over versions."""

    replica: str = Field(max_length=200)
    leader: bool
    sites: int = Field(ge=0)  # records in this replica's registry copy
    tracked: int = Field(ge=0)  # sites this replica has heard a heartbeat from
    # heartbeats (received), rejected, transitions, persisted, sweeps, served_<op>,
    # registry_conflicts, registry_resyncs
    counters: dict[str, int]
    at: datetime
