"""Alarm storm at the center: alarms processed per second against a raw counting consumer.

    python -m bench.alarm_storm [--quick] [--sites N] [--events M] [--rounds R] [--partitions P]
                                [--profile F]

One run, one throwaway hub. N sites raise and clear alarms at a high rate: M alarm changes
(raise, clear, raise, ... on five alarms per site, plus one site flapping one alarm thousands
of times) are stored in the center's `UP_ALARM` stream exactly as the sites' forwarders
would leave them (CloudEvents, `Nats-Msg-Id` = event id). Then, per round:

- baseline: a raw nats-py reader of the same stream that only counts the messages (an
  ordered push consumer with a callback, the fastest plain reader we measured: about twice
  a pull consumer's `fetch(500)`): seconds until it has all M;
- ours: the alarms service as its own process (`python -m services.alarms`) consumes the
  same M from its own durable consumer, decodes and validates each, updates the alarm table
  (flapping detection, storm guard, live notices) and compare-and-sets the changed records
  into the `ALARMS` KV bucket; a message is acked only once its state is stored. Timed from
  the consumer's first delivery to its ack floor reaching the last message, read from the
  server (`consumer_info`) every 20 ms; the service's CPU over that window is reported.
  With `--partitions P` (P > 1), UP_ALARM is partitioned by site before the storm is stored
  and P replicas run, each its own process leading one partition (the bench prints which
  each led and how many changes it consumed); timed from the first partition's first
  delivery until every partition's consumer has acked its last message, CPU summed over the
  replicas. The server's CPU over each side's window is printed too: on two cores the
  replicas and the server share the machine.

History is kept by construction (raises and clears stay in `UP_ALARM`; flapping summaries go
to `ALARM_ACTIVITY`): the script checks after each round that the KV table holds one record
per alarm and that the flapping alarm is marked as such, and counts the KV writes the pass
made (the checkpoint's cost: writes per change). value = alarms processed / s;
baseline = raw counted / s; target ratio >= 0.5 (the issue's).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from bench.common import (
    BenchResult,
    ResourceSampler,
    bench_args,
    format_table,
    machine_info,
    median,
    nats_server,
    process_cpu_seconds,
    publish_all,
    rate,
)
from bus import subjects
from bus.client import MSG_ID_HEADER, Bus
from bus.config import NatsConfig
from bus.log import configure_logging
from bus.streams import ALARMS_KV, ensure_kv, uplink_stream
from schemas import REGISTRY, new_event
from schemas.alarms import (
    AlarmCleared,
    AlarmRaised,
    AlarmRecord,
    AlarmsStats,
    AlarmsStatsQuery,
    Severity,
    alarm_id,
)
from services.alarms.service import ensure_partitioned

BENCH = "alarm_storm"
TARGET_RATIO = 0.5
ALARMS_PER_SITE = 5
FLAPPER = "flapper"
STREAM = uplink_stream("alarm").name
SERVICE_CONSUMER = "alarms"  # services.alarms.processor.CONSUMER
POLL_S = 0.02


def storm_plan(sites: int, events: int) -> list[tuple[str, str, int]]:
    """(site, entity, turn) of each change, in order: every fifth from one flapping site,
    the rest round-robin over `sites` sites x five alarms; turn 0, 2, .. raise, 1, 3, .. clear."""
    plan: list[tuple[str, str, int]] = []
    spread = 0
    for n in range(events):
        if n % 5 == 0:
            plan.append((FLAPPER, "valve", n // 5))
            continue
        alarm = spread % (sites * ALARMS_PER_SITE)
        site, entity = f"s{alarm % sites:05d}", f"pump{alarm // sites}"
        plan.append((site, entity, spread // (sites * ALARMS_PER_SITE)))
        spread += 1
    return plan


def storm_events(plan: list[tuple[str, str, int]]) -> list[tuple[str, bytes, str]]:
    """(subject, encoded CloudEvent, event id) of each planned change, a millisecond apart."""
    t0 = datetime.now(UTC) - timedelta(milliseconds=len(plan))  # the newest is "now"
    out: list[tuple[str, bytes, str]] = []
    for n, (site, entity, turn) in enumerate(plan):
        at = t0 + timedelta(milliseconds=n)
        identity = alarm_id(site, entity, "overheat")
        data: AlarmRaised | AlarmCleared
        if turn % 2 == 0:
            data = AlarmRaised(
                alarm_id=identity,
                site=site,
                entity=entity,
                severity=Severity.MAJOR,
                probable_cause="overheat",
                text=f"{entity} too hot",
                raised_at=at,
            )
        else:
            data = AlarmCleared(
                alarm_id=identity,
                site=site,
                entity=entity,
                probable_cause="overheat",
                text="back to normal",
                cleared_at=at,
            )
        event = new_event(data, source=f"/sites/{site}", subject=identity, time=at)
        out.append((subjects.up(site, "alarm", entity), REGISTRY.encode(event), event.id))
    return out


async def load_stream(nc: NatsClient, events: list[tuple[str, bytes, str]]) -> float:
    """Store every event in UP_ALARM as forwarders do; seconds taken."""
    return await publish_all(
        nc, ((subject, data, {MSG_ID_HEADER: event_id}) for subject, data, event_id in events)
    )


async def raw_count(nc: NatsClient, total: int, server: psutil.Process) -> dict[str, float]:
    """Seconds for nats-py's fastest plain reader of a stream (an ordered push consumer with a
    callback; measured faster than pull `fetch`) to receive `total` messages, counting only;
    the CPU seconds this process spent meanwhile (it does nothing else then), and the
    server's."""
    js = nc.jetstream()
    done = asyncio.Event()
    counted = 0

    async def count(msg: Msg) -> None:
        nonlocal counted
        counted += 1
        if counted >= total:
            done.set()

    started, cpu_started = time.perf_counter(), time.process_time()
    server_started = process_cpu_seconds(server)
    sub = await js.subscribe(
        "up.*.alarm.>", stream=STREAM, cb=count, ordered_consumer=True, pending_msgs_limit=-1
    )
    try:
        await asyncio.wait_for(done.wait(), 300)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        server_cpu = process_cpu_seconds(server) - server_started
    finally:
        await sub.unsubscribe()
    return {"seconds": seconds, "cpu_seconds": cpu, "server_cores": server_cpu / seconds}


