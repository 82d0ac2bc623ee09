"""Export the JSON Schema of every registered event version, one file per (type, version).

Each file describes the whole CloudEvents envelope with that version's `data`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.registry import EventRegistry, EventSpec


def envelope_json_schema(spec: EventSpec) -> dict[str, Any]:
    schema: dict[str, Any] = spec.envelope.model_json_schema(mode="serialization")
    schema["$id"] = spec.schema_uri
    schema["title"] = f"{spec.event_type} v{spec.version}"
    return schema


def export_json_schemas(registry: EventRegistry, directory: Path) -> list[Path]:
    """Write `<type>.v<N>.schema.json` for every registered event; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in sorted(registry.specs(), key=lambda s: (s.event_type, s.version)):
        path = directory / f"{spec.event_type}.v{spec.version}.schema.json"
        path.write_text(json.dumps(envelope_json_schema(spec), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
