"""Config sync events: layered desired config at the center, pushed per site, applied and reported.

A config *kind* is a pydantic model owned by its concern; `config_kinds()` lists them all.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.catalog import CONFIG_KINDS, event
from schemas.envelope import EventData

KIND_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_KEYS = 64


def config_kinds() -> dict[str, type[BaseModel]]:
    """Every config kind a site applies, by name (each concern registers its own)."""
    import schemas  # noqa: F401  (imports every concern module, which registers its kinds)

    return dict(CONFIG_KINDS)


def canonical_json(document: dict[str, Any]) -> bytes:
    """One byte string per document, whoever writes it: sorted keys, no spaces."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_digest(kind: str, document: dict[str, Any]) -> str:
    """What "the same config" means at center and edge: a hash of kind + canonical JSON."""
    digest = hashlib.sha256(kind.encode() + b"\0" + canonical_json(document))
    return digest.hexdigest()[:32]


class Scope(StrEnum):
    ALL = "all"
    GROUP = "group"
    LABELS = "labels"
    SITE = "site"


class Target(BaseModel):
    """Which sites a layer applies to: every site, a group, a label selector, or one site.

    Layers merge in this order (later wins): all, group, labels, site.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scope: Scope
    name: str | None = Field(default=None, pattern=TOKEN_PATTERN, description="group or site")
    labels: dict[str, str] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _shape(self) -> Target:
        named = self.scope in (Scope.GROUP, Scope.SITE)
        if named != (self.name is not None):
            raise ValueError(f"scope {self.scope} {'needs' if named else 'takes no'} name")
        if (self.scope == Scope.LABELS) != bool(self.labels):
            raise ValueError("labels go with scope 'labels' (and it needs at least one)")
        return self

    def describe(self) -> str:
        if self.scope == Scope.LABELS:
            return "labels " + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return "all sites" if self.scope == Scope.ALL else f"{self.scope} {self.name}"


class KeyChange(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    before: Any = None
    after: Any = None


class SiteDiff(BaseModel):
    """How one site's effective config of one kind would change (or did)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    changes: list[KeyChange]


class LayerView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: Target
    values: dict[str, Any]
    rev: int
    actor: str = ""
    updated_at: datetime | None = None


class StoredLayer(BaseModel):
    """A layer as kept in the CONFIG_LAYERS bucket (its revision is the KV revision)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(pattern=KIND_PATTERN)
    target: Target
    values: dict[str, Any]
    actor: str = ""
    updated_at: datetime


# -- center -> site ----------------------------------------------------------------------


@event("edgebus.sync.desired", version=1)
class ConfigDesired(EventData):
    """The newest effective config of one kind for the site it is sent to (`down.<site>.config`).

    Not a delta: a site that missed earlier ones converges by applying just this one.
    """

    kind: str = Field(pattern=KIND_PATTERN)
    rev: int = Field(ge=0, description="highest layer revision merged into it")
    digest: str = Field(max_length=64)
    config: dict[str, Any]


# -- site -> center ----------------------------------------------------------------------


class ApplyState(StrEnum):
    APPLIED = "applied"
    FAILED = "failed"


class AppliedKind(BaseModel):
    """What a site runs for one kind: the last revision it tried and how that went."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(pattern=KIND_PATTERN)
    state: ApplyState
    rev: int = Field(ge=0)
    digest: str = Field(max_length=64)
    error: str | None = Field(default=None, max_length=2000)
    # When the site failed a revision it keeps running this one (None: defaults).
    running_rev: int | None = None
    at: datetime


ReportReason = Literal["apply", "periodic", "startup"]


@event("edgebus.sync.report", version=1)
class ConfigReport(EventData):
    """Every kind a site has applied (or failed), sent after each apply and periodically."""

    site: str = Field(pattern=TOKEN_PATTERN)
    reason: ReportReason
    kinds: list[AppliedKind] = Field(max_length=MAX_KEYS)


