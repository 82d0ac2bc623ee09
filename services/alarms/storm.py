"""What operators are told about alarm changes: one notice per change while calm; in a storm,
per-site and fleet-wide rate limits and periodic summaries instead. A small state machine over
plain data.

Nothing here drops history: it only decides notices (and which summaries are stored).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from schemas.alarms import AlarmNotice, AlarmState, NoticeKind
from services.alarms.state import AlarmEntry


@dataclass(frozen=True)
class StormPolicy:
    """Each site may send operators `site_rate_per_s` notices a second (bursts of
    `site_burst`), and the whole fleet `fleet_rate_per_s` (bursts of `fleet_burst`): a storm
    over many sites at once (a regional power cut) floods operators as surely as one site
    does. What is held back, and flapping alarms, are summarised every `summary_every_s`."""

    site_rate_per_s: float = 5.0
    site_burst: int = 50
    fleet_rate_per_s: float = 200.0
    fleet_burst: int = 1000
    summary_every_s: float = 30.0

    def __post_init__(self) -> None:
        if self.site_rate_per_s <= 0 or self.site_burst < 1 or self.summary_every_s <= 0:
            raise ValueError("need site_rate_per_s > 0, site_burst >= 1, summary_every_s > 0")
        if self.fleet_rate_per_s <= 0 or self.fleet_burst < 1:
            raise ValueError("need fleet_rate_per_s > 0 and fleet_burst >= 1")


@dataclass(frozen=True, slots=True)
class Notice:
    """A notice, whether it belongs in the stored alarm history, and whether it goes out live."""

    notice: AlarmNotice
    store: bool
    live: bool = True


@dataclass(slots=True)
class _Bucket:
    """A token bucket: `rate` tokens a second up to `burst`."""

    rate: float
    burst: float
    tokens: float
    refilled_at: float

    def refill(self, now_s: float) -> None:
        elapsed = now_s - self.refilled_at
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.refilled_at = now_s


@dataclass(slots=True)
class _Site:
    bucket: _Bucket
    held_back: int = 0
    summarized_at: float = 0.0


@dataclass(slots=True)
class _Flap:
    summarized_at: float
    reported: int = 0  # of the record's `suppressed` changes, how many a summary covered


class StormGuard:
    """Per-site token buckets and per-alarm flap summaries; `now_s` is a monotonic clock."""

    def __init__(self, policy: StormPolicy | None = None) -> None:
        self.policy = policy or StormPolicy()
        self._sites: dict[str, _Site] = {}
        self._flaps: dict[str, _Flap] = {}
        self._fleet: _Bucket | None = None
        self.held_back = 0  # notices replaced by summaries, since start

    def _allow(self, site: str, now_s: float) -> bool:
        """Take a token from the site's bucket and the fleet's, or count the notice held back
        (for the site's next storm summary). A refused notice takes no token from either."""
        policy = self.policy
        state = self._sites.get(site)
        if state is None:
            burst = float(policy.site_burst)
            state = _Site(_Bucket(policy.site_rate_per_s, burst, burst, now_s), summarized_at=now_s)
            self._sites[site] = state
        fleet = self._fleet
        if fleet is None:
            burst = float(policy.fleet_burst)
            fleet = self._fleet = _Bucket(policy.fleet_rate_per_s, burst, burst, now_s)
        # A batch of changes shares one `now_s`: a bucket refilled at it already is full up
        # to it (refill would add nothing), so the call is skipped.
        if now_s > fleet.refilled_at:
            fleet.refill(now_s)
        if fleet.tokens >= 1.0:  # in a fleet-wide storm, the site's bucket need not be read
            bucket = state.bucket
            if now_s > bucket.refilled_at:
                bucket.refill(now_s)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                fleet.tokens -= 1.0
                return True
        state.held_back += 1
        self.held_back += 1
        return False

    def on_change(
        self, after: AlarmEntry, was_flapping: bool, now_s: float, at: datetime
    ) -> list[Notice]:
        """Notices for one applied raise or clear (`after`: the alarm now)."""
        if after.flapping:
            if was_flapping:
                return []  # counted in the entry's `suppressed`; summarised by `tick`
            self._flaps[after.alarm_id] = _Flap(summarized_at=now_s)
            notice = _notice(
                after,
                NoticeKind.FLAPPING_STARTED,
                at,
                f"flapping: {after.flap_window_count} changes since "
                f"{after.flap_window_start.isoformat() if after.flap_window_start else '?'}; "
                "changes are summarised until it settles",
                transitions=after.flap_window_count,
            )
            # Always stored (history); told live only within the site's budget.
            return [Notice(notice, store=True, live=self._allow(after.site, now_s))]
        if not self._allow(after.site, now_s):
            return []
        kind = NoticeKind.RAISED if after.state is AlarmState.ACTIVE else NoticeKind.CLEARED
        text = after.text if after.state is AlarmState.ACTIVE else after.clear_text
        return [Notice(_notice(after, kind, at, text, transitions=1), store=False)]

    def on_acknowledged(self, after: AlarmEntry, now_s: float, at: datetime) -> list[Notice]:
        if not self._allow(after.site, now_s):
            return []
        text = f"acknowledged by {after.acknowledged_by}" + (
            f": {after.ack_note}" if after.ack_note else ""
        )
        return [Notice(_notice(after, NoticeKind.ACKNOWLEDGED, at, text), store=False)]

    def on_settled(self, after: AlarmEntry, suppressed: int, at: datetime) -> list[Notice]:
        """A flapping alarm settled after `suppressed` changes not told one by one: say how it
        ended (always stored and told)."""
        self._flaps.pop(after.alarm_id, None)
        text = (
            f"stopped flapping after {suppressed} changes not shown one by one; "
            f"now {after.state.value}"
        )
        notice = _notice(
            after, NoticeKind.FLAPPING_ENDED, at, text, transitions=0, suppressed=suppressed
        )
        return [Notice(notice, store=True)]

    def tick(self, flapping: Iterable[AlarmEntry], now_s: float, at: datetime) -> list[Notice]:
        """Summaries that are due: per flapping alarm, and per site of held-back notices."""
        out: list[Notice] = []
        every = self.policy.summary_every_s
        for record in flapping:
            flap = self._flaps.setdefault(record.alarm_id, _Flap(summarized_at=now_s))
            news = record.suppressed - flap.reported
            if news > 0 and now_s - flap.summarized_at >= every:
                flap.summarized_at, flap.reported = now_s, record.suppressed
                text = (
                    f"still flapping: {news} more changes, {record.suppressed} since it started; "
                    f"now {record.state.value}"
                )
                notice = _notice(
                    record, NoticeKind.FLAP_SUMMARY, at, text, transitions=news, suppressed=news
                )
                out.append(Notice(notice, store=True))
        for site, state in self._sites.items():
            if state.held_back and now_s - state.summarized_at >= every:
                held, state.held_back, state.summarized_at = state.held_back, 0, now_s
                notice = AlarmNotice(
                    kind=NoticeKind.SITE_STORM,
                    site=site,
                    text=f"{held} alarm notices held back (rate limit); see the alarm history",
                    transitions=held,
                    suppressed=held,
                    at=at,
                )
                out.append(Notice(notice, store=True))
        return out


def _notice(
    record: AlarmEntry,
    kind: NoticeKind,
    at: datetime,
    text: str,
    *,
    transitions: int = 1,
    suppressed: int = 0,
) -> AlarmNotice:
    return AlarmNotice(
        kind=kind,
        site=record.site,
        alarm_id=record.alarm_id,
        severity=record.severity,
        state=record.state,
        text=text[:2000],
        transitions=transitions,
        suppressed=suppressed,
        at=at,
    )
