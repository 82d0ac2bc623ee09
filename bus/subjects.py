"""Every NATS subject edgebus uses, built in this one module (and listed for AsyncAPI).

The site id is always its own token so per-site permissions can be `up.<site>.>` etc.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

CENTER = "center"  # reserved scope: never a site id

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SubjectError(ValueError):
    """A token that would break the subject hierarchy (dots, wildcards, spaces, empty)."""


def token(value: str) -> str:
    """Validate one subject token: ids become tokens, never free text."""
    if not _TOKEN.match(value):
        raise SubjectError(f"not a valid subject token: {value!r}")
    return value


# `down.<site>` shares its level with `down.group.` and `down.all.`: a site named "group"
# would be granted `down.group.>`, every group's commands.
RESERVED_SITE_IDS = frozenset({CENTER, "group", "all"})


def site_id(value: str) -> str:
    if value in RESERVED_SITE_IDS:
        raise SubjectError(f"{value!r} is reserved and cannot be a site id")
    return token(value)


# -- devices (site-local) ---------------------------------------------------------


def device_raw(site: str, device: str, channel: str) -> str:
    """Where the NATS MQTT listener puts topic `dev/<site>/<device>/<channel>`."""
    return f"dev.{token(site)}.{token(device)}.{token(channel)}"


def device_raw_all(site: str) -> str:
    return f"dev.{token(site)}.>"


def mqtt_device_topic(site: str, device: str, channel: str) -> str:
    return f"dev/{token(site)}/{token(device)}/{token(channel)}"


def mqtt_device_filter(site: str) -> str:
    return f"dev/{token(site)}/+/+"


def device_raw_any() -> str:
    """Every device subject, of any site: ingest captures all to dead-letter foreign ones."""
    return "dev.>"


def parse_device_raw(subject: str) -> tuple[str, str, str] | None:
    """(site, device, channel) of a `dev.` subject, or None if it has another shape."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "dev" or not all(_TOKEN.match(p) for p in parts[1:]):
        return None
    return parts[1], parts[2], parts[3]


def _token_or_wildcard(value: str) -> str:
    return value if value in ("*", ">") else token(value)


def site_event(site: str, kind: str, *rest: str) -> str:
    """Typed events published at the site for local subscribers: `evt.<site>.<kind>...`."""
    tail = "".join(f".{_token_or_wildcard(part)}" for part in rest)
    return f"evt.{token(site)}.{_token_or_wildcard(kind)}{tail}"


def site_events_all(site: str) -> str:
    return f"evt.{token(site)}.>"


def site_readings(site: str, device: str = "*", channel: str = "*") -> str:
    """Typed device-reading events published at the site for local subscribers."""
    return site_event(site, "reading", device, channel)


def local_control(site: str, op: str) -> str:
    """Requests a local operator makes to the site's agent (status, ...); works offline."""
    return f"local.{token(site)}.{token(op)}"


# -- the site's replay log (site-local, never crosses the leaf link) -----------------


def replay(site: str, kind: str, *rest: str) -> str:
    """`replay.<site>.<kind>[.<key>...]`: what the site owes the center, in its own domain."""
    tail = "".join(f".{token(part)}" for part in rest)
    return f"replay.{site_id(site)}.{token(kind)}{tail}"


def replay_all(site: str) -> str:
    return f"replay.{site_id(site)}.>"


def replay_to_up(subject: str) -> str:
    """The center subject a replay-log entry is forwarded to: `replay.` -> `up.`."""
    if not subject.startswith("replay."):
        raise SubjectError(f"not a replay-log subject: {subject!r}")
    return "up." + subject[len("replay.") :]


# -- site -> center ---------------------------------------------------------------


def up(site: str, kind: str, *rest: str) -> str:
    """Site-to-center subject: `up.<site>.<kind>[.<rest>...]`."""
    tail = "".join(f".{token(part)}" for part in rest)
    return f"up.{site_id(site)}.{token(kind)}{tail}"


def up_all(kind: str) -> str:
    return f"up.*.{token(kind)}.>"


def up_each(kind: str) -> str:
    """`up.*.<kind>`: one event kind from every site, without deeper tokens (heartbeats)."""
    return f"up.*.{token(kind)}"


def up_logs(site: str = "*", level: str = "*") -> str:
    """`up.<site>.log.<level>`: agent log records one site (`*`: any) shipped at one level."""
    return f"up.{site if site == '*' else site_id(site)}.log.{_token_or_wildcard(level)}"


