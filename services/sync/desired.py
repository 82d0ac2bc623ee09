"""`DesiredConfig`: every layer of every kind, and each site's effective config from them.

Plain data in, plain data out (no bus): effective configs are cached by the layers merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from schemas.sync import SiteDiff, StoredLayer, Target
from services.sync.layers import (
    ConfigRefused,
    Effective,
    Layer,
    Member,
    applies_to,
    apply_change,
    check_values,
    diff,
    effective,
    layer_key,
    layers_for,
    replace_layer,
)

CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class Preview:
    """What a change would do: the layer after it, how many sites it targets, which change."""

    kind: str
    key: str
    values: dict[str, Any]
    targeted: int
    changed: list[tuple[Member, Effective, Effective]]  # (site, before, after)

    def diffs(self, limit: int) -> list[SiteDiff]:
        return [
            SiteDiff(site=member.site, changes=diff(before.config, after.config))
            for member, before, after in self.changed[:limit]
        ]


class DesiredConfig:
    """The center's desired state: layers by kind and key; effective config per site."""

    def __init__(self, kinds: Mapping[str, type[BaseModel]]) -> None:
        self.kinds = dict(kinds)
        self._layers: dict[str, dict[str, Layer]] = {kind: {} for kind in kinds}
        self._cache: dict[tuple[Any, ...], Effective] = {}

    def model(self, kind: str) -> type[BaseModel]:
        try:
            return self.kinds[kind]
        except KeyError:
            known = ", ".join(sorted(self.kinds))
            raise ConfigRefused(
                "unknown_kind", f"no config kind {kind!r} (kinds: {known})"
            ) from None

    # -- layers --------------------------------------------------------------------------

    def put(self, key: str, stored: StoredLayer | None, rev: int) -> None:
        """Take a layer from the bucket (None: deleted). Unknown kinds are ignored."""
        kind = key.split(".", 1)[0]
        if kind not in self._layers:
            return
        if stored is None:
            self._layers[kind].pop(key, None)
        else:
            self._layers[kind][key] = Layer(kind, stored.target, stored.values, rev)
        self._cache.clear()

    def layers(self, kind: str) -> list[Layer]:
        return list(self._layers[kind].values()) if kind in self._layers else []

    def layer(self, kind: str, target: Target) -> Layer | None:
        return self._layers.get(kind, {}).get(layer_key(kind, target))

    # -- effective config ----------------------------------------------------------------

    def for_site(self, member: Member, kind: str) -> Effective:
        return self._effective(kind, layers_for(member, self._layers[kind].values()))

    def all_for_site(self, member: Member) -> dict[str, Effective]:
        return {kind: self.for_site(member, kind) for kind in self.kinds}

    def _effective(self, kind: str, layers: list[Layer]) -> Effective:
        signature = (kind, *(layer.rev for layer in layers))
        found = self._cache.get(signature)
        if found is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            found = effective(kind, self.kinds[kind], layers)
            self._cache[signature] = found
        return found

    # -- changes -------------------------------------------------------------------------

    def preview(
        self,
        kind: str,
        target: Target,
        values: Mapping[str, Any],
        unset: Iterable[str],
        members: Iterable[Member],
    ) -> Preview:
        """Validate a change and work out which sites' effective config it changes.

        Raises ConfigRefused for an unknown kind or key, a bad value, or a change that
        leaves some targeted site with a config its kind's model rejects.
        """
        model = self.model(kind)
        unset = list(unset)
        unknown = sorted(set(unset) - set(model.model_fields))
        if unknown:
            raise ConfigRefused("unknown_key", f"{kind} has no key {', '.join(unknown)}")
        check_values(kind, model, values)
        key = layer_key(kind, target)
        current = self._layers[kind].get(key)
        new_values = apply_change(current.values if current else {}, values, unset)
        # A placeholder revision above every real one: it merges last among its scope.
        candidate = Layer(kind, target, new_values, rev=1 << 62)
        layers_after = replace_layer(self._layers[kind].values(), candidate, key)
        targeted = 0
        changed: list[tuple[Member, Effective, Effective]] = []
        # Only within this preview: the placeholder revision means another layer next time.
        merged: dict[tuple[int, ...], Effective] = {}
        for member in members:
            if not applies_to(target, member):
                continue
            targeted += 1
            before = self.for_site(member, kind)
            chosen = layers_for(member, layers_after)
            signature = tuple(layer.rev for layer in chosen)
            try:
                after = merged.get(signature) or effective(kind, model, chosen)
            except ValueError as exc:
                raise ConfigRefused(
                    "invalid_for_site", f"{kind} for site {member.site} would be invalid: {exc}"
                ) from None
            merged[signature] = after
            if after.digest != before.digest:
                changed.append((member, before, after))
        return Preview(kind, key, new_values, targeted, changed)
