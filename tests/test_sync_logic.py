"""Config sync decisions as plain functions: merging, targeting, previews, status, CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.config import AgentConfig
from edge_agent.runtime import EdgeAgent
from edgebus.config_cli import ConfigCommandError, parse_assignments, target_from
from schemas.sync import (
    AppliedKind,
    ApplyState,
    Scope,
    StoredLayer,
    SyncState,
    Target,
    config_digest,
    config_kinds,
)
from services.sync.board import StatusBoard
from services.sync.desired import DesiredConfig
from services.sync.layers import (
    ConfigRefused,
    Layer,
    Member,
    applies_to,
    diff,
    effective,
    layer_key,
    layers_for,
)
from services.sync.status import should_push, sync_state, worst

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(default=10, ge=1, le=1000)
    level: str = "info"
    burst: int = Field(default=5, ge=1)


ALL = Target(scope=Scope.ALL)
GROUP_A = Target(scope=Scope.GROUP, name="a")
S1 = Target(scope=Scope.SITE, name="s1")
ZONE_X = Target(scope=Scope.LABELS, labels={"zone": "x"})
MEMBERS = [
    Member("s1", "a", {"zone": "x"}),
    Member("s2", "a", {}),
    Member("s3", "b", {"zone": "x"}),
    Member("s4", "b", {}),
]


def layer(target: Target, rev: int, **values: Any) -> Layer:
    return Layer("limits", target, values, rev)


def desired_with(*layers: tuple[Target, int, dict[str, Any]]) -> DesiredConfig:
    desired = DesiredConfig({"limits": Limits})
    for target, rev, values in layers:
        stored = StoredLayer(kind="limits", target=target, values=values, updated_at=NOW)
        desired.put(layer_key("limits", target), stored, rev)
    return desired


# -- merging and targeting ------------------------------------------------------------------


def test_layers_merge_all_then_group_then_labels_then_site_key_by_key() -> None:
    layers = [
        layer(S1, 2, size=300),
        layer(ALL, 5, size=100, level="warning"),
        layer(ZONE_X, 7, burst=9),
        layer(GROUP_A, 3, size=200),
    ]
    s1, s2, s3, s4 = (layers_for(m, layers) for m in MEMBERS)
    assert [x.target.scope for x in s1] == ["all", "group", "labels", "site"]
    got = {
        m.site: effective("limits", Limits, ls).config
        for m, ls in zip(MEMBERS, (s1, s2, s3, s4), strict=True)
    }
    assert got["s1"] == {"size": 300, "level": "warning", "burst": 9}
    assert got["s2"] == {"size": 200, "level": "warning", "burst": 5}
    assert got["s3"] == {"size": 100, "level": "warning", "burst": 9}
    assert got["s4"] == {"size": 100, "level": "warning", "burst": 5}
    # The revision is the highest merged: a site layer older than the global change still
    # yields the global change's revision.
    assert effective("limits", Limits, s1).rev == 7
    assert effective("limits", Limits, s4).rev == 5


def test_no_layers_means_the_defaults_at_revision_zero() -> None:
    result = effective("limits", Limits, [])
    assert result.config == {"size": 10, "level": "info", "burst": 5}
    assert result.rev == 0


def test_targets() -> None:
    s1, s2, s3, _ = MEMBERS
    assert applies_to(ALL, s2)
    assert applies_to(GROUP_A, s1) and not applies_to(GROUP_A, s3)
    assert applies_to(S1, s1) and not applies_to(S1, s2)
    assert applies_to(ZONE_X, s3) and not applies_to(ZONE_X, s2)
    two = Target(scope=Scope.LABELS, labels={"zone": "x", "tier": "1"})
    assert not applies_to(two, s1)


def test_layer_keys_are_distinct_per_target() -> None:
    keys = {layer_key("limits", t) for t in (ALL, GROUP_A, S1, ZONE_X)}
    assert keys == {"limits.all", "limits.group.a", "limits.site.s1", "limits.labels.zone_x"}


@pytest.mark.parametrize(
    "bad",
    [
        {"scope": "group"},
        {"scope": "site", "name": "s1", "labels": {"a": "b"}},
        {"scope": "all", "name": "x"},
        {"scope": "labels"},
        {"scope": "group", "name": "has.dot"},
    ],
)
def test_malformed_targets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Target.model_validate(bad)


def test_digest_is_canonical() -> None:
    assert config_digest("k", {"a": 1, "b": [1, 2]}) == config_digest("k", {"b": [1, 2], "a": 1})
    assert config_digest("k", {"a": 1}) != config_digest("j", {"a": 1})
    assert config_digest("k", {"a": 1}) != config_digest("k", {"a": 2})


def test_diff_is_key_by_key() -> None:
    changes = diff({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4})
    assert [(c.key, c.before, c.after) for c in changes] == [
        ("b", 2, 5),
        ("c", 3, None),
        ("d", None, 4),
    ]


# -- previews and refusals --------------------------------------------------------------------


def test_preview_lists_only_targeted_sites_whose_config_changes() -> None:
    desired = desired_with((ALL, 1, {"size": 100}), (S1, 2, {"size": 300}))
    preview = desired.preview("limits", ALL, {"size": 150}, [], MEMBERS)
    assert preview.targeted == 4
    # s1 keeps its own size=300: the global change does not change it.
    assert sorted(m.site for m, _, _ in preview.changed) == ["s2", "s3", "s4"]
    [s2] = [d for d in preview.diffs(10) if d.site == "s2"]
    assert [(c.key, c.before, c.after) for c in s2.changes] == [("size", 100, 150)]

    group = desired.preview("limits", GROUP_A, {"level": "debug"}, [], MEMBERS)
    assert (group.targeted, sorted(m.site for m, _, _ in group.changed)) == (2, ["s1", "s2"])
    assert len(desired.preview("limits", GROUP_A, {}, [], MEMBERS).changed) == 0


def test_unset_falls_back_to_the_next_layer_down() -> None:
    desired = desired_with((ALL, 1, {"size": 100}), (S1, 2, {"size": 300}))
    preview = desired.preview("limits", S1, {}, ["size"], MEMBERS)
    assert preview.values == {}
    [(member, before, after)] = preview.changed
    assert (member.site, before.config["size"], after.config["size"]) == ("s1", 300, 100)


@pytest.mark.parametrize(
    ("kind", "values", "unset", "code"),
    [
        ("nope", {"size": 1}, [], "unknown_kind"),
        ("limits", {"sise": 1}, [], "unknown_key"),
        ("limits", {}, ["sise"], "unknown_key"),
        ("limits", {"size": 0}, [], "invalid_value"),
        ("limits", {"size": "big"}, [], "invalid_value"),
    ],
)
def test_invalid_changes_are_refused_with_a_reason(
    kind: str, values: dict[str, Any], unset: list[str], code: str
) -> None:
    desired = desired_with()
    with pytest.raises(ConfigRefused) as refused:
        desired.preview(kind, ALL, values, unset, MEMBERS)
    assert refused.value.code == code
    assert str(refused.value)


def test_effective_configs_are_cached_by_the_layers_merged() -> None:
    desired = desired_with((ALL, 1, {"size": 100}))
    first = desired.for_site(MEMBERS[0], "limits")
    assert desired.for_site(MEMBERS[3], "limits") is first  # same layers, same object
    desired.put("limits.all", None, 9)  # deleted
    assert desired.for_site(MEMBERS[0], "limits").config["size"] == 10


def test_the_agent_applies_every_config_kind_the_center_accepts(tmp_path: Path) -> None:
    """A kind the center accepts but no agent applies would be set, sent, and fail at
    every site (as `alarm_rules` and `log` once did)."""
    agent = EdgeAgent(AgentConfig(site="s1", nats_url="nats://127.0.0.1:4222", data_dir=tmp_path))
    applied = {applier.kind: applier.model for applier in agent.config_appliers()}
    assert applied == config_kinds()


def test_every_registered_kind_has_defaults_that_validate() -> None:
    kinds = config_kinds()
    assert {"ingest", "replay"} <= set(kinds)
    for kind, model in kinds.items():
        assert effective(kind, model, []).config == model().model_dump(mode="json")


# -- status and pushes ------------------------------------------------------------------------


def applied(digest: str, state: ApplyState = ApplyState.APPLIED, rev: int = 1) -> AppliedKind:
    return AppliedKind(kind="limits", state=state, rev=rev, digest=digest, at=NOW)


def test_sync_state() -> None:
    wanted = effective("limits", Limits, [layer(ALL, 4, size=100)])
    nothing = effective("limits", Limits, [])
    assert sync_state(wanted, None) == SyncState.UNKNOWN
    assert sync_state(nothing, None) == SyncState.IN_SYNC  # nothing desired, nothing to do
    assert sync_state(wanted, applied(wanted.digest)) == SyncState.IN_SYNC
    assert sync_state(wanted, applied("old")) == SyncState.OUT_OF_SYNC
    assert sync_state(wanted, applied(wanted.digest, ApplyState.FAILED)) == SyncState.FAILED
    assert sync_state(wanted, applied("old", ApplyState.FAILED)) == SyncState.OUT_OF_SYNC
    assert worst([SyncState.IN_SYNC, SyncState.FAILED, SyncState.UNKNOWN]) == SyncState.FAILED
    assert worst([SyncState.IN_SYNC, SyncState.UNKNOWN]) == SyncState.UNKNOWN


def test_should_push() -> None:
    assert should_push(SyncState.OUT_OF_SYNC, None, 100.0, 30.0)
    assert should_push(SyncState.UNKNOWN, 60.0, 100.0, 30.0)
    assert not should_push(SyncState.OUT_OF_SYNC, 80.0, 100.0, 30.0)  # may still be answered
    assert not should_push(SyncState.IN_SYNC, None, 100.0, 30.0)
    assert not should_push(SyncState.FAILED, None, 100.0, 30.0)  # would only fail again


# -- command-line input -------------------------------------------------------------------------


def test_assignments_are_json_when_they_parse() -> None:
    got = parse_assignments(["a=3", "b=warning", "c=[1, 2]", "d=true", "e=x=y", "f="])
    assert got == {"a": 3, "b": "warning", "c": [1, 2], "d": True, "e": "x=y", "f": ""}
    with pytest.raises(ConfigCommandError):
        parse_assignments(["novalue"])


def test_one_target_at_most() -> None:
    assert target_from(None, None, None) == ALL
    assert target_from("a", None, None) == GROUP_A
    assert target_from(None, "s1", None) == S1
    assert target_from(None, None, ["zone=x"]) == ZONE_X
    with pytest.raises(ConfigCommandError):
        target_from("a", "s1", None)
    with pytest.raises(ConfigCommandError):
        target_from(None, None, ["zone"])


def test_the_board_counts_sites_by_their_worst_kind() -> None:
    board = StatusBoard()
    board.update("s1", {"a": SyncState.IN_SYNC, "b": SyncState.FAILED})
    board.update("s2", {"a": SyncState.IN_SYNC, "b": SyncState.IN_SYNC})
    board.update("s3", {"a": SyncState.UNKNOWN, "b": SyncState.IN_SYNC})
    assert board.totals() == {"in-sync": 1, "out-of-sync": 0, "failed": 1, "unknown": 1}
    assert board.worst_first(2) == ["s1", "s3"]
    assert board.worst_first(5, ["s2", "s9"]) == ["s2"]
    board.update("s1", {"a": SyncState.IN_SYNC, "b": SyncState.IN_SYNC})
    board.forget("s3")
    assert board.totals() == {"in-sync": 2, "out-of-sync": 0, "failed": 0, "unknown": 0}
    assert len(board) == 2 and board.site_state("s3") is None
