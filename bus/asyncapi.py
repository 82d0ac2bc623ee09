"""The AsyncAPI 3.0 document of edgebus, generated from the subject catalogue and the registry.

`edgebus schemas asyncapi` prints it; channels, messages and payload schemas are never
written by hand, so the document cannot drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from bus.subjects import CATALOGUE, SubjectDoc
from schemas.export import envelope_json_schema
from schemas.registry import EventRegistry, EventSpec

ASYNCAPI_VERSION = "3.0.0"
CONTENT_TYPE = "application/cloudevents+json"
_PARAMETER = re.compile(r"\{([a-z_]+)\}")
_DEFS_REF = "#/$defs/"


def channel_id(pattern: str) -> str:
    """A stable id for a subject pattern: `up.{site}.{kind}.>` -> `up_site_kind_all`."""
    text = pattern.replace(">", "all").replace("*", "any")
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def message_id(spec: EventSpec) -> str:
    return f"{spec.event_type}.v{spec.version}"


def asyncapi_document(
    registry: EventRegistry,
    *,
    version: str,
    catalogue: Iterable[SubjectDoc] = CATALOGUE,
) -> dict[str, Any]:
    """The whole document as plain JSON data; KeyError if the catalogue names an event type
    the registry does not know (a typo there must not pass silently)."""
    versions: dict[str, list[EventSpec]] = {}
    for spec in sorted(registry.specs(), key=lambda s: (s.event_type, s.version)):
        versions.setdefault(spec.event_type, []).append(spec)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for doc in catalogue:
        cid = channel_id(doc.pattern)
        specs = [spec for event_type in doc.messages for spec in versions[event_type]]
        channel: dict[str, Any] = {"address": doc.pattern, "description": doc.description}
        parameters = _PARAMETER.findall(doc.pattern)
        if parameters:
            channel["parameters"] = {
                name: {"description": f"the {name} token"} for name in parameters
            }
        if specs:
            channel["messages"] = {
                message_id(spec): {"$ref": f"#/components/messages/{message_id(spec)}"}
                for spec in specs
            }
        channels[cid] = channel
        operations[cid] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"{doc.direction}: {doc.description}",
        }
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for specs in versions.values():
        for spec in specs:
            mid = message_id(spec)
            schemas[mid] = _rebased(
                envelope_json_schema(spec), f"#/components/schemas/{mid}/$defs/"
            )
            messages[mid] = {
                "name": spec.event_type,
                "title": f"{spec.event_type} v{spec.version}",
                "contentType": CONTENT_TYPE,
                "payload": {"$ref": f"#/components/schemas/{mid}"},
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "edgebus",
            "version": version,
            "description": "Versioned CloudEvents over NATS between one center and many edge "
            "sites; devices publish over MQTT (topic dev/<site>/<device>/<channel>).",
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _rebased(node: Any, prefix: str) -> Any:
    """`schema` with its local `#/$defs/X` references pointing into the document instead."""
    if isinstance(node, dict):
        out = {key: _rebased(value, prefix) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS_REF):
            out["$ref"] = prefix + ref[len(_DEFS_REF) :]
        return out
    if isinstance(node, list):
        return [_rebased(item, prefix) for item in node]
    return node
