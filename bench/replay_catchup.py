"""Replay catch-up: a backlog of N device events built at a site with its center link cut, then
the link restored: time until the center has every one, exactly once.

    python -m bench.replay_catchup [--quick] [--n N] [--rounds R] [--publishers P]
                                   [--window W] [--no-peer]

N = 100,000 (10,000 with --quick). Per round, in this order:

- ours: an `EdgeTopology` site (leaf node of the hub through a cuttable `LinkProxy`) with
  `python -m edge_agent` running (default flags, as the site supervisor starts it). The link
  is cut (`cut_link`), P publisher processes (paho-mqtt, QoS 1) send the N readings to the
  site's MQTT listener, and the bench waits until all N are in the site's REPLAY stream.
  Then `restore_link`, and catch-up = restore -> JetStream's own timestamp of the N-th event
  stored in the hub's UP_READING. The stream is read back: exactly N events, every
  (device, seq) once and in per-device order, no event id twice. `reconnect_s` (restore ->
  first event stored) and `drain_s` (first -> last) split the catch-up.
- baseline: one process publishes N events of the byte size of ours (an encoded
  `Event[DeviceReading]` as ingest makes it) straight into the hub's UP_READING with
  `bus.jspublish.PipelinedPublisher` (the project's pipelined `publish_async`), `Nats-Msg-Id`
  per event like the forwarder, `--window` (1000) in flight, each window awaited before the
  next; time = first publish -> last PubAck.
- peer (unless --no-peer): the store-and-forward a user could set up instead: an edge
  mosquitto bridged to a center mosquitto ("dev/# out 1", cleansession false, persistence on
  at both ends, unbounded queues) through a `LinkProxy`, a center subscriber process
  (persistent session, QoS 1). The proxy is cut, the same publishers send the N readings to
  the edge mosquitto (all PUBACKed), the proxy is restored; catch-up = restore -> last new
  message at the subscriber; lost / duplicated / out of order from every (device, seq) it got.

value = N / ours' catch-up (events/s), baseline = N / raw publish time; target ratio >= 0.5,
zero loss, zero duplicates. Medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

from bench.common import (
    BenchResult,
    ResourceSampler,
    bench_args,
    cpu_us_per_item,
    format_table,
    machine_info,
    median,
    safe_ratio,
)
from bench.edge_rig import (
    SITE,
    CenterSubscriber,
    Delivery,
    ForwardingSiteRig,
    Publishers,
    bridged_mosquittos,
    check_delivery,
    connect,
    decode_readings,
    device_payload,
    probe_bridge,
    publisher_jobs,
    read_events,
    stored_time,
    stream_last_seq,
    stream_messages,
    wait_count,
)
from bus import subjects
from bus.streams import uplink_stream
from edge_agent.config import ReplayConfig

BENCH = "replay_catchup"
TARGET = 0.5
UP_STREAM = uplink_stream("reading").name
REPLAY_STREAM = "REPLAY"
FULL_N, FULL_ROUNDS = 100_000, 3
QUICK_N, QUICK_ROUNDS = 10_000, 2
PUBLISHERS, DEVICES_EACH = 4, 2
DEFAULT_WINDOW = 1000
IDLE_TIMEOUT_S = 30.0  # nothing new at the center for this long: the rest is lost
PUBLISH_TIMEOUT_S = 900.0


@dataclass
class Trial:
    path: str
    round: int
    n: int
    catchup_s: float = math.nan
    reconnect_s: float = math.nan  # restore -> first event at the center
    drain_s: float = math.nan  # first -> last event at the center
    outage_s: float = math.nan  # cut -> restore
    backlog_rate: float = math.nan  # events/s into the edge's store while cut
    delivery: Delivery | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)  # per event, over the catch-up
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.n / self.catchup_s if self.catchup_s > 0 else math.nan

    @property
    def drain_rate(self) -> float:
        return self.n / self.drain_s if self.drain_s > 0 else math.nan

    @property
    def lost(self) -> int:
        return self.delivery.lost if self.delivery is not None else self.n

    @property
    def duplicates(self) -> int:
        return self.delivery.duplicates if self.delivery is not None else 0


# -- baseline: raw pipelined JetStream publishing, in its own process ---------------------


def sample_event(tag: str) -> bytes:
    """An encoded reading event as ingest makes it, for a device id of this bench's shape."""
    from pydantic_core import from_json

    from schemas import REGISTRY, new_event
    from schemas.devices import DeviceReading

    device = f"{tag}-p0-d0"
    reading = DeviceReading(
        site=SITE, device=device, channel="temp", payload=from_json(device_payload(12_345))
    )
    event = new_event(reading, source=f"/sites/{SITE}", subject=f"{device}/temp")
    return REGISTRY.encode(event)