def parse_up(subject: str) -> tuple[str, str] | None:
    """(site, kind) of an `up.<site>.<kind>[...]` subject, or None if it has another shape.

    The subject, not the payload, says which site sent it: per-site permissions scope
    each site to `up.<own id>.>`, so a payload naming another site is an impersonation.
    """
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "up" or not all(_TOKEN.match(p) for p in parts[1:3]):
        return None
    if parts[1] == CENTER:
        return None
    return parts[1], parts[2]


# -- center -> sites --------------------------------------------------------------


def down_site(site: str, kind: str) -> str:
    return f"down.{site_id(site)}.{token(kind)}"


def down_group(group: str, kind: str) -> str:
    return f"down.group.{token(group)}.{token(kind)}"


def down_all(kind: str) -> str:
    return f"down.all.{token(kind)}"


# -- operator requests ------------------------------------------------------------


def control(service: str, op: str, *rest: str) -> str:
    """`ctl.<service>.<op>[.<rest>...]`, e.g. `control("controller", "sites", "add")`."""
    tail = "".join(f".{token(part)}" for part in rest)
    return f"ctl.{token(service)}.{token(op)}{tail}"


# -- center-side event history (the controller and later center services) -----------------


def site_availability(site: str) -> str:
    """A site's availability transitions, published by the controller."""
    return f"center.sites.availability.{site_id(site)}"


def center_sites_all() -> str:
    return "center.sites.>"


def audit(action: str) -> str:
    """Audit trail of operator and onboarding actions: `center.audit.<action>`."""
    return f"center.audit.{token(action)}"


def audit_all() -> str:
    return "center.audit.>"


def center_alarm(site: str) -> str:
    """Alarms the center raises about a site (e.g. it went offline): `center.alarm.<site>`."""
    return f"center.alarm.{site_id(site)}"


def center_alarm_all() -> str:
    return "center.alarm.>"


# -- alarms service (center) -------------------------------------------------------------


def alarms_control(op: str) -> str:
    """Operator requests to the alarms service: `ctl.alarms.<op>` (list, summary, ...)."""
    return control("alarms", op)


def alarm_ack(site: str) -> str:
    """Operator acknowledgements of a site's alarms (stored: they are alarm history)."""
    return f"center.alarms.ack.{site_id(site)}"


def alarm_activity(site: str) -> str:
    """Flapping and storm summaries the alarms service stores about a site's alarms."""
    return f"center.alarms.activity.{site_id(site)}"


def alarm_history_all() -> tuple[str, ...]:
    """What the alarms service stores itself (besides the sites' and the center's alarms)."""
    return ("center.alarms.ack.*", "center.alarms.activity.*")


def alarm_history_of(site: str) -> str:
    """Acknowledgements and summaries about one site (`*` for every site)."""
    return f"center.alarms.*.{_site_or_wildcard(site)}"


def alarm_notice(site: str) -> str:
    """Live notices for operators (not stored): alarm changes, rate-limited in storms."""
    return f"center.alarms.notice.{site_id(site)}"


def alarm_notice_all() -> str:
    return "center.alarms.notice.*"


def _site_or_wildcard(site: str) -> str:
    return site if site == "*" else site_id(site)


# -- config sync ------------------------------------------------------------------------


def config_desired(site: str) -> str:
    """Where the center sends a site the newest effective config of a kind."""
    return down_site(site, "config")


def sync_report(site: str) -> str:
    """Where a site reports what config it applied (or failed)."""
    return up(site, "sync", "report")


def sync_report_all() -> str:
    return "up.*.sync.report"


def sync_pull(site: str) -> str:
    """A site's request for its whole effective config (answered by the sync service)."""
    return up(site, "sync", "pull")


def sync_pull_all() -> str:
    return "up.*.sync.pull"


def config_changed(kind: str) -> str:
    """History of accepted config changes: `center.config.changed.<kind>`."""
    return f"center.config.changed.{token(kind)}"


def config_changed_all() -> str:
    return "center.config.changed.>"


# -- per-site permissions (rendered into each site's JWT by bus.auth) -------------------

SITE_INBOX_ROOT = "_INBOX"
CENTER_INBOX_ROOT = "_INBOX_center"
_TAG_TEMPLATE = re.compile(r"^\{\{tag\([a-z]+\)\}\}$")


