"""How registry records change: add, operator changes, onboarding, sightings, availability.

Pure functions from a record (and an input) to the next record; the registry stores them.
"""

from __future__ import annotations

from datetime import datetime

from bus import subjects
from schemas.controller import Inventory, SiteChange, SiteRecord
from services.controller.availability import Assessment
from services.controller.liveness import Sighting
from services.controller.tokens import TokenRecord, TokenVerdict, check


class Refusal(Exception):
    """A request the controller declines: `code` is stable, `message` says why to a human."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def plan_add(
    existing: SiteRecord | None,
    site: str,
    group: str,
    labels: dict[str, str],
    now: datetime,
) -> SiteRecord:
    """The record after `sites add`: new, or a not-yet-onboarded one re-added (new token).

    Raises Refusal for a reserved id or a site that already onboarded (delete it first,
    so its credentials are revoked before it may onboard again).
    """
    try:
        subjects.site_id(site)
    except subjects.SubjectError as exc:
        raise Refusal("site_id_invalid", str(exc)) from None
    if existing is None:
        return SiteRecord(site=site, group=group, labels=dict(labels), added_at=now)
    if existing.onboarded_at is not None:
        raise Refusal(
            "site_exists",
            f"site {site} already onboarded at {existing.onboarded_at.isoformat()}; "
            f"`edgebus sites delete {site}` first to onboard it again",
        )
    return existing.model_copy(update={"group": group, "labels": dict(labels)})


def apply_change(record: SiteRecord, change: SiteChange) -> SiteRecord:
    """Manage/unmanage, regroup, set and remove labels (delete is handled by the caller)."""
    labels = {**record.labels, **change.set_labels}
    for key in change.remove_labels:
        labels.pop(key, None)
    update: dict[str, object] = {"labels": labels}
    if change.managed is not None:
        update["managed"] = change.managed
    if change.group is not None:
        update["group"] = change.group
    return record.model_copy(update=update)


def describe_change(change: SiteChange) -> str:
    """A short human summary of a change, for the audit trail."""
    if change.delete:
        return "delete"
    parts: list[str] = []
    if change.managed is not None:
        parts.append("manage" if change.managed else "unmanage")
    if change.group is not None:
        parts.append(f"group={change.group}")
    parts += [f"label {k}={v}" for k, v in sorted(change.set_labels.items())]
    parts += [f"remove label {k}" for k in change.remove_labels]
    return ", ".join(parts) or "no-op"


# -- onboarding ----------------------------------------------------------------------


def onboard_verdict(
    record: SiteRecord | None,
    token: TokenRecord | None,
    secret: str,
    now: datetime,
    public_key: str | None = None,
) -> TokenVerdict:
    """Whether a site may onboard now with `secret` (and its key): the site must exist and
    its token check; a repeat must come from the identity the record was onboarded with."""
    if record is None:
        return TokenVerdict.UNKNOWN
    verdict = check(token, secret, now, public_key)
    if verdict == TokenVerdict.REPEAT and (
        record.onboarded_at is None or record.user_public_key != public_key
    ):
        return TokenVerdict.USED
    return verdict


def refusal_message(verdict: TokenVerdict, site: str, token: TokenRecord | None) -> str:
    """What an operator (or the site's log) needs to read to fix a refused onboarding."""
    redo = f"create a new token with `edgebus sites add {site}`"
    if verdict == TokenVerdict.UNKNOWN:
        return f"no bootstrap token exists for site {site} (never added, or deleted); {redo}"
    if verdict == TokenVerdict.WRONG:
        return (
            f"the token does not match the one issued for site {site} "
            f"(a newer token may have replaced it); {redo}"
        )
    if verdict == TokenVerdict.EXPIRED and token is not None:
        return f"the token for site {site} expired at {token.expires_at.isoformat()}; {redo}"
    if verdict == TokenVerdict.USED and token is not None and token.used_at is not None:
        return (
            f"the token for site {site} was already used at {token.used_at.isoformat()}; a "
            f"token onboards once (delete and re-add the site to onboard it again)"
        )
    return f"token refused for site {site}: {verdict.value}"


def mark_token_used(token: TokenRecord, now: datetime, public_key: str | None) -> TokenRecord:
    return token.model_copy(update={"used_at": now, "used_by": public_key})


def mark_onboarded(
    record: SiteRecord, now: datetime, user_public_key: str | None, inventory: Inventory | None
) -> SiteRecord:
    update: dict[str, object] = {"onboarded_at": now, "user_public_key": user_public_key}
    if inventory is not None:
        update["inventory"] = inventory
    return record.model_copy(update=update)


# -- liveness --------------------------------------------------------------------------


def with_sighting(record: SiteRecord, sighting: Sighting) -> SiteRecord:
    """The record with the latest heartbeat's time and inventory (never moves back)."""
    if record.last_seen is not None and record.last_seen >= sighting.heard:
        return record
    return record.model_copy(update={"last_seen": sighting.heard, "inventory": sighting.inventory})


def with_availability(
    record: SiteRecord, assessment: Assessment, now: datetime, sighting: Sighting | None
) -> SiteRecord:
    changed = record.model_copy(
        update={
            "availability": assessment.availability,
            "availability_since": now,
            "availability_reason": assessment.reason[:200],
        }
    )
    return with_sighting(changed, sighting) if sighting is not None else changed


def persist_due(record: SiteRecord, sighting: Sighting, every_s: float) -> bool:
    """Whether a heartbeat is worth a registry write: at most every `every_s` per site,
    except that a new software version is written at once (operators watch rollouts)."""
    if record.last_seen is None:
        return True
    if record.inventory is None or (
        record.inventory.agent_version != sighting.inventory.agent_version
    ):
        return True
    return (sighting.heard - record.last_seen).total_seconds() >= every_s