def baseline_process(url: str, n: int, window: int, payload: bytes, results: Any) -> None:
    async def main() -> dict[str, Any]:
        import nats

        from bus.jspublish import PipelinedPublisher
        from bus.replaylog import MSG_ID_HEADER
        from schemas.ids import new_event_id

        nc = await nats.connect(url, name="bench-raw-js", pending_size=64 * 1024 * 1024)
        publisher = PipelinedPublisher(nc)
        await publisher.start()
        subjects_ = [subjects.up("bench0", "reading", f"d{d}") for d in range(8)]
        ids = [new_event_id() for _ in range(n)]
        failed = 0
        cpu0, t0 = time.process_time(), time.time()
        for start in range(0, n, window):
            futures = [
                await publisher.publish(subjects_[i % 8], payload, {MSG_ID_HEADER: ids[i]})
                for i in range(start, min(n, start + window))
            ]
            results_ = await publisher.wait(futures, 10.0)
            failed += sum(1 for r in results_ if isinstance(r, BaseException))
        t1, cpu = time.time(), time.process_time() - cpu0
        await publisher.close()
        await nc.close()
        return {"t0": t0, "t1": t1, "failed": failed, "cpu_s": cpu}

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:
        results.put({"error": repr(exc)})
        raise


# -- the rig --------------------------------------------------------------------------------


