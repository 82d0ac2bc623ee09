"""Which alarm partitions a replica leads: each replica takes its fair share of the partition
leases, given the replicas alive (`plan_leases`, plain data), and announces itself (`Presence`).

Alarm changes are partitioned by site (`bus.partitions`): one leader per partition consumes
and writes that partition's sites, so several leaders use several cores. Every replica that
lives counts itself on the lease bucket (a key per replica, expiring with the lease TTL): with
R replicas alive a replica holds at most ceil(P / R) leases. Shares add up to at least P, so
every partition finds a leader once the replicas agree on R (within a lease TTL of a change).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from bus.partitions import site_partition
from services.alarms.storm import StormPolicy

PRESENCE_PREFIX = "replica."


@dataclass(frozen=True)
class Partition:
    """Partition `index` of `count`: the sites whose changes its leader applies."""

    index: int = 0
    count: int = 1

    def owns(self, site: str | None) -> bool:
        """Whether this partition applies (or dead-letters) a change about `site`; a change
        naming no site is partition 0's, so that it is dead-lettered once."""
        if self.count == 1:
            return True
        if site is None:
            return self.index == 0
        return site_partition(site, self.count) == self.index

    def storm_policy(self, policy: StormPolicy) -> StormPolicy:
        """The fleet-wide notice limits are shared: each partition's leader gets its part."""
        if self.count == 1:
            return policy
        return dataclasses.replace(
            policy,
            fleet_rate_per_s=policy.fleet_rate_per_s / self.count,
            fleet_burst=max(1, policy.fleet_burst // self.count),
        )


@dataclass(frozen=True)
class LeasePlan:
    """`release` these held leases now; then try `candidates`, in order, until `share` held."""

    share: int
    release: tuple[int, ...]
    candidates: tuple[int, ...]


def fair_share(partitions: int, replicas: int) -> int:
    return -(-partitions // max(replicas, 1))


def plan_leases(partitions: int, held: frozenset[int], replicas: list[str], me: str) -> LeasePlan:
    """What replica `me` does with its leases, `replicas` being those alive (with or without
    `me`). Its preferred partitions are those p with p % R == its rank among the sorted
    replicas: with R dividing P, every replica prefers a different share, and the first tick
    after a start settles without contention. It keeps preferred ones first when it must give
    some up, and tries them first when it has room."""
    alive = sorted({*replicas, me})
    count, rank = len(alive), alive.index(me)
    share = fair_share(partitions, count)
    order = sorted(range(partitions), key=lambda p: (p % count != rank, (p - rank) % partitions))
    keep = [p for p in order if p in held][:share]
    release = tuple(sorted(held - set(keep)))
    candidates = tuple(p for p in order if p not in held) if len(keep) < share else ()
    return LeasePlan(share=share, release=release, candidates=candidates)


class Presence:
    """This replica's key on the lease bucket, and the replicas whose keys are there."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, replica_id: str) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}.{PRESENCE_PREFIX}"
        self._key = PRESENCE_PREFIX + replica_id
        self.replica_id = replica_id

    async def announce(self) -> None:
        """Call every tick: the bucket's TTL (the lease TTL) forgets a replica that stops."""
        await self._kv.put(self._key, b"")

    async def alive(self) -> list[str]:
        """The replicas announced within a TTL: one stream request (the stream's subjects),
        where listing the keys would take a watcher."""
        info = await self._js.stream_info(self._stream, subjects_filter=self._prefix + ">")
        return [subject[len(self._prefix) :] for subject in info.state.subjects or {}]

    async def withdraw(self) -> None:
        """A clean stop: the others count one replica fewer at once, not a TTL later (purged,
        not deleted: a delete marker would still be a subject of the stream)."""
        with contextlib.suppress(Exception):
            await self._js.purge_stream(self._stream, subject=self._prefix + self.replica_id)
