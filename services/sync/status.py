"""Sync status and the audit's decisions: pure functions over desired vs reported state.

A site is in sync for a kind when the digest it reports applied is the one desired now.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.sync import AppliedKind, ApplyState, SyncState
from services.sync.layers import Effective

# Worst first: a site's roll-up is the worst state over its kinds.
SEVERITY = {
    SyncState.FAILED: 0,
    SyncState.OUT_OF_SYNC: 1,
    SyncState.UNKNOWN: 2,
    SyncState.IN_SYNC: 3,
}


def sync_state(desired: Effective, applied: AppliedKind | None) -> SyncState:
    """unknown: the site never reported this kind; failed: it rejected exactly this config.

    Revision 0 means no layer of the kind exists: nothing is desired, so a site that never
    heard of it is in sync (it runs its own defaults and start-up flags).
    """
    if applied is None:
        return SyncState.IN_SYNC if desired.rev == 0 else SyncState.UNKNOWN
    if applied.digest != desired.digest:
        return SyncState.OUT_OF_SYNC
    return SyncState.IN_SYNC if applied.state == ApplyState.APPLIED else SyncState.FAILED


def worst(states: Iterable[SyncState]) -> SyncState:
    return min(states, key=SEVERITY.__getitem__, default=SyncState.UNKNOWN)


@dataclass(frozen=True)
class PushPolicy:
    """When the center (re)sends a site its desired config."""

    resend_after_s: float = 30.0  # the audit re-sends an unanswered push after this
    # A report still showing an old config after a push this old means the push was lost.
    report_repush_after_s: float = 2.0


def should_push(state: SyncState, last_push_at: float | None, now: float, after_s: float) -> bool:
    """Out of sync or never reported: send, unless a push went out less than `after_s` ago
    (it may still be answered). A site that failed this exact config is not sent it again:
    it would only fail again; a newer revision is."""
    if state in (SyncState.IN_SYNC, SyncState.FAILED):
        return False
    return last_push_at is None or now - last_push_at >= after_s