# -- operator requests (`ctl.sync.*`) ------------------------------------------------------


@event("edgebus.sync.set", version=1)
class ConfigSet(EventData):
    """Set (and/or unset) keys of one kind on one layer; `dry_run` only previews."""

    kind: str = Field(pattern=KIND_PATTERN)
    target: Target
    values: dict[str, Any] = Field(default_factory=dict, max_length=MAX_KEYS)
    unset: list[str] = Field(default_factory=list, max_length=MAX_KEYS)
    dry_run: bool = False
    actor: str = Field(default="operator", max_length=128)
    max_diffs: int = Field(default=100, ge=0, le=1000)


@event("edgebus.sync.set.result", version=1)
class ConfigSetResult(EventData):
    kind: str
    target: Target
    rev: int | None = Field(description="the new revision; None for a dry run or no change")
    dry_run: bool
    targeted: int = Field(description="sites the layer applies to")
    changed: int = Field(description="sites whose effective config changes")
    diffs: list[SiteDiff] = Field(description="how they change (the first `max_diffs` sites)")
    truncated: bool = False


@event("edgebus.sync.get", version=1)
class ConfigGet(EventData):
    kind: str = Field(pattern=KIND_PATTERN)
    site: str | None = Field(default=None, pattern=TOKEN_PATTERN)


@event("edgebus.sync.view", version=1)
class ConfigView(EventData):
    """The layers of one kind (all, or those applying to `site`) and, for a site, the merge."""

    kind: str
    site: str | None = None
    layers: list[LayerView]
    effective: dict[str, Any] | None = None
    rev: int | None = None
    digest: str | None = None


@event("edgebus.sync.changed", version=1)
class ConfigChanged(EventData):
    """One accepted change (history: `center.config.changed.<kind>`)."""

    kind: str
    target: Target
    rev: int
    values: dict[str, Any]
    unset: list[str]
    actor: str
    targeted: int
    changed_sites: int
    at: datetime


@event("edgebus.sync.history.query", version=1)
class ConfigHistoryQuery(EventData):
    kind: str | None = Field(default=None, pattern=KIND_PATTERN)
    limit: int = Field(default=50, ge=1, le=1000)


@event("edgebus.sync.history", version=1)
class ConfigHistory(EventData):
    changes: list[ConfigChanged]


class SyncState(StrEnum):
    IN_SYNC = "in-sync"
    OUT_OF_SYNC = "out-of-sync"
    FAILED = "failed"
    UNKNOWN = "unknown"


class SyncRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    kind: str
    state: SyncState
    desired_rev: int
    applied_rev: int | None = None
    error: str | None = None
    reported_at: datetime | None = None


@event("edgebus.sync.status.query", version=1)
class SyncStatusQuery(EventData):
    """Rows worst-first; `sites` narrows to those sites (e.g. the ones a table shows)."""

    sites: list[str] | None = Field(default=None, max_length=5000)
    state: SyncState | None = None
    limit: int = Field(default=1000, ge=1, le=5000)


@event("edgebus.sync.status", version=1)
class SyncStatus(EventData):
    """Sync state per site and kind, a per-site roll-up, and fleet totals by state."""

    rows: list[SyncRow]
    sites: dict[str, SyncState] = Field(description="worst state over the site's kinds")
    totals: dict[str, int]
    truncated: bool = False


@event("edgebus.sync.pull", version=1)
class ConfigPull(EventData):
    """A site asks for its whole effective config (`up.<site>.sync.pull`): at onboarding,
    and at every agent start that can reach the center."""


@event("edgebus.sync.bundle", version=1)
class ConfigBundle(EventData):
    site: str = Field(pattern=TOKEN_PATTERN)
    configs: list[ConfigDesired]


@event("edgebus.sync.bundle.query", version=1)
class ConfigBundleQuery(EventData):
    """The controller, onboarding a site, asks for its whole effective config."""

    site: str = Field(pattern=TOKEN_PATTERN)
