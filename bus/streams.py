"""JetStream streams and KV buckets edgebus declares, and the idempotent code that declares them.

Each service calls `ensure_stream`/`ensure_kv` for the specs it owns at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from bus import subjects

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    """A stream's shape; `duplicate_window_s` is the dedup horizon for `Nats-Msg-Id`."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * DAY_S
    max_bytes: int = -1
    max_msgs: int = -1
    max_msgs_per_subject: int = -1
    duplicate_window_s: float = 120.0
    discard_new: bool = False
    memory: bool = False
    work_queue: bool = False
    # JetStream fast-ingest batches (nats-server 2.14+): the forwarder's cheap path.
    allow_batched: bool = False
    description: str = ""
    # (source, destination) applied to each subject as it is stored (`bus.partitions`).
    subject_transform: tuple[str, str] | None = None

    def to_config(self) -> StreamConfig:
        # JetStream refuses a dedup window longer than the stream's max age.
        window = self.duplicate_window_s
        if self.max_age_s > 0:
            window = min(window, self.max_age_s)
        return StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=RetentionPolicy.WORK_QUEUE if self.work_queue else RetentionPolicy.LIMITS,
            storage=StorageType.MEMORY if self.memory else StorageType.FILE,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_msgs_per_subject=self.max_msgs_per_subject,
            discard=DiscardPolicy.NEW if self.discard_new else DiscardPolicy.OLD,
            duplicate_window=window,
            allow_batched=True if self.allow_batched else None,
            subject_transform=(
                SubjectTransform(src=self.subject_transform[0], dest=self.subject_transform[1])
                if self.subject_transform
                else None
            ),
        )


@dataclass(frozen=True)
class KvSpec:
    bucket: str
    history: int = 1
    ttl_s: float | None = None
    description: str = ""


def dead_letter_stream(scope: str) -> StreamSpec:
    """One dead-letter stream per JetStream domain: the center's, or one site's own."""
    return StreamSpec(
        name="DEADLETTER",
        subjects=(subjects.dead_letter_all(scope),),
        max_age_s=30 * DAY_S,
        max_bytes=1024 * 1024 * 1024,
        description=f"messages that could not be decoded or handled ({scope})",
    )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> StreamInfo:
    """Create the stream, or bring an existing one to this spec. A spec without a subject
    transform keeps the stream's: the stream's reader sets it (the alarms service partitions
    UP_ALARM), and the other services that declare the stream must not undo that."""
    config = spec.to_config()
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        return await js.add_stream(config=config)
    if config.subject_transform is None:
        config.subject_transform = info.config.subject_transform
    return await js.update_stream(config=config)


def stream_transform(info: StreamInfo) -> tuple[str, str] | None:
    """A stream's subject transform as (source, destination), None if it has none."""
    transform = info.config.subject_transform
    if transform is None or not transform.src:
        return None
    return transform.src, transform.dest


async def ensure_kv(js: JetStreamContext, spec: KvSpec) -> KeyValue:
    try:
        return await js.key_value(spec.bucket)
    except NotFoundError:
        return await js.create_key_value(
            config=KeyValueConfig(
                bucket=spec.bucket,
                history=spec.history,
                ttl=spec.ttl_s,
                description=spec.description or None,
            )
        )


# -- site-local streams (each site's own JetStream domain) ---------------------------


class ReplayFullPolicy:
    """What the replay log does when it reaches its byte or age bound."""

    REFUSE_NEW = "refuse_new"  # keep what is owed, refuse new entries (counted, alarmed)
    DROP_OLDEST = "drop_oldest"  # make room by dropping the oldest unsent (counted, alarmed)

    ALL = (REFUSE_NEW, DROP_OLDEST)


def site_ingest_stream(max_bytes: int = 1024**3, max_age_s: float = 7 * DAY_S) -> StreamSpec:
    """Raw device messages as the site's MQTT listener (or bridge) received them.

    Captures every `dev.>` subject so a device writing outside its site is dead-lettered
    rather than silently unheard. Work-queue: the ingest worker's ack removes an entry.
    """
    return StreamSpec(
        name="INGEST",
        subjects=(subjects.device_raw_any(),),
        work_queue=True,
        max_bytes=max_bytes,
        max_age_s=max_age_s,
        discard_new=True,
        duplicate_window_s=600.0,
        description="raw device messages awaiting ingest",
    )


def site_replay_stream(site: str, *, max_bytes: int, max_age_s: float, policy: str) -> StreamSpec:
    """The edge-local replay log: everything the site owes the center, in order."""
    if policy not in ReplayFullPolicy.ALL:
        raise ValueError(f"replay policy must be one of {ReplayFullPolicy.ALL}, not {policy!r}")
    return StreamSpec(
        name="REPLAY",
        subjects=(subjects.replay_all(site),),
        work_queue=True,
        max_bytes=max_bytes,
        max_age_s=max_age_s,
        discard_new=policy == ReplayFullPolicy.REFUSE_NEW,
        # Covers an ingest worker crash between append and ack of the raw message.
        duplicate_window_s=600.0,
        description="edge-local replay log (owed to the center)",
    )


def site_events_stream(
    site: str, max_bytes: int = 256 * 1024**2, max_age_s: float = DAY_S
) -> StreamSpec:
    """Recent typed events at the site, for local operators and local consumers."""
    return StreamSpec(
        name="EVENTS",
        subjects=(subjects.site_events_all(site),),
        max_bytes=max_bytes,
        max_age_s=max_age_s,
        duplicate_window_s=60.0,
        description="recent site events (local history)",
    )


