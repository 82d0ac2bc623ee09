"""Partitions of a center stream of site events (`up.<site>.<kind>.<key>...`) by site: the
server's subject transform that writes the partition into each stored subject, and its hash.

nats-server's `{{partition(n, 1)}}` is FNV-1a (32 bit) of the site token, modulo n: computed
here too, so a reader of another stream (where no transform runs) can tell whose a site is.
A reader of partition k filters `up.*.<kind>.k.>`: one filter subject, the server's fast path.
"""

from __future__ import annotations

import functools

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_MASK = 0xFFFFFFFF


def fnv1a_32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h


@functools.lru_cache(maxsize=65_536)  # sites repeat
def site_partition(site: str, partitions: int) -> int:
    """The partition (0..partitions-1) the server's transform gives `site`'s subjects."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return fnv1a_32(site.encode()) % partitions


def partition_transform(kind: str, partitions: int) -> tuple[str, str]:
    """(source, destination) of the stream subject transform: `up.<site>.<kind>.<key>...` is
    stored as `up.<site>.<kind>.<partition>.<key>...`."""
    if partitions < 2:
        raise ValueError("a partition transform needs partitions >= 2")
    return (
        f"up.*.{kind}.>",
        f"up.{{{{wildcard(1)}}}}.{kind}.{{{{partition({partitions},1)}}}}.>",
    )


def transform_partitions(kind: str, transform: tuple[str, str] | None) -> int:
    """How many partitions a stream's transform makes (1: none); ValueError for a transform
    that is not `partition_transform(kind, n)`'s."""
    if transform is None:
        return 1
    source, destination = transform
    prefix = f"up.{{{{wildcard(1)}}}}.{kind}.{{{{partition("
    suffix = ",1)}}.>"
    if source == f"up.*.{kind}.>" and destination.startswith(prefix):
        count = destination[len(prefix) :].removesuffix(suffix)
        if destination.endswith(suffix) and count.isdigit() and int(count) >= 2:
            return int(count)
    raise ValueError(f"not a partition transform of {kind!r}: {source!r} -> {destination!r}")


def partition_filter(kind: str, partition: int) -> str:
    """What the reader of one partition filters (stored subjects, after the transform)."""
    return f"up.*.{kind}.{partition}.>"