def site_inbox_prefix(site: str) -> str:
    """nats-py `inbox_prefix` every connection of a site must use: `_INBOX.<site>`.

    Replies and JetStream acks for the site then stay inside what only it may read.
    """
    return f"{SITE_INBOX_ROOT}.{site_id(site)}"


def center_inbox_prefix(site: str) -> str:
    """Reply prefix of center->site requests: `_INBOX_center.<site>`; the site may publish
    only there, so it can answer its own requests and no other site's."""
    return f"{CENTER_INBOX_ROOT}.{site_id(site)}"


@dataclass(frozen=True)
class SitePermissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def site_permissions(
    site: str, groups: tuple[str, ...], *, site_jetstream_from_center: bool = False
) -> SitePermissions:
    """Everything one site may publish and subscribe, and nothing more.

    `site`/`groups` are ids, or JWT template expressions such as `{{tag(site)}}` that the
    server expands per user. No `$JS.API.>`: JetStream publish needs none, and with it a
    site could read other sites' data; with `site_jetstream_from_center` the center may
    also reach the site's own JetStream domain (`$JS.<site>.API.>`).
    """
    s = _id_or_template(site, site_id)
    subscribe = [f"down.{s}.>", "down.all.>"]
    subscribe += [f"down.group.{_id_or_template(g, token)}.>" for g in groups]
    subscribe.append(f"{SITE_INBOX_ROOT}.{s}.>")
    if site_jetstream_from_center:
        subscribe.append(f"$JS.{s}.API.>")
    return SitePermissions(
        publish=(f"up.{s}.>", f"{CENTER_INBOX_ROOT}.{s}.>"), subscribe=tuple(subscribe)
    )


def _id_or_template(value: str, check: Callable[[str], str]) -> str:
    return value if _TAG_TEMPLATE.match(value) else check(value)


# -- onboarding (a site with only a bootstrap token, before it has its own identity) ----

BOOTSTRAP_INBOX_ROOT = "_INBOX_bootstrap"


def onboard() -> str:
    """Where a new site sends its onboarding request (answered by the controller)."""
    return control("controller", "onboard")


def bootstrap_inbox_prefix(nonce: str) -> str:
    """nats-py `inbox_prefix` of one onboarding connection: `_INBOX_bootstrap.<nonce>`."""
    return f"{BOOTSTRAP_INBOX_ROOT}.{token(nonce)}"


def bootstrap_permissions() -> SitePermissions:
    """All the shared bootstrap user may do: ask to onboard and read onboarding replies."""
    return SitePermissions(publish=(onboard(),), subscribe=(f"{BOOTSTRAP_INBOX_ROOT}.>",))


# -- dead letters -----------------------------------------------------------------


def dead_letter(scope: str, component: str, reason: str) -> str:
    """`dlq.<scope>.<component>.<reason>`; scope is a site id or `center`."""
    return f"dlq.{token(scope)}.{token(component)}.{token(reason)}"


def dead_letter_all(scope: str) -> str:
    return f"dlq.{token(scope)}.>"


@dataclass(frozen=True)
class SubjectDoc:
    """One row of the subject catalogue: the pattern, who publishes, what flows there
    (`messages`: the event types, as registered in `schemas`; none for raw or any bytes)."""

    pattern: str
    direction: str
    description: str
    messages: tuple[str, ...] = ()


_READING = ("edgebus.device.reading",)
_ALARM = ("edgebus.alarm.raised", "edgebus.alarm.cleared")
_LOG = ("edgebus.log.record",)
_ERROR = ("edgebus.error",)
_CONTROLLER_OPS = tuple(
    f"edgebus.controller.{name}"
    for name in ("sites.add", "sites.added", "sites.change", "sites.changed", "sites.query",
                 "sites.list", "stats.query", "stats")
)  # fmt: skip
_SYNC_OPS = tuple(
    f"edgebus.sync.{name}"
    for name in ("set", "set.result", "get", "view", "history.query", "history",
                 "status.query", "status", "bundle.query", "bundle")
)  # fmt: skip
_ALARM_OPS = tuple(
    f"edgebus.alarm.{name}"
    for name in ("list", "listed", "summary.query", "summary", "history.query", "history",
                 "ack", "ack.reply", "stats.query", "stats")
)  # fmt: skip