class Rig(ForwardingSiteRig):
    up_stream = UP_STREAM

    def __init__(self, ctx: SpawnContext, base: Path, args: argparse.Namespace) -> None:
        super().__init__(ctx, base)
        self.args = args
        self.site_nc: Any = None
        self.site_js: Any = None
        self.peer: Any = None
        self.event_bytes = len(sample_event("ours1"))

    async def start(self) -> None:
        extra = ["--batch-size", str(self.args.batch_size)] if self.args.batch_size else []
        site = await self.start_site(agent_args=extra)
        self.site_nc = await connect(site.url, "bench-site")
        self.site_js = self.site_nc.jetstream()

    async def stop(self) -> None:
        if self.site_nc is not None:
            await self.site_nc.close()
        await self.stop_site()

    def jobs(self, host: str, port: int, tag: str) -> list[Any]:
        per_device = self.args.n // (self.args.publishers * DEVICES_EACH)
        return publisher_jobs(host, port, tag, self.args.publishers, DEVICES_EACH, per_device)

    # -- ours -------------------------------------------------------------------------

    async def ours(self, round_no: int) -> Trial:
        site = self.topology.site(SITE)
        jobs = self.jobs(site.mqtt_host, site.mqtt_port, f"ours{round_no}")
        pubs = Publishers(self.ctx, jobs)
        trial = Trial("ours", round_no, pubs.total)
        errors: list[str] = []
        replay_before = await stream_messages(self.site_js, REPLAY_STREAM)
        before_count = await stream_messages(self.hub_js, UP_STREAM)
        before_last = await stream_last_seq(self.hub_js, UP_STREAM)
        await asyncio.to_thread(pubs.start)
        cut_at = time.time()
        await asyncio.to_thread(self.topology.cut_link, SITE)
        pubs.go()
        run = await asyncio.to_thread(pubs.join, PUBLISH_TIMEOUT_S)
        errors += run.errors
        logged = await wait_count(
            self.site_js, REPLAY_STREAM, replay_before + trial.n, IDLE_TIMEOUT_S
        )
        trial.backlog_rate = trial.n / (time.time() - run.t_first)
        trial.extra["replay_backlog"] = logged - replay_before
        if logged - replay_before < trial.n:
            errors.append(f"only {logged - replay_before}/{trial.n} in REPLAY before restore")
        leaked = await stream_messages(self.hub_js, UP_STREAM) - before_count
        if leaked:
            errors.append(f"{leaked} events reached the center while the link was cut")
        pids = {"agent": self.agent.pid, "site_server": site.pid, "hub": self.topology.hub.pid,
                "link_proxy": os.getpid()}  # the LinkProxy thread runs in this process
        with ResourceSampler({k: v for k, v in pids.items() if v is not None}) as sampler:
            restored_at = time.time()
            trial.outage_s = restored_at - cut_at
            await asyncio.to_thread(self.topology.restore_link, SITE)
            trial.extra["link_up_s"] = time.time() - restored_at
            count = await wait_count(
                self.hub_js, UP_STREAM, before_count + trial.n, IDLE_TIMEOUT_S
            )
            last_at_count = await stream_last_seq(self.hub_js, UP_STREAM)
        trial.cpu_us = cpu_us_per_item(sampler, trial.n)
        # Anything extra (a duplicate) would land right behind the last one.
        await asyncio.sleep(0.5)
        last = await stream_last_seq(self.hub_js, UP_STREAM)
        if count >= before_count + trial.n:
            t_first = await stored_time(self.hub_js, UP_STREAM, before_last + 1)
            t_last = await stored_time(self.hub_js, UP_STREAM, last_at_count)
            trial.catchup_s = t_last - restored_at
            trial.reconnect_s = t_first - restored_at
            trial.drain_s = t_last - t_first
        raws = await read_events(self.hub_js, UP_STREAM, before_last + 1, last)
        trial.extra["stored_bytes_mean"] = sum(map(len, raws)) / len(raws) if raws else math.nan
        pairs, ids, bad = decode_readings(raws)
        trial.delivery = check_delivery(pairs, jobs, ids)
        if bad:
            errors.append(f"{bad} undecodable events")
        if not trial.delivery.exact:
            errors.append(f"delivery not exact: {trial.delivery.as_dict()}")
        trial.error = "; ".join(errors) or None
        return trial

    # -- baseline ---------------------------------------------------------------------

    async def baseline(self, round_no: int) -> Trial:
        trial = Trial("baseline", round_no, self.args.n)
        before = await stream_messages(self.hub_js, UP_STREAM)
        results: Any = self.ctx.Queue()
        payload = sample_event(f"ours{round_no}")
        proc = self.ctx.Process(
            target=baseline_process,
            args=(self.topology.hub.url, trial.n, self.args.window, payload, results),
            name="raw-js", daemon=True,
        )
        proc.start()
        hub_pid = self.topology.hub.pid
        assert hub_pid is not None
        try:
            with ResourceSampler({"hub": hub_pid}) as sampler:
                got: dict[str, Any] = await asyncio.to_thread(
                    results.get, True, PUBLISH_TIMEOUT_S
                )
        except queue.Empty:
            got = {"error": "no result"}
        # The publisher's own clock, from its first publish on (not its start-up imports).
        trial.cpu_us = {"publisher": 1e6 * got.get("cpu_s", math.nan) / trial.n,
                        **cpu_us_per_item(sampler, trial.n)}
        await asyncio.to_thread(proc.join, 15)
        if proc.is_alive():
            proc.kill()
        stored = await stream_messages(self.hub_js, UP_STREAM) - before
        trial.delivery = Delivery(expected=trial.n, received=stored, unique=stored)
        trial.extra["event_bytes"] = len(payload)
        if "error" in got:
            trial.error = got["error"]
            return trial
        trial.catchup_s = trial.drain_s = got["t1"] - got["t0"]
        if got["failed"] or stored != trial.n:
            trial.error = f"{got['failed']} failed publishes, {stored}/{trial.n} stored"
        return trial

    # -- peer -------------------------------------------------------------------------

    async def peer_trial(self, round_no: int) -> Trial:
        edge, proxy, center = self.peer
        tag = f"peer{round_no}"
        jobs = self.jobs(edge.host, edge.port, tag)
        pubs = Publishers(self.ctx, jobs)
        trial = Trial("peer", round_no, pubs.total)
        sub = CenterSubscriber(
            self.ctx, center.host, center.port, f"center-app-{round_no}", trial.n, f"{tag}-",
            IDLE_TIMEOUT_S,
        )
        await asyncio.to_thread(sub.start)
        await asyncio.to_thread(pubs.start)
        cut_at = time.time()
        await asyncio.to_thread(proxy.cut)
        pubs.go()
        run = await asyncio.to_thread(pubs.join, PUBLISH_TIMEOUT_S)
        trial.backlog_rate = run.rate
        pids = {"edge_mosquitto": edge.pid, "center_mosquitto": center.pid,
                "link_proxy": os.getpid()}
        with ResourceSampler({k: v for k, v in pids.items() if v is not None}) as sampler:
            restored_at = time.time()
            trial.outage_s = restored_at - cut_at
            proxy.restore()
            got = await asyncio.to_thread(sub.result, PUBLISH_TIMEOUT_S)
        trial.cpu_us = cpu_us_per_item(sampler, trial.n)
        trial.delivery = check_delivery(got.pairs, jobs)
        if trial.delivery.lost == 0:
            trial.catchup_s = got.t_last_new - restored_at
            trial.reconnect_s = got.t_first - restored_at
            trial.drain_s = got.t_last_new - got.t_first
        errors = run.errors + ([got.error] if got.error else [])
        trial.error = "; ".join(errors) or None
        return trial


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=None,
                        help=f"events per trial (default {FULL_N:,}, quick {QUICK_N:,})")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--publishers", type=int, default=PUBLISHERS)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help="baseline: JetStream publishes in flight")
    parser.add_argument("--no-peer", action="store_true", help="skip the mosquitto peer")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the agent's --batch-size (default: the agent's own, 500)")


