"""`Reports`: what each site last said it applied, per kind (newest `at` wins per kind).

Fed live from `up.*.sync.report` and, after a restart, from the SYNC_REPORTS stream.
"""

from __future__ import annotations

from schemas.sync import AppliedKind, ConfigReport


class Reports:
    def __init__(self) -> None:
        self._by_site: dict[str, dict[str, AppliedKind]] = {}

    def take(self, report: ConfigReport) -> list[str]:
        """Merge a report; returns the kinds it changed (an older copy changes nothing)."""
        known = self._by_site.setdefault(report.site, {})
        changed = []
        for applied in report.kinds:
            current = known.get(applied.kind)
            if current is None or applied.at >= current.at:
                if current != applied:
                    changed.append(applied.kind)
                known[applied.kind] = applied
        return changed

    def get(self, site: str, kind: str) -> AppliedKind | None:
        return self._by_site.get(site, {}).get(kind)

    def forget(self, site: str) -> None:
        self._by_site.pop(site, None)

    def __len__(self) -> int:
        return len(self._by_site)
