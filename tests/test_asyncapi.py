"""The AsyncAPI document: generated from the subject catalogue and the registry, complete, and
with every reference resolving inside the document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bus.asyncapi import asyncapi_document, channel_id
from bus.subjects import CATALOGUE, SubjectDoc
from schemas import REGISTRY

EDGEBUS = Path(sys.executable).parent / "edgebus"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi_document(REGISTRY, version="9.9.9")


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_subject_of_the_catalogue_is_a_channel_with_its_parameters(
    document: dict[str, Any],
) -> None:
    assert document["asyncapi"] == "3.0.0" and document["info"]["version"] == "9.9.9"
    channels = document["channels"]
    assert len(channels) == len(CATALOGUE)  # ids are unique
    for doc in CATALOGUE:
        channel = channels[channel_id(doc.pattern)]
        assert channel["address"] == doc.pattern
        named = set(re.findall(r"\{([a-z_]+)\}", doc.pattern))
        assert set(channel.get("parameters", {})) == named
        assert document["operations"][channel_id(doc.pattern)]["channel"] == {
            "$ref": f"#/channels/{channel_id(doc.pattern)}"
        }


def test_every_registered_event_version_travels_on_some_channel(document: dict[str, Any]) -> None:
    on_channels = {
        ref.rsplit("/", 1)[-1]
        for channel in document["channels"].values()
        for ref in refs(channel.get("messages", {}))
    }
    registered = {f"{s.event_type}.v{s.version}" for s in REGISTRY.specs()}
    assert registered - on_channels == set(), "add them to bus.subjects.CATALOGUE"
    assert set(document["components"]["messages"]) == registered


def test_every_reference_resolves_inside_the_document(document: dict[str, Any]) -> None:
    found = refs(document)
    assert len(found) > 100
    for ref in found:
        assert resolve(document, ref) is not None, ref
    reading = document["components"]["schemas"]["edgebus.device.reading.v1"]
    assert reading["properties"]["data"]["$ref"].startswith(
        "#/components/schemas/edgebus.device.reading.v1/$defs/"
    )


def test_a_catalogue_naming_an_unknown_event_type_is_refused() -> None:
    bad = (SubjectDoc("x.{site}", "nowhere", "typo", ("edgebus.no.such",)),)
    with pytest.raises(KeyError):
        asyncapi_document(REGISTRY, version="0", catalogue=bad)


def test_the_command_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    result = subprocess.run(
        [str(EDGEBUS), "schemas", "asyncapi", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["channels"]["up_site_kind_all"]["address"] == "up.{site}.{kind}.>"
