"""Partitioned alarm leaders: the lease plan and the site hash as plain functions; on real
servers, the stream transform agreeing with our hash, and two replicas sharing two partitions:
each applies its sites, either answers for all, a dead one's share is taken over, a returning
one gets a share back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from bus import subjects
from bus.client import MSG_ID_HEADER
from bus.partitions import (
    fnv1a_32,
    partition_filter,
    partition_transform,
    site_partition,
    transform_partitions,
)
from bus.streams import ensure_stream, stream_transform, uplink_stream
from schemas import REGISTRY
from schemas.alarms import AlarmAck, AlarmAckReply, AlarmRaised, Severity, alarm_id
from services.alarms.partitions import Partition, fair_share, plan_leases
from services.alarms.service import PartitioningMismatch, ensure_partitioned
from services.alarms.storm import StormPolicy
from tests.siterig import wait_until
from tests.test_alarms_service import Center, Replica, center, cleared, raised, run_cli

__all__ = ["center"]  # the fixture, shared with the alarms service's tests

pytestmark = pytest.mark.timeout(90)

# -- plain functions ----------------------------------------------------------------------


def test_fnv1a_is_the_reference_function() -> None:
    # Published FNV-1a 32-bit test vectors.
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def test_transform_round_trip_and_refusals() -> None:
    assert transform_partitions("alarm", None) == 1
    assert transform_partitions("alarm", partition_transform("alarm", 4)) == 4
    with pytest.raises(ValueError):
        transform_partitions("alarm", ("up.*.alarm.>", "up.{{wildcard(1)}}.alarm.>"))
    with pytest.raises(ValueError):
        transform_partitions("log", partition_transform("alarm", 2))
    with pytest.raises(ValueError):
        partition_transform("alarm", 1)
    assert partition_filter("alarm", 3) == "up.*.alarm.3.>"


def test_a_partition_owns_its_sites_and_partition_zero_the_siteless() -> None:
    sites = [f"s{n}" for n in range(200)]
    parts = [Partition(k, 3) for k in range(3)]
    for site in sites:
        assert [p.owns(site) for p in parts].count(True) == 1
    assert {site_partition(s, 3) for s in sites} == {0, 1, 2}
    assert [p.owns(None) for p in parts] == [True, False, False]
    assert Partition().owns("anything") and Partition().owns(None)


def test_fleet_notice_limits_are_shared_between_partitions() -> None:
    policy = StormPolicy(fleet_rate_per_s=200.0, fleet_burst=1000)
    assert Partition(1, 4).storm_policy(policy).fleet_rate_per_s == 50.0
    assert Partition(1, 4).storm_policy(policy).fleet_burst == 250
    assert Partition(0, 1).storm_policy(policy) is policy


def test_fair_share() -> None:
    assert [fair_share(4, r) for r in (0, 1, 2, 3, 4, 5)] == [4, 4, 2, 2, 1, 1]
    assert fair_share(1, 3) == 1  # one partition: every replica stands by for it


def test_lease_plan_spreads_gives_back_and_covers() -> None:
    # Alone: try everything, its preferred (all) first.
    alone = plan_leases(2, frozenset(), ["a"], "a")
    assert (alone.share, alone.release, alone.candidates) == (2, (), (0, 1))
    # Two replicas, two partitions: each prefers a different one.
    assert plan_leases(2, frozenset(), ["a", "b"], "a").candidates[0] == 0
    assert plan_leases(2, frozenset(), ["a", "b"], "b").candidates[0] == 1
    # A replica holding both when a second one appears gives up one, keeping its preferred.
    crowded = plan_leases(2, frozenset({0, 1}), ["a", "b"], "b")
    assert (crowded.release, crowded.candidates) == ((0,), ())
    # At its share: nothing to try.
    assert plan_leases(4, frozenset({1, 3}), ["a", "b"], "b").candidates == ()
    # Under its share: try all it does not hold, preferred first, then from its rank on.
    assert plan_leases(4, frozenset({1}), ["a", "b"], "b").candidates == (3, 2, 0)
    # It counts itself even before its presence key is seen.
    assert plan_leases(2, frozenset(), [], "a").share == 2


@pytest.mark.parametrize("partitions", [2, 3, 5, 8])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_lease_plans_cover_every_partition_without_double_holding(
    partitions: int, replicas: int
) -> None:
    """Ticks of replicas that agree on who lives, each taking free leases per its plan,
    settle with every partition held once and no replica above its fair share."""
    names = [f"r{n}" for n in range(replicas)]
    holder: dict[int, str] = {}
    for _ in range(partitions + 2):
        for name in names:
            held = frozenset(p for p, h in holder.items() if h == name)
            plan = plan_leases(partitions, held, names, name)
            for p in plan.release:
                del holder[p]
            count = len(held) - len(plan.release)
            for p in plan.candidates:
                if count >= plan.share:
                    break
                if p not in holder:
                    holder[p] = name
                    count += 1
    assert sorted(holder) == list(range(partitions))
    share = fair_share(partitions, replicas)
    assert all(list(holder.values()).count(n) <= share for n in names)


# -- real servers -----------------------------------------------------------------------------


async def test_the_servers_partitions_are_ours_and_other_declarers_keep_them(
    center: Center,
) -> None:
    js = center.bus.js  # the fixture declared UP_ALARM unpartitioned, as a controller does
    # Unpartitioned and holding messages (sites forwarded before the alarms service came):
    # they were stored without partitions, so partitioning now is refused.
    await js.publish(subjects.up("early", "alarm", "pump"), b"{}")
    with pytest.raises(PartitioningMismatch, match="partitioned 1 way"):
        await ensure_partitioned(js, 2)
    await ensure_partitioned(js, 1)
    await js.purge_stream("UP_ALARM")
    await ensure_partitioned(js, 3)
    # Set, the count is fixed even while the stream is empty: a replica configured otherwise
    # must not pull the transform from under the others' filters.
    for other in (1, 2):
        with pytest.raises(PartitioningMismatch, match="partitioned 3 way"):
            await ensure_partitioned(js, other)
    # Another service declaring the stream (without a transform) must not undo it.
    info = await ensure_stream(js, uplink_stream("alarm"))
    assert transform_partitions("alarm", stream_transform(info)) == 3
    sites = [f"site-{n}" for n in range(300)] + ["a_b-C", "Z"]
    for site in sites:
        await js.publish(subjects.up(site, "alarm", "pump"), b"{}")
    stored = (await js.stream_info("UP_ALARM", subjects_filter=">")).state.subjects or {}
    assert set(stored) == {f"up.{s}.alarm.{site_partition(s, 3)}.pump" for s in sites}

    # Holding messages, its partitioning is fixed: another count is refused, the same is not.
    with pytest.raises(PartitioningMismatch, match="partitioned 3 way"):
        await ensure_partitioned(js, 2)
    with pytest.raises(PartitioningMismatch):
        await ensure_partitioned(js, 1)
    await ensure_partitioned(js, 3)


async def start_pair(center: Center) -> tuple[Replica, Replica]:
    first = await center.start_replica("a1", partitions=2)
    second = await center.start_replica("a2", partitions=2)

    def split() -> bool:
        return first.service.led in ([0], [1]) and second.service.led in ([0], [1])

    await wait_until(split, 20, lambda: f"{first.service.led} {second.service.led}")
    assert first.service.led != second.service.led
    return first, second


async def wait_settled(replicas: list[Replica], consumed: int) -> None:
    """Until the replicas' processors consumed `consumed` changes in all and stored them."""

    def done() -> bool:
        total = sum(r.service.counters().get("consumed", 0) for r in replicas)
        processors = [p for r in replicas for p in r.service.processors.values()]
        return total >= consumed and all(p.settled for p in processors)

    await wait_until(
        done, 30, lambda: f"consumed {[r.service.counters() for r in replicas]}, want {consumed}"
    )