def _say_trial(say: Callable[[str], None], t: Trial) -> None:
    say(f"  round {t.round}  {t.path:<8} catch-up {t.catchup_s:7.2f} s = {t.rate:>8,.0f} ev/s"
        f"  (reconnect {t.reconnect_s:5.2f} s, drain {t.drain_s:6.2f} s = "
        f"{t.drain_rate:>8,.0f} ev/s)  outage {t.outage_s:5.1f} s  lost {t.lost} "
        f"dup {t.duplicates}" + (f"  ERROR {t.error}" if t.error else ""))
    if t.cpu_us:
        say("           CPU µs/event: " + ", ".join(f"{k} {v:.0f}" for k, v in t.cpu_us.items()))


async def run(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list[Trial], int]:
    ctx = mp.get_context("spawn")
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="edgebus-replay-catchup-") as tmp:
        base = Path(tmp)
        rig = Rig(ctx, base, args)
        try:
            await rig.start()
            peers = (contextlib.nullcontext(None) if args.no_peer
                     else bridged_mosquittos(base / "peer"))
            with peers as peer:
                rig.peer = peer
                if peer is not None:
                    await asyncio.to_thread(probe_bridge, peer[0], peer[2])
                for round_no in range(1, args.rounds + 1):
                    paths = [rig.baseline, rig.ours] + ([] if args.no_peer else [rig.peer_trial])
                    for trial_fn in paths:
                        t = await trial_fn(round_no)
                        trials.append(t)
                        _say_trial(say, t)
        finally:
            await rig.stop()
    return trials, rig.event_bytes