def start_service(
    url: str, profile: str | None, partitions: int, index: int
) -> subprocess.Popen[bytes]:
    """One alarms-service replica as its own process (under cProfile, writing `profile`, if
    given: the first replica's)."""
    profiler = ["-m", "cProfile", "-o", profile] if profile and index == 0 else []
    return subprocess.Popen(
        [sys.executable, *profiler, "-m", "services.alarms", "--nats", url,
         "--log-level", "warning", "--replica-id", f"bench-{index}",
         "--partitions", str(partitions),
         # The flapper must still count as flapping when the last round is checked.
         "--flap-quiet-s", "3600"],
    )  # fmt: skip


async def replica_stats(bus: Bus, replicas: int, timeout_s: float = 5.0) -> list[AlarmsStats]:
    """Every replica's answer to a stats request (each answers for itself)."""
    answers = await bus.request_all(
        subjects.alarms_control("stats"),
        AlarmsStatsQuery(),
        AlarmsStats,
        wait_s=timeout_s,
        expected=replicas,
    )
    return [answer.data for answer in answers]


def service_consumers(partitions: int) -> list[str]:
    """The durable consumers of UP_ALARM the leaders use (`services.alarms.processor`)."""
    if partitions == 1:
        return [SERVICE_CONSUMER]
    return [f"{SERVICE_CONSUMER}-p{k}" for k in range(partitions)]