def alarm(site: str, entity: str, at: datetime) -> AlarmRaised:
    return raised(site, entity, "hot", at, severity=Severity.MINOR)


async def test_two_replicas_share_two_partitions_and_either_answers_for_all(
    center: Center,
) -> None:
    first, second = await start_pair(center)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    sites = [f"s{n}" for n in range(24)]
    assert {site_partition(s, 2) for s in sites} == {0, 1}
    for n, site in enumerate(sites):
        await center.send(site, alarm(site, "pump", t0 + timedelta(seconds=n)), key="pump")
    await center.send("s0", cleared("s0", "pump", "hot", t0 + timedelta(minutes=1)), key="pump")
    # A center-raised alarm (CENTER_ALARMS, read by both partitions): applied by its site's.
    center_raised = alarm("s1", "link", t0)
    event = center.bus.event(center_raised, subject=center_raised.alarm_id)
    await center.bus.js.publish(
        subjects.center_alarm("s1"), REGISTRY.encode(event), headers={MSG_ID_HEADER: event.id}
    )
    # A change without a key escapes the partition transform: dead-lettered, once.
    await center.bus.js.publish(subjects.up("s2", "alarm"), REGISTRY.encode(event))
    await wait_settled([first, second], len(sites) + 1 + 1 + 1)

    # Each leader applied its own sites' changes only (the other's it skipped).
    for replica in (first, second):
        [processor] = replica.service.processors.values()
        part = processor.partition
        assert processor.table and all(part.owns(e.site) for e in processor.table.values())
    tables = [next(iter(r.service.processors.values())).table for r in (first, second)]
    assert sorted([*tables[0], *tables[1]]) == sorted(
        [alarm_id(s, "pump", "hot") for s in sites] + [alarm_id("s1", "link", "hot")]
    )

    # Whichever replica answers sees every partition's records.
    for _ in range(6):
        records = {a.alarm_id: a for a in await center.alarms(include_cleared=True)}
        assert len(records) == len(sites) + 1
        assert not records[alarm_id("s0", "pump", "hot")].open
    # An acknowledgement reaches the leader of its alarm's partition, in either partition.
    for part in (0, 1):
        site = next(s for s in sites[1:] if site_partition(s, 2) == part)
        reply: AlarmAckReply = await center.ask(
            "ack", AlarmAck(alarm_id=alarm_id(site, "pump", "hot"), by="ann"), AlarmAckReply
        )
        assert reply.accepted and reply.applied, reply

    letters = await center.bus.js.stream_info("DEADLETTER", subjects_filter=">")
    reasons = [s.rsplit(".", 1)[-1] for s in letters.state.subjects or {}]
    assert reasons == ["unpartitioned_subject"], letters.state.subjects

    # Operators see which replica leads which partition.
    code, out, err = await run_cli(center.url, "alarms", "replicas", "--json")
    assert code == 0, err
    led = {r["replica"]: r["partitions"] for r in json.loads(out)}
    assert led == {"a1": first.service.led, "a2": second.service.led}, out
    code, out, err = await run_cli(center.url, "alarms", "replicas")
    assert code == 0 and "2 alarms replica(s)" in out and "p0" in out and "p1" in out, out