CATALOGUE: tuple[SubjectDoc, ...] = (
    SubjectDoc("dev.{site}.{device}.{channel}", "device->site", "raw MQTT device payloads"),
    SubjectDoc(
        "evt.{site}.reading.{device}.{channel}",
        "site-local",
        "typed device readings",
        _READING,
    ),
    SubjectDoc(
        "evt.{site}.alarm",
        "site-local",
        "alarms raised and cleared at the site",
        _ALARM,
    ),
    SubjectDoc(
        "replay.{site}.{kind}.>",
        "site-local",
        "the edge-local replay log",
        (*_READING, *_ALARM, *_LOG),
    ),
    SubjectDoc(
        "local.{site}.{op}",
        "local operator->site",
        "site status, works offline",
        ("edgebus.site.status.query", "edgebus.site.status.report", *_ERROR),
    ),
    SubjectDoc(
        "up.{site}.{kind}.>",
        "site->center",
        "replay-log forwarded events",
        (*_READING, *_ALARM, *_LOG),
    ),
    SubjectDoc("down.{site}.{kind}", "center->site", "desired state / commands for one site"),
    SubjectDoc("down.group.{group}.{kind}", "center->sites", "desired state for a group"),
    SubjectDoc("down.all.{kind}", "center->sites", "desired state for every site"),
    SubjectDoc(
        "up.{site}.heartbeat",
        "site->center",
        "heartbeat + inventory (core, not stored)",
        ("edgebus.site.heartbeat",),
    ),
    SubjectDoc(
        "up.{site}.log.{level}",
        "site->center",
        "agent log records (at the ship level+)",
        _LOG,
    ),
    SubjectDoc(
        "ctl.{service}.{op}",
        "operator->center",
        "operator requests",
        (*_CONTROLLER_OPS, *_SYNC_OPS, *_ERROR),
    ),
    SubjectDoc(
        "ctl.controller.onboard",
        "site->center",
        "onboarding with a bootstrap token",
        ("edgebus.controller.onboard", "edgebus.controller.onboarded", *_ERROR),
    ),
    SubjectDoc(
        "center.sites.availability.{site}",
        "center",
        "site availability transitions",
        ("edgebus.site.availability.changed",),
    ),
    SubjectDoc(
        "center.audit.{action}",
        "center",
        "audit trail (onboarding, registry changes)",
        ("edgebus.audit",),
    ),
    SubjectDoc(
        "center.alarm.{site}",
        "center",
        "alarms the center raises about a site",
        _ALARM,
    ),
    SubjectDoc(
        "ctl.alarms.{op}",
        "operator->center",
        "alarm list, summary, history, ack",
        (*_ALARM_OPS, *_ERROR),
    ),
    SubjectDoc(
        "center.alarms.ack.{site}",
        "center",
        "operator acknowledgements (stored)",
        ("edgebus.alarm.acknowledged",),
    ),
    SubjectDoc(
        "center.alarms.activity.{site}",
        "center",
        "flapping / storm summaries (stored)",
        ("edgebus.alarm.notice",),
    ),
    SubjectDoc(
        "center.alarms.notice.{site}",
        "center",
        "live alarm notices, rate-limited",
        ("edgebus.alarm.notice",),
    ),
    SubjectDoc(
        "down.{site}.config",
        "center->site",
        "newest effective config of one kind",
        ("edgebus.sync.desired",),
    ),
    SubjectDoc(
        "up.{site}.sync.report",
        "site->center",
        "config applied / failed, per kind",
        ("edgebus.sync.report",),
    ),
    SubjectDoc(
        "up.{site}.sync.pull",
        "site->center",
        "request: the site's whole config",
        ("edgebus.sync.pull", "edgebus.sync.bundle", *_ERROR),
    ),
    SubjectDoc(
        "center.config.changed.{kind}",
        "center",
        "history of accepted config changes",
        ("edgebus.sync.changed",),
    ),
    SubjectDoc("_INBOX.{site}.>", "center->site", "replies and PubAcks for one site"),
    SubjectDoc("_INBOX_center.{site}.>", "site->center", "replies to center->site requests"),
    SubjectDoc("_INBOX_bootstrap.{nonce}.>", "center->site", "onboarding replies (bootstrap)"),
    SubjectDoc("dlq.{scope}.{component}.{reason}", "any", "dead letters with their reason"),
)