async def service_pass(
    bus: Bus, url: str, server: psutil.Process, partitions: int, profile: str | None = None
) -> dict[str, Any]:
    """Run the service (one replica per partition) on the stored storm: seconds from the first
    delivery to every message acked, and the replicas' CPU seconds over that same window
    (their start-up is left out of both) and the server's; which partitions each replica led,
    and how many changes it consumed."""
    js = bus.js
    procs = [start_service(url, profile, partitions, k) for k in range(partitions)]
    services = [psutil.Process(proc.pid) for proc in procs]
    consumers = service_consumers(partitions)

    def cpu() -> float:
        return sum(process_cpu_seconds(service) for service in services)

    try:
        pids = {f"alarms-{k}": proc.pid for k, proc in enumerate(procs)}
        with ResourceSampler(pids) as usage:
            first_seen = None
            cpu_at_first = server_at_first = 0.0
            started: dict[int, float] = {}  # partition: when its first delivery was seen
            finished: dict[int, float] = {}  # partition: when it had acked its last message
            deadline = time.monotonic() + 300
            while True:
                for proc in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"an alarms replica exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the alarms service did not finish within 300 s")
                try:
                    infos = [await js.consumer_info(STREAM, name) for name in consumers]
                except Exception:  # not all created yet
                    await asyncio.sleep(POLL_S)
                    continue
                now = time.perf_counter()
                delivered = [i.delivered.stream_seq if i.delivered else 0 for i in infos]
                if first_seen is None and any(delivered):
                    first_seen, cpu_at_first = now, cpu()
                    server_at_first = process_cpu_seconds(server)
                for k, (seq, info) in enumerate(zip(delivered, infos, strict=True)):
                    if seq:
                        started.setdefault(k, now)
                        if not info.num_pending and not info.num_ack_pending:
                            finished.setdefault(k, now)
                if len(finished) == len(consumers):
                    cpu_window = cpu() - cpu_at_first
                    server_window = process_cpu_seconds(server) - server_at_first
                    break
                await asyncio.sleep(POLL_S)
        assert first_seen is not None
        seconds = now - first_seen
        stats = await replica_stats(bus, partitions)
        return {
            "seconds": seconds,
            "cpu_seconds": cpu_window,
            "cpu_cores": cpu_window / seconds,
            "server_cores": server_window / seconds,
            # From the first partition's first delivery to the last one's.
            "start_skew_s": max(started.values()) - min(started.values()),
            # Each partition's end, from the first delivery: a partition with a hot site
            # (the flapper) goes on alone after the others are done.
            "done_after_s": [round(finished[k] - first_seen, 2) for k in sorted(finished)],
            "rss_mb": max(u.rss_peak_mb for u in usage.usage.values()),
            "led": sorted(
                (s.replica, s.partitions, s.counters.get("consumed", 0)) for s in stats
            ),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        for name in consumers:
            await js.delete_consumer(STREAM, name)


async def check_state(bus: Bus, alarms: int, flaps: int) -> dict[str, Any]:
    """The KV table after a pass: one record per alarm; the flapper's record counts every one
    of its changes and shows it is flapping (or was: changes suppressed while it was)."""
    kv = await ensure_kv(bus.js, ALARMS_KV)
    keys = await kv.keys()
    flapper: AlarmRecord | None = None
    for key in keys:
        if key.startswith(f"{FLAPPER}."):
            entry = await kv.get(key)
            flapper = AlarmRecord.model_validate_json(entry.value or b"")
    stored = await bus.js.stream_info(f"KV_{ALARMS_KV.bucket}")
    return {
        "records": len(keys),
        "kv_writes": stored.state.last_seq,
        "alarms": alarms,
        "flapper_changes": flapper.transitions if flapper else 0,
        "flaps": flaps,
        "flapper_caught": bool(flapper and (flapper.flapping or flapper.suppressed > 0)),
    }


async def reset_state(bus: Bus) -> None:
    """Drop the alarm table so the next pass does the same work again. The bucket is
    deleted, not purged: a purged bucket keeps its sequence, and a new replica would wait
    for a mirror that can never reach it."""
    await bus.js.delete_stream(f"KV_{ALARMS_KV.bucket}")


async def run(
    sites: int,
    events: int,
    rounds: int,
    quick: bool,
    partitions: int = 1,
    profile: str | None = None,
) -> BenchResult:
    with nats_server(BENCH) as server:
        bus = await Bus.connect(NatsConfig.from_url(server.url, name="bench-center"))
        try:
            await ensure_partitioned(bus.js, partitions)
            plan = storm_plan(sites, events)
            alarms = len({(site, entity) for site, entity, _ in plan})
            flaps = sum(1 for site, _, _ in plan if site == FLAPPER)
            batch = storm_events(plan)
            load_s = await load_stream(bus.nc, batch)
            print(f"stored {events:,} alarm changes from {sites + 1:,} sites in {load_s:.1f} s")
            assert server.pid is not None
            server_process = psutil.Process(server.pid)
            raw_rates, raw_cpu, raw_server, ours, checks = [], [], [], [], []
            for _ in range(rounds):
                raw = await raw_count(bus.nc, events, server_process)
                raw_rates.append(rate(events, raw["seconds"]))
                raw_cpu.append(raw["cpu_seconds"])
                raw_server.append(raw["server_cores"])
                passed = await service_pass(
                    bus, server.url, server_process, partitions, profile
                )
                ours.append({**passed, "rate": rate(events, passed["seconds"])})
                checks.append(await check_state(bus, alarms, flaps))
                await reset_state(bus)
        finally:
            await bus.close()
    rows = [
        [n + 1, raw_rates[n], ours[n]["rate"], ours[n]["rate"] / raw_rates[n],
         raw_cpu[n] / events * 1e6, ours[n]["cpu_seconds"] / events * 1e6,
         ours[n]["cpu_cores"], raw_server[n], ours[n]["server_cores"],
         checks[n]["records"], checks[n]["kv_writes"],
         checks[n]["flapper_caught"]]
        for n in range(rounds)
    ]  # fmt: skip
    print(format_table(
        ["round", "raw msg/s", "alarms/s", "ratio", "raw CPU µs/msg", "service CPU µs/change",
         "service cores", "server cores (raw)", "server cores (ours)", "records", "KV writes",
         "flap caught"], rows
    ))  # fmt: skip
    for n, passed in enumerate(ours):
        print(
            f"round {n + 1}: (replica, partitions led, changes consumed):",
            passed["led"],
            f"partitions started within {passed['start_skew_s']:.2f} s,",
            f"done after {passed['done_after_s']} s",
        )
    bad = [
        c
        for c in checks
        if not c["flapper_caught"]
        or c["records"] != c["alarms"]
        or c["flapper_changes"] != c["flaps"]
    ]
    if bad:
        raise RuntimeError(f"alarm state wrong after a pass: {bad[0]}")
    value, baseline = median(o["rate"] for o in ours), median(raw_rates)
    return BenchResult(
        bench=BENCH,
        value=value,
        unit="alarm changes processed/s",
        baseline=baseline,
        target=TARGET_RATIO,
        extra={
            "sites": sites + 1,
            "events": events,
            "rounds": rounds,
            "partitions": partitions,
            # Each round's own pair (the VM's speed drifts between rounds); `ratio` above is
            # the median rate over the median baseline, as in every bench here.
            "round_ratios": [round(o["rate"] / r, 4) for o, r in zip(ours, raw_rates, strict=True)],
            "round_ratio_median": median(
                o["rate"] / r for o, r in zip(ours, raw_rates, strict=True)
            ),
            "quick": quick,
            "service_cpu_cores": median(o["cpu_cores"] for o in ours),
            # nats-server's CPU over each side's window: on a small machine the service's
            # replicas and the server share the cores.
            "server_cores_raw": median(raw_server),
            "server_cores_service": median(o["server_cores"] for o in ours),
            # CPU per message on each side: what the ratio is made of. The counting reader's
            # share moves most between machines (its work is nats-py's own Python).
            "raw_cpu_us_per_msg": median(c / events * 1e6 for c in raw_cpu),
            "service_cpu_us_per_change": median(o["cpu_seconds"] / events * 1e6 for o in ours),
            "service_rss_mb": max(o["rss_mb"] for o in ours),
            "records": checks[-1]["records"],
            "kv_writes_per_change": median(c["kv_writes"] for c in checks) / events,
            **machine_info(),
        },
    )


def main() -> None:
    def more(parser: Any) -> None:
        parser.add_argument("--sites", type=int, default=None)
        parser.add_argument("--events", type=int, default=None)
        parser.add_argument("--rounds", type=int, default=None)
        parser.add_argument(
            "--partitions",
            type=int,
            default=1,
            help="alarm partitions: one service replica (process) leading each",
        )
        parser.add_argument(
            "--profile", default=None, help="cProfile the service into this file (last round)"
        )

    args = bench_args(__doc__ or BENCH, add_arguments=more)
    configure_logging("warning")
    sites = args.sites or (200 if args.quick else 2000)
    events = args.events or (20_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 3)
    asyncio.run(run(sites, events, rounds, args.quick, args.partitions, args.profile)).emit()


if __name__ == "__main__":
    main()