# -- center streams ------------------------------------------------------------------

UPLINK_KINDS = ("reading", "alarm", "status", "log", "usage")
# Dedup horizon for events forwarded from sites: a batch in flight when a link is cut is
# re-sent after the outage, so the window must outlast the outages we promise to absorb.
UPLINK_DUPLICATE_WINDOW_S = 6 * 3600.0


def uplink_stream(kind: str, *, max_age_s: float = 7 * DAY_S, max_bytes: int = -1) -> StreamSpec:
    """Center stream of one kind of event forwarded by every site: `up.*.<kind>.>`."""
    if kind not in UPLINK_KINDS:
        raise ValueError(f"unknown uplink kind {kind!r}")
    return StreamSpec(
        name=f"UP_{kind.upper()}",
        subjects=(f"up.*.{kind}", f"up.*.{kind}.>"),
        max_age_s=max_age_s,
        max_bytes=max_bytes,
        duplicate_window_s=UPLINK_DUPLICATE_WINDOW_S,
        allow_batched=True,
        description=f"{kind} events forwarded from sites",
    )


async def ensure_uplink_streams(js: JetStreamContext) -> None:
    """Every `UP_<KIND>` stream at the center. A center missing one stalls each site's
    in-order forwarder at the first entry of that kind (no stream answers it)."""
    for kind in UPLINK_KINDS:
        await ensure_stream(js, uplink_stream(kind))


# -- controller (center) ---------------------------------------------------------------


def site_events_center_stream(max_age_s: float = 30 * DAY_S) -> StreamSpec:
    """History of what the controller observed about sites (availability transitions)."""
    return StreamSpec(
        name="SITE_EVENTS",
        subjects=(subjects.center_sites_all(),),
        max_age_s=max_age_s,
        max_bytes=1024**3,
        description="site availability transitions and other registry events",
    )


def audit_stream(max_age_s: float = 365 * DAY_S) -> StreamSpec:
    """Who did what to which site (onboarding allowed/refused, add, change, delete)."""
    return StreamSpec(
        name="AUDIT",
        subjects=(subjects.audit_all(),),
        max_age_s=max_age_s,
        max_bytes=1024**3,
        description="audit trail of onboarding and registry changes",
    )


def center_alarm_stream(max_age_s: float = 30 * DAY_S) -> StreamSpec:
    """Alarms raised at the center about sites (the Alarms service aggregates them)."""
    return StreamSpec(
        name="CENTER_ALARMS",
        subjects=(subjects.center_alarm_all(),),
        max_age_s=max_age_s,
        max_bytes=1024**3,
        description="alarms raised and cleared by center services",
    )


SITES_KV = KvSpec("SITES", description="site registry: key = site id, value = SiteRecord")
BOOTSTRAP_TOKENS_KV = KvSpec(
    "BOOTSTRAP_TOKENS", description="bootstrap tokens: key = site id, value = TokenRecord"
)


def controller_lease_kv(ttl_s: float) -> KvSpec:
    """The controller leader lease: the key expires `ttl_s` after its holder's last renewal.

    The TTL is fixed when the bucket is first created (an existing bucket keeps its own).
    """
    return KvSpec("CONTROLLER_LEASE", ttl_s=ttl_s, description="controller leader lease")


# -- config sync (center) -------------------------------------------------------------

CONFIG_LAYERS_KV = KvSpec(
    "CONFIG_LAYERS",
    description="desired config layers: key = <kind>.<scope>[.<name>], value = a stored layer",
)


def config_history_stream(max_age_s: float = 365 * DAY_S) -> StreamSpec:
    """Every accepted config change, in order (`edgebus config history`)."""
    return StreamSpec(
        name="CONFIG_HISTORY",
        subjects=(subjects.config_changed_all(),),
        max_age_s=max_age_s,
        description="accepted config changes",
    )


def sync_reports_stream() -> StreamSpec:
    """The latest config report of every site, captured straight from `up.*.sync.report`
    (one per subject): the sync service rebuilds per-site status from it after a restart."""
    return StreamSpec(
        name="SYNC_REPORTS",
        subjects=(subjects.sync_report_all(),),
        max_age_s=0,
        max_msgs_per_subject=1,
        description="latest config-apply report per site",
    )


def sync_lease_kv(ttl_s: float) -> KvSpec:
    """The sync service's leader lease (the leader audits and re-pushes)."""
    return KvSpec("SYNC_LEASE", ttl_s=ttl_s, description="sync service leader lease")


# -- alarms service (center) -------------------------------------------------------------

ALARMS_KV = KvSpec(
    "ALARMS", description="alarm state: key = <site>.<escaped alarm id>, value = AlarmRecord"
)


def alarms_lease_kv(ttl_s: float) -> KvSpec:
    """The alarms service's leader lease: the leader alone consumes and writes alarm state."""
    return KvSpec("ALARMS_LEASE", ttl_s=ttl_s, description="alarms service leader lease")


def alarm_activity_stream(max_age_s: float = 90 * DAY_S) -> StreamSpec:
    """Alarm history the alarms service adds itself: acknowledgements, flapping and storm
    summaries (raises and clears stay in UP_ALARM and CENTER_ALARMS)."""
    return StreamSpec(
        name="ALARM_ACTIVITY",
        subjects=subjects.alarm_history_all(),
        max_age_s=max_age_s,
        max_bytes=1024**3,
        description="alarm acknowledgements and storm summaries",
    )
