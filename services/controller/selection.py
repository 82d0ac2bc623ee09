"""Which registry records an operator query selects: by id, group, availability and labels.

Pure; used by `sites list` and, later, by config targeting and rollouts.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from schemas.controller import SiteRecord, SitesQuery


def matches_labels(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Equality selector: every key in `selector` must be present with that value."""
    return all(labels.get(key) == value for key, value in selector.items())


def select(records: Iterable[SiteRecord], query: SitesQuery) -> list[SiteRecord]:
    chosen = [
        r
        for r in records
        if (query.site is None or r.site == query.site)
        and (query.group is None or r.group == query.group)
        and (query.availability is None or r.availability == query.availability)
        and matches_labels(r.labels, query.label_selector)
    ]
    return sorted(chosen, key=lambda r: r.site)


def page(
    chosen: list[SiteRecord], after: str | None, limit: int
) -> tuple[list[SiteRecord], str | None]:
    """One page of a `select` result after the site id `after`, and the cursor for the next."""
    start = 0 if after is None else bisect.bisect_right(chosen, after, key=lambda r: r.site)
    items = chosen[start : start + limit]
    more = start + limit < len(chosen)
    return items, (items[-1].site if more and items else None)
