"""Layer merging, targeting, validation and diffs: pure functions over plain data.

A site's effective config of a kind = defaults <- all <- its group <- matching label layers
<- its own site layer, key by key; its revision is the highest revision merged in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.sync import KeyChange, Scope, Target, config_digest

_SCOPE_ORDER = {Scope.ALL: 0, Scope.GROUP: 1, Scope.LABELS: 2, Scope.SITE: 3}


class ConfigRefused(ValueError):
    """A change the center will not accept; `code` is machine-readable, the text says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Member:
    """What targeting needs to know about a site."""

    site: str
    group: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Layer:
    """One layer of one kind as stored: its target, the keys it sets, its revision."""

    kind: str
    target: Target
    values: Mapping[str, Any]
    rev: int


@dataclass(frozen=True)
class Effective:
    kind: str
    config: dict[str, Any]
    rev: int
    digest: str


def layer_key(kind: str, target: Target) -> str:
    """The KV key of a layer: `<kind>.all`, `<kind>.group.<g>`, `<kind>.site.<s>`,
    `<kind>.labels.<k>_<v>...` (label pairs sorted; tokens only)."""
    if target.scope == Scope.ALL:
        return f"{kind}.all"
    if target.scope == Scope.LABELS:
        pairs = ".".join(f"{k}_{v}" for k, v in sorted(target.labels.items()))
        return f"{kind}.labels.{pairs}"
    return f"{kind}.{target.scope}.{target.name}"


def applies_to(target: Target, member: Member) -> bool:
    if target.scope == Scope.ALL:
        return True
    if target.scope == Scope.GROUP:
        return target.name == member.group
    if target.scope == Scope.SITE:
        return target.name == member.site
    return all(member.labels.get(k) == v for k, v in target.labels.items())


def layers_for(member: Member, layers: Iterable[Layer]) -> list[Layer]:
    """The layers that apply to `member`, in merge order (label layers by revision)."""
    chosen = [layer for layer in layers if applies_to(layer.target, member)]
    return sorted(chosen, key=lambda layer: (_SCOPE_ORDER[layer.target.scope], layer.rev))


def merge(model: type[BaseModel], layers: Sequence[Layer]) -> dict[str, Any]:
    """Defaults, then each layer's keys in order; validated as a whole by the kind's model."""
    document: dict[str, Any] = {}
    for layer in layers:
        document.update(layer.values)
    return model.model_validate(document).model_dump(mode="json")


def effective(kind: str, model: type[BaseModel], layers: Sequence[Layer]) -> Effective:
    config = merge(model, layers)
    rev = max((layer.rev for layer in layers), default=0)
    return Effective(kind=kind, config=config, rev=rev, digest=config_digest(kind, config))


def check_values(kind: str, model: type[BaseModel], values: Mapping[str, Any]) -> None:
    """Refuse unknown keys and values the kind's model rejects (on their own, over defaults)."""
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        known = ", ".join(sorted(model.model_fields))
        raise ConfigRefused(
            "unknown_key", f"{kind} has no key {', '.join(unknown)} (keys: {known})"
        )
    try:
        model.model_validate(dict(values))
    except ValidationError as exc:
        raise ConfigRefused("invalid_value", f"{kind}: {_first_errors(exc)}") from None


def apply_change(
    current: Mapping[str, Any], values: Mapping[str, Any], unset: Iterable[str]
) -> dict[str, Any]:
    """The layer's keys after setting `values` and removing `unset`."""
    updated = {k: v for k, v in current.items() if k not in set(unset)}
    updated.update(values)
    return updated


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[KeyChange]:
    """Key by key, sorted: what changes from `before` to `after`."""
    keys = sorted(set(before) | set(after))
    return [
        KeyChange(key=k, before=before.get(k), after=after.get(k))
        for k in keys
        if before.get(k) != after.get(k)
    ]


def replace_layer(layers: Iterable[Layer], new: Layer, key: str) -> list[Layer]:
    """`layers` with the one stored under `key` replaced by `new` (or `new` added)."""
    kept = [layer for layer in layers if layer_key(layer.kind, layer.target) != key]
    return [*kept, new]


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "value"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
