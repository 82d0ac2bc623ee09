"""`ActiveAlarmStore`: the site's active alarms on disk, so a restarted agent still knows them.

Without it a restarted agent would not know what it had raised: a condition that ended while
it was down would never be cleared, and the center would show the alarm active for good.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from schemas import REGISTRY, Event
from schemas.alarms import AlarmRaised

STORE_FILE = "active.json"


def alarms_dir(agent_data_dir: Path) -> Path:
    return agent_data_dir / "alarms"


class ActiveAlarmStore:
    """Each active alarm's raise event, as it was published (its id is kept: a re-sent copy
    is the same event at the center)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STORE_FILE

    def load(self) -> dict[str, Event[AlarmRaised]]:
        """alarm id -> raise event; a corrupt file is an error, never silently empty."""
        if not self.path.exists():
            return {}
        entries: dict[str, str] = json.loads(self.path.read_text(encoding="utf-8"))
        return {
            identity: REGISTRY.decode_as(raw.encode(), AlarmRaised)
            for identity, raw in entries.items()
        }

    def save(self, raised: Mapping[str, Event[Any]]) -> None:
        """Replace the file atomically. Not fsynced: written at every raise and clear (an alarm
        storm at a site makes thousands), and a process crash loses nothing either way."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = {identity: REGISTRY.encode(event).decode() for identity, event in raised.items()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