def _sum(trials: list[Trial], attr: str) -> int | None:
    return sum(getattr(t, attr) for t in trials) if trials else None


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__.splitlines()[0] if __doc__ else BENCH, argv, _add_arguments)
    args.n = args.n or (QUICK_N if args.quick else FULL_N)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    per_device = args.n // (args.publishers * DEVICES_EACH)
    args.n = per_device * args.publishers * DEVICES_EACH
    say: Callable[[str], None] = (lambda _: None) if args.json_only else print
    load_before = os.getloadavg()
    started = time.perf_counter()
    say(f"{BENCH}: {args.n:,} events per trial ({args.publishers} publishers x {DEVICES_EACH} "
        f"devices x {per_device:,}), {args.rounds} round(s)"
        + (" [--quick: 10k events, not 100k]" if args.quick else ""))
    trials, event_bytes = asyncio.run(run(args, say))

    by_path: dict[str, list[Trial]] = {}
    for t in trials:
        by_path.setdefault(t.path, []).append(t)
    ours_t, base_t, peer_t = (by_path.get(p, []) for p in ("ours", "baseline", "peer"))
    ours, base = median(t.rate for t in ours_t), median(t.rate for t in base_t)
    peer = median(t.rate for t in peer_t)
    cpu_med = {
        p: {k: median(t.cpu_us.get(k, math.nan) for t in ts) for k in ts[0].cpu_us}
        for p, ts in by_path.items()
    }
    cpu_total = {p: sum(cpu.values()) for p, cpu in cpu_med.items()}
    # CPU-saturated, ours could reach at most this ratio: the baseline's CPU per event
    # (publisher + hub) over ours (agent + site server + hub + the link proxy).
    cpu_bound = safe_ratio(cpu_total.get("baseline", math.nan), cpu_total.get("ours", math.nan))
    say("")
    say(format_table(
        ["path", "catch-up s", "events/s", "vs baseline", "reconnect s", "drain ev/s", "lost",
         "dup", "out of order"],
        [[p, median(t.catchup_s for t in ts), median(t.rate for t in ts),
          safe_ratio(median(t.rate for t in ts), base), median(t.reconnect_s for t in ts),
          median(t.drain_rate for t in ts), sum(t.lost for t in ts),
          sum(t.duplicates for t in ts),
          sum(t.delivery.out_of_order if t.delivery else 0 for t in ts)]
         for p, ts in by_path.items()],
    ))
    for p, cpu in cpu_med.items():
        say(f"  {p:<8} CPU µs/event during catch-up: "
            + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + f"  = {cpu_total[p]:.0f}")
    say(f"\nours/baseline = {safe_ratio(ours, base):.3f} (target >= {TARGET}); drain only "
        f"{safe_ratio(median(t.drain_rate for t in ours_t), base):.3f}; CPU-bound ceiling "
        f"{cpu_bound:.3f}")
    BenchResult(
        bench=BENCH,
        value=ours,
        unit="events/s",
        baseline=base,
        target=TARGET,
        extra={
            "catchup_s": median(t.catchup_s for t in ours_t),
            "reconnect_s": median(t.reconnect_s for t in ours_t),
            "drain_s": median(t.drain_s for t in ours_t),
            "drain_rate": median(t.drain_rate for t in ours_t),
            "drain_vs_baseline": safe_ratio(median(t.drain_rate for t in ours_t), base),
            "lost": _sum(ours_t, "lost"),
            "duplicates": _sum(ours_t, "duplicates"),
            "out_of_order": sum(t.delivery.out_of_order if t.delivery else 0 for t in ours_t),
            "exact": all(t.delivery is not None and t.delivery.exact for t in ours_t),
            "outage_s": median(t.outage_s for t in ours_t),
            "backlog_rate": median(t.backlog_rate for t in ours_t),
            "baseline_s": median(t.catchup_s for t in base_t),
            "peer": peer,
            "peer_catchup_s": median(t.catchup_s for t in peer_t),
            "peer_reconnect_s": median(t.reconnect_s for t in peer_t),
            "peer_drain_rate": median(t.drain_rate for t in peer_t),
            "peer_backlog_rate": median(t.backlog_rate for t in peer_t),
            "peer_lost": _sum(peer_t, "lost"),
            "peer_duplicates": _sum(peer_t, "duplicates"),
            "peer_out_of_order": sum(t.delivery.out_of_order if t.delivery else 0
                                     for t in peer_t) if peer_t else None,
            "ours_vs_peer": safe_ratio(ours, peer),
            "per_round": {p: [t.rate for t in ts] for p, ts in by_path.items()},
            "cpu_us_per_event": cpu_med,
            "cpu_us_per_event_total": cpu_total,
            "cpu_bound_ratio": cpu_bound,
            "n": args.n,
            "rounds": args.rounds,
            "quick": bool(args.quick),
            "event_bytes": event_bytes,
            "stored_bytes_mean": median(t.extra.get("stored_bytes_mean", math.nan)
                                        for t in ours_t),
            "baseline_window": args.window,
            "baseline_api": "bus.jspublish.PipelinedPublisher, Nats-Msg-Id per event",
            "agent_batch_size": args.batch_size or ReplayConfig().batch_size,
            "errors": [f"{t.path} r{t.round}: {t.error}" for t in trials if t.error],
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "seconds": time.perf_counter() - started,
            **machine_info(),
        },
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
