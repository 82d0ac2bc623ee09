"""`AppliedStore`: per kind, the config the site runs and its last apply attempt, on disk.

Written atomically after every change, so a restart with no center runs the last-known config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.sync import AppliedKind

STORE_FILE = "applied.json"


def store_dir(agent_data_dir: Path) -> Path:
    """Where an agent keeps its applied config (the onboarding writes the first one here)."""
    return agent_data_dir / "config"


@dataclass(frozen=True)
class Running:
    """The config a site runs for one kind: the last one it applied successfully."""

    rev: int
    digest: str
    config: dict[str, Any]


class AppliedStore:
    def __init__(self, directory: Path) -> None:
        self.path = directory / STORE_FILE
        self.running: dict[str, Running] = {}
        self.attempts: dict[str, AppliedKind] = {}

    def load(self) -> AppliedStore:
        """Read the file if there is one; a corrupt file is an error, never silently empty."""
        if not self.path.exists():
            return self
        data = json.loads(self.path.read_text(encoding="utf-8"))
        self.running = {kind: Running(**entry) for kind, entry in data["running"].items()}
        self.attempts = {
            kind: AppliedKind.model_validate(entry) for kind, entry in data["attempts"].items()
        }
        return self

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "running": {kind: asdict(entry) for kind, entry in self.running.items()},
            "attempts": {kind: a.model_dump(mode="json") for kind, a in self.attempts.items()},
        }
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
