"""Heartbeat bytes of a virtual site: the real pydantic encoding, and a template fast path.

The template yields the very bytes the real encoder would (checked when it is built); it
exists so a blast can outpace the controller without the simulator eating its CPU.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pydantic_core

from schemas import REGISTRY, new_event
from schemas.controller import Inventory, SiteHeartbeat
from schemas.ids import new_event_id


def site_source(site: str) -> str:
    """The CloudEvents `source` of everything a site emits (what a real agent's bus uses)."""
    return f"/sites/{site}"


def heartbeat_bytes(site: str, seq: int, inventory: Inventory, now: datetime) -> bytes:
    """One `SiteHeartbeat` event, built and encoded exactly as a real site's sender does."""
    data = SiteHeartbeat(site=site, seq=seq, sent_at=now, inventory=inventory)
    return REGISTRY.encode(new_event(data, source=site_source(site), time=now))


def inventory_json(inventory: Inventory) -> bytes:
    return inventory.__pydantic_serializer__.to_json(inventory)


def time_json(moment: datetime) -> bytes:
    """A datetime as pydantic writes it in JSON (quoted RFC 3339)."""
    return pydantic_core.to_json(moment)


class TemplateMismatch(RuntimeError):
    """The template would not reproduce the real encoding (the envelope layout changed)."""


class HeartbeatTemplate:
    """Renders heartbeat events from pre-split constant bytes and the parts that vary
    (id, site, time, seq, inventory); byte-identical to `heartbeat_bytes`."""

    _SAMPLE_SITE = "zq-template-site-7"
    _SAMPLE_SEQ = 7_301_946_582_013

    def __init__(self, sample_inventory: Inventory) -> None:
        sample_time = datetime(2001, 2, 3, 4, 5, 6, 123457, tzinfo=UTC)
        event_id = new_event_id()
        raw = REGISTRY.encode(
            new_event(
                SiteHeartbeat(
                    site=self._SAMPLE_SITE,
                    seq=self._SAMPLE_SEQ,
                    sent_at=sample_time,
                    inventory=sample_inventory,
                ),
                source=site_source(self._SAMPLE_SITE),
                time=sample_time,
                event_id=event_id,
            )
        )
        site, t = self._SAMPLE_SITE.encode(), time_json(sample_time)
        # The order the envelope writes them in: id, source (site), time, data.site,
        # data.seq, data.sent_at, data.inventory.
        order = (
            event_id.encode(),
            site,
            t,
            site,
            str(self._SAMPLE_SEQ).encode(),
            t,
            inventory_json(sample_inventory),
        )
        self._pieces = _split(raw, order)
        self._check(sample_inventory)

    def render(
        self, event_id: str, site: bytes, now_json: bytes, seq: int, inventory: bytes
    ) -> bytes:
        p = self._pieces
        return b"".join(
            (
                p[0], event_id.encode(), p[1], site, p[2], now_json, p[3], site, p[4],
                str(seq).encode(), p[5], now_json, p[6], inventory, p[7],
            )
        )  # fmt: skip

    def _check(self, inventory: Inventory) -> None:
        """Render one heartbeat both ways; refuse to exist if the bytes differ."""
        now = datetime.now(UTC)
        site, event_id, seq = "check-site-01", new_event_id(), 42
        expected = REGISTRY.encode(
            new_event(
                SiteHeartbeat(site=site, seq=seq, sent_at=now, inventory=inventory),
                source=site_source(site),
                time=now,
                event_id=event_id,
            )
        )
        got = self.render(event_id, site.encode(), time_json(now), seq, inventory_json(inventory))
        if got != expected:
            raise TemplateMismatch(f"template renders {got[:200]!r}, real {expected[:200]!r}")


def _split(raw: bytes, values: tuple[bytes, ...]) -> list[bytes]:
    """The constant pieces around `values`, found one after the other in `raw`."""
    pieces: list[bytes] = []
    position = 0
    for value in values:
        found = raw.find(value, position)
        if found < 0:
            raise TemplateMismatch(f"{value[:60]!r} not found in the encoded heartbeat")
        pieces.append(raw[position:found])
        position = found + len(value)
    pieces.append(raw[position:])
    return pieces
