"""`ActiveAlarmStore`: the site's active alarms on disk, so a restarted agent still knows them.

Without it a restarted agent would not know what it had raised: a condition that ended while
it was down would never be cleared, and the center would show the alarm active for good.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas import REGISTRY, Event
from schemas.alarms import AlarmRaised

STORE_FILE = "active.json"


def alarms_dir(agent_data_dir: Path) -> Path:
    return agent_data_dir / "alarms"


@dataclass(frozen=True)
class Stored:
    """An active alarm: the event that raised it, and which part of the agent raised it (the
    part that owes its clear, e.g. the alarm rules)."""

    event: Event[AlarmRaised]
    owner: str = ""


class ActiveAlarmStore:
    """Each active alarm's raise event, as it was published (its id is kept: a re-sent copy
    is the same event at the center), and its owner."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STORE_FILE

    def load(self) -> dict[str, Stored]:
        """alarm id -> what was stored; a corrupt file is an error, never silently empty."""
        if not self.path.exists():
            return {}
        entries: dict[str, dict[str, str]] = json.loads(self.path.read_text(encoding="utf-8"))
        return {
            identity: Stored(
                REGISTRY.decode_as(entry["event"].encode(), AlarmRaised), entry["owner"]
            )
            for identity, entry in entries.items()
        }

    def save(self, active: Mapping[str, Stored]) -> None:
        """Replace the file atomically. Not fsynced: written at every raise and clear (an alarm
        storm at a site makes thousands), and a process crash loses nothing either way."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = {
            identity: {"event": REGISTRY.encode(stored.event).decode(), "owner": stored.owner}
            for identity, stored in active.items()
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
