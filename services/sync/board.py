"""`StatusBoard`: the sync state of every (site, kind), kept current one site at a time.

Counts by state are maintained as states change, so fleet totals cost nothing to read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from schemas.sync import SyncState
from services.sync.status import SEVERITY, worst


class StatusBoard:
    def __init__(self) -> None:
        self._kinds: dict[str, dict[str, SyncState]] = {}
        self._site: dict[str, SyncState] = {}
        self.site_counts: Counter[SyncState] = Counter()

    def update(self, site: str, states: Mapping[str, SyncState]) -> None:
        """Replace one site's states (all its kinds)."""
        self._kinds[site] = dict(states)
        before = self._site.get(site)
        after = worst(states.values())
        if before != after:
            if before is not None:
                self.site_counts[before] -= 1
            self.site_counts[after] += 1
            self._site[site] = after

    def forget(self, site: str) -> None:
        self._kinds.pop(site, None)
        before = self._site.pop(site, None)
        if before is not None:
            self.site_counts[before] -= 1

    def site_state(self, site: str) -> SyncState | None:
        return self._site.get(site)

    def totals(self) -> dict[str, int]:
        return {state.value: self.site_counts[state] for state in SyncState}

    def worst_first(self, limit: int, sites: Iterable[str] | None = None) -> list[str]:
        """Up to `limit` sites, the worst states first (then by id)."""
        chosen = (
            self._site if sites is None else {s: self._site[s] for s in sites if s in self._site}
        )
        ranked = sorted(chosen.items(), key=lambda item: (SEVERITY[item[1]], item[0]))
        return [site for site, _ in ranked[:limit]]

    def __len__(self) -> int:
        return len(self._site)