async def test_a_dead_replicas_partition_is_taken_over_and_given_back_on_return(
    center: Center,
) -> None:
    first, second = await start_pair(center)
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    sites = [f"s{n}" for n in range(16)]
    for n, site in enumerate(sites):
        await center.send(site, alarm(site, "pump", t0 + timedelta(seconds=n)), key="pump")
    await wait_settled([first, second], len(sites))

    # The second dies: its connection is gone, nothing released (its lease and presence lapse).
    orphan = second.service.led[0]
    await second.bus.nc.close()
    second.stop.set()
    await asyncio.wait_for(second.task, 20)
    center.replicas.remove(second)
    await wait_until(lambda: first.service.led == [0, 1], 20, lambda: f"{first.service.led}")
    # The survivor applies the orphaned partition's new changes, on top of the stored table.
    site = next(s for s in sites if site_partition(s, 2) == orphan)
    await center.send(site, cleared(site, "pump", "hot", t0 + timedelta(minutes=1)), key="pump")

    async def cleared_now() -> bool:
        records = {a.alarm_id: a for a in await center.alarms(include_cleared=True)}
        return len(records) == len(sites) and not records[alarm_id(site, "pump", "hot")].open

    await wait_until(cleared_now, 20, "the survivor applied the orphaned partition's change")

    # A replica joins again: the survivor gives one partition back.
    third = await center.start_replica("a3", partitions=2)
    await wait_until(
        lambda: len(first.service.led) == 1 and len(third.service.led) == 1,
        20,
        lambda: f"{first.service.led} {third.service.led}",
    )
    assert first.service.led != third.service.led
    other = next(s for s in sites if site_partition(s, 2) == third.service.led[0])
    await center.send(other, cleared(other, "pump", "hot", t0 + timedelta(minutes=2)), key="pump")

    async def both_cleared() -> bool:
        records = {a.alarm_id: a for a in await center.alarms(include_cleared=True)}
        return not records[alarm_id(other, "pump", "hot")].open and all(
            records[alarm_id(s, "pump", "hot")].open for s in sites if s not in (site, other)
        )

    await wait_until(both_cleared, 20, "the returning replica applies its partition's change")


def test_partitions_config_is_checked() -> None:
    from services.alarms.config import AlarmsConfig

    with pytest.raises(ValueError):
        AlarmsConfig(partitions=0)
    assert dataclasses.replace(AlarmsConfig(), partitions=3).partitions == 3


async def test_replicas_command_says_when_no_replica_answers(center: Center) -> None:
    code, out, err = await run_cli(center.url, "alarms", "replicas", "--wait", "0.3")
    assert code == 1 and "no alarms replica answered" in err, (out, err)
    assert "0 alarms replica(s)" in out
