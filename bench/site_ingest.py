"""Site ingest end to end: concurrent MQTT QoS 1 device publishers into one site, all the way to
the center's UP_READING stream, against the same publishers on a bare NATS MQTT listener.

    python -m bench.site_ingest [--quick] [--publishers P] [--devices D] [--per-device K]
                                [--rounds R] [--inflight W] [--no-peer]

P publisher processes (spawned, paho-mqtt, QoS 1, `W` PUBACKs outstanding each, paho's default
20) each publish K readings to each of their D devices, interleaved, payloads JSON with a
per-device `seq`. Per round, alternately (medians reported):

- baseline: the publishers to a bare site nats-server (JetStream on, MQTT listener, no
  agent, no stream, nothing downstream); rate = all PUBACKs received / (first publish ->
  last PUBACK), all publishers together.
- ours: the publishers to the site's MQTT listener of an `EdgeTopology` site (a leaf node of
  the hub, linked directly, no proxy) with `python -m edge_agent` running: INGEST -> agent
  (convert, REPLAY log, local fan-out captured by EVENTS) -> forwarder -> hub UP_READING.
  rate = N / (first publish -> JetStream's own timestamp of the last event stored in
  UP_READING). The stream is then read back: every (device, seq) exactly once, per device in
  order (decoded as `Event[DeviceReading]`), no event id twice.
- peer (unless --no-peer): the same publishers to an edge mosquitto bridged ("dev/# out 1",
  cleansession false, persistence on; direct, no proxy) to a center mosquitto, where a
  persistent QoS 1 subscriber process checks every (device, seq); rate = N / (first publish
  -> last new message at that subscriber).

value = ours, baseline = bare listener, target ratio >= 0.8, zero loss. CPU per message of
each process (user+sys) is reported so the figures can be explained, not just compared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
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
    DEFAULT_INFLIGHT,
    SITE,
    CenterSubscriber,
    Delivery,
    ForwardingSiteRig,
    Publishers,
    bridged_mosquittos,
    check_delivery,
    decode_readings,
    probe_bridge,
    publisher_jobs,
    read_events,
    stored_time,
    stream_last_seq,
    stream_messages,
    wait_count,
)
from bus.natsserver import NatsServerProcess, NatsServerSpec, free_port
from bus.streams import uplink_stream

BENCH = "site_ingest"
TARGET = 0.8
UP_STREAM = uplink_stream("reading").name
FULL = {"publishers": 4, "devices": 2, "per_device": 12_500, "rounds": 3}
QUICK = {"publishers": 4, "devices": 2, "per_device": 1_500, "rounds": 2}
IDLE_TIMEOUT_S = 20.0  # nothing new at the center for this long: the rest is lost
PUBLISH_TIMEOUT_S = 600.0


@dataclass
class Trial:
    path: str
    round: int
    n: int
    rate: float = math.nan
    pub_rate: float = math.nan  # PUBACK completion rate at the publishers
    delivery: Delivery | None = None
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU µs per message, per process
    error: str | None = None

    @property
    def lost(self) -> int:
        if self.delivery is not None:
            return self.delivery.lost
        return 0 if self.error is None else self.n


def bare_listener(workdir: Path) -> NatsServerProcess:
    """A site-like nats-server with nothing behind its MQTT listener."""
    spec = NatsServerSpec(
        name="bare", store_dir=workdir / "store", port=free_port(), monitor_port=free_port(),
        jetstream_domain="bare", mqtt_port=free_port(),
    )
    return NatsServerProcess(spec, workdir)


class Rig(ForwardingSiteRig):
    """Hub + site + agent (ours), the bare listener (baseline), the bridged mosquittos (peer)."""

    up_stream = UP_STREAM

    def __init__(self, ctx: SpawnContext, base: Path, args: argparse.Namespace) -> None:
        super().__init__(ctx, base)
        self.args = args
        self.bare = bare_listener(base / "bare")
        self.peer: Any = None  # (edge, proxy, center) while the peer runs

    async def start(self) -> None:
        profile = self.args.profile / "agent.prof" if self.args.profile else None
        await self.start_site(via_proxy=False, profile_path=profile)
        await asyncio.to_thread(self.bare.start)

    async def stop(self) -> None:
        await self.stop_site()
        self.bare.stop()

    def jobs(self, host: str, port: int, tag: str) -> list[Any]:
        a = self.args
        return publisher_jobs(host, port, tag, a.publishers, a.devices, a.per_device, a.inflight)

    # -- one trial per path -------------------------------------------------------------

    async def baseline(self, round_no: int) -> Trial:
        jobs = self.jobs(self.bare.mqtt_host, self.bare.mqtt_port, f"base{round_no}")
        pubs = Publishers(self.ctx, jobs)
        trial = Trial("baseline", round_no, pubs.total)
        await asyncio.to_thread(pubs.start)
        assert self.bare.pid is not None
        with ResourceSampler({"server": self.bare.pid}) as sampler:
            pubs.go()
            run = await asyncio.to_thread(pubs.join, PUBLISH_TIMEOUT_S)
        trial.cpu_us = cpu_us_per_item(sampler, trial.n)
        trial.cpu_us["publishers"] = 1e6 * run.cpu_s / trial.n
        trial.rate = trial.pub_rate = run.rate
        trial.delivery = Delivery(expected=trial.n, received=run.acked, unique=run.acked)
        trial.error = "; ".join(run.errors) or None
        return trial

    async def ours(self, round_no: int) -> Trial:
        site = self.topology.site(SITE)
        jobs = self.jobs(site.mqtt_host, site.mqtt_port, f"ours{round_no}")
        pubs = Publishers(self.ctx, jobs)
        trial = Trial("ours", round_no, pubs.total)
        before_count = await stream_messages(self.hub_js, UP_STREAM)
        before_last = await stream_last_seq(self.hub_js, UP_STREAM)
        await asyncio.to_thread(pubs.start)
        pids = {"agent": self.agent.pid, "site_server": site.pid, "hub": self.topology.hub.pid}
        with ResourceSampler({k: v for k, v in pids.items() if v is not None}) as sampler:
            pubs.go()
            run = await asyncio.to_thread(pubs.join, PUBLISH_TIMEOUT_S)
            count = await wait_count(
                self.hub_js, UP_STREAM, before_count + trial.n, IDLE_TIMEOUT_S
            )
        trial.cpu_us = cpu_us_per_item(sampler, trial.n)
        trial.cpu_us["publishers"] = 1e6 * run.cpu_s / trial.n
        trial.pub_rate = run.rate
        last = await stream_last_seq(self.hub_js, UP_STREAM)
        if count >= before_count + trial.n:
            trial.rate = trial.n / (await stored_time(self.hub_js, UP_STREAM, last) - run.t_first)
        raws = await read_events(self.hub_js, UP_STREAM, before_last + 1, last)
        pairs, ids, bad = decode_readings(raws)
        trial.delivery = check_delivery(pairs, jobs, ids)
        errors = run.errors + ([f"{bad} undecodable events"] if bad else [])
        if not trial.delivery.exact:
            errors.append(f"delivery not exact: {trial.delivery.as_dict()}")
        trial.error = "; ".join(errors) or None
        return trial

    async def peer_trial(self, round_no: int) -> Trial:
        edge, _proxy, center = self.peer
        jobs = self.jobs(edge.host, edge.port, f"peer{round_no}")
        pubs = Publishers(self.ctx, jobs)
        trial = Trial("peer", round_no, pubs.total)
        sub = CenterSubscriber(
            self.ctx, center.host, center.port, f"center-app-{round_no}", trial.n,
            f"peer{round_no}-", IDLE_TIMEOUT_S,
        )
        await asyncio.to_thread(sub.start)
        await asyncio.to_thread(pubs.start)
        pids = {"edge_mosquitto": edge.pid, "center_mosquitto": center.pid}
        with ResourceSampler({k: v for k, v in pids.items() if v is not None}) as sampler:
            pubs.go()
            run = await asyncio.to_thread(pubs.join, PUBLISH_TIMEOUT_S)
            got = await asyncio.to_thread(sub.result, PUBLISH_TIMEOUT_S)
        trial.cpu_us = cpu_us_per_item(sampler, trial.n)
        trial.cpu_us["publishers"] = 1e6 * run.cpu_s / trial.n
        trial.pub_rate = run.rate
        trial.delivery = check_delivery(got.pairs, jobs)
        if trial.delivery.lost == 0:
            trial.rate = trial.n / (got.t_last_new - run.t_first)
        errors = run.errors + ([got.error] if got.error else [])
        trial.error = "; ".join(errors) or None
        return trial


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--publishers", type=int, default=None, help="publisher processes")
    parser.add_argument("--devices", type=int, default=None, help="devices per publisher")
    parser.add_argument("--per-device", type=int, default=None, help="readings per device")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--inflight", type=int, default=DEFAULT_INFLIGHT,
                        help="PUBACKs outstanding per publisher (paho max_inflight)")
    parser.add_argument("--no-peer", action="store_true", help="skip the mosquitto peer")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the agent under cProfile, writing DIR/agent.prof")


async def run(args: argparse.Namespace, say: Callable[[str], None]) -> list[Trial]:
    ctx = mp.get_context("spawn")
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="edgebus-site-ingest-") as tmp:
        base = Path(tmp)
        rig = Rig(ctx, base, args)
        try:
            await rig.start()
            # Bridged directly, as ours runs over a direct leaf link (no proxy in between).
            peers = (contextlib.nullcontext(None) if args.no_peer
                     else bridged_mosquittos(base / "peer", via_proxy=False))
            with peers as peer:
                rig.peer = peer
                if peer is not None:
                    await asyncio.to_thread(probe_bridge, peer[0], peer[2])
                for round_no in range(1, args.rounds + 1):
                    paths = [rig.baseline, rig.ours] + ([] if args.no_peer else [rig.peer_trial])
                    for trial_fn in paths:
                        t = await trial_fn(round_no)
                        trials.append(t)
                        cpu = " ".join(f"{k} {v:.0f}" for k, v in t.cpu_us.items())
                        say(f"  round {round_no}  {t.path:<8} {t.rate:>8,.0f} msg/s  "
                            f"pubacks {t.pub_rate:>8,.0f}/s  lost {t.lost}  "
                            f"cpu µs/msg: {cpu}" + (f"  ERROR {t.error}" if t.error else ""))
        finally:
            await rig.stop()
    return trials


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__.splitlines()[0] if __doc__ else BENCH, argv, _add_arguments)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    say: Callable[[str], None] = (lambda _: None) if args.json_only else print
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    n = args.publishers * args.devices * args.per_device
    load_before = os.getloadavg()
    started = time.perf_counter()
    say(f"{BENCH}: {args.publishers} publishers x {args.devices} devices x {args.per_device:,} "
        f"readings = {n:,} per trial, QoS 1, inflight {args.inflight}; {args.rounds} round(s)")
    trials = asyncio.run(run(args, say))

    by_path: dict[str, list[Trial]] = {}
    for t in trials:
        by_path.setdefault(t.path, []).append(t)
    med = {p: median(t.rate for t in ts) for p, ts in by_path.items()}
    ours, base = med.get("ours", math.nan), med.get("baseline", math.nan)
    peer = med.get("peer", math.nan)
    cpu_med = {
        p: {k: median(t.cpu_us.get(k, math.nan) for t in ts) for k in ts[0].cpu_us}
        for p, ts in by_path.items()
    }
    say("")
    say(format_table(
        ["path", "msg/s median", "vs baseline", "pubacks/s", "lost", "dup", "out of order"],
        [[p, med[p], safe_ratio(med[p], base), median(t.pub_rate for t in ts),
          sum(t.lost for t in ts),
          sum(t.delivery.duplicates if t.delivery else 0 for t in ts),
          sum(t.delivery.out_of_order if t.delivery else 0 for t in ts)]
         for p, ts in by_path.items()],
    ))
    cpu_total = {p: sum(cpu.values()) for p, cpu in cpu_med.items()}
    for p, cpu in cpu_med.items():
        say(f"  {p:<8} CPU µs/msg: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            + f"  = {cpu_total[p]:.0f} in all")
    # With every process on this machine's cores, a CPU-saturated run can reach at most this
    # ratio: the baseline's total CPU per message over ours.
    cpu_bound = safe_ratio(cpu_total.get("baseline", math.nan), cpu_total.get("ours", math.nan))
    say(f"\nours/baseline = {safe_ratio(ours, base):.3f} (target >= {TARGET}); CPU-bound "
        f"ceiling on this machine = {cpu_bound:.3f}")
    ours_trials = by_path.get("ours", [])
    peer_trials = by_path.get("peer", [])
    BenchResult(
        bench=BENCH,
        value=ours,
        unit="msg/s",
        baseline=base,
        target=TARGET,
        extra={
            "lost": sum(t.lost for t in ours_trials),
            "duplicates": sum(t.delivery.duplicates if t.delivery else 0 for t in ours_trials),
            "out_of_order": sum(t.delivery.out_of_order if t.delivery else 0
                                for t in ours_trials),
            "zero_loss": all(t.delivery is not None and t.delivery.exact for t in ours_trials),
            "ours_pubacks_per_s": median(t.pub_rate for t in ours_trials),
            "peer": peer,
            "peer_vs_baseline": safe_ratio(peer, base),
            "ours_vs_peer": safe_ratio(ours, peer),
            "peer_lost": sum(t.lost for t in peer_trials) if peer_trials else None,
            "peer_duplicates": sum(t.delivery.duplicates if t.delivery else 0
                                   for t in peer_trials) if peer_trials else None,
            "peer_out_of_order": sum(t.delivery.out_of_order if t.delivery else 0
                                     for t in peer_trials) if peer_trials else None,
            "cpu_us_per_msg": cpu_med,
            "cpu_us_per_msg_total": cpu_total,
            "cpu_bound_ratio": cpu_bound,
            "per_round": {p: [t.rate for t in ts] for p, ts in by_path.items()},
            "n": n,
            "publishers": args.publishers,
            "devices_per_publisher": args.devices,
            "inflight": args.inflight,
            "rounds": args.rounds,
            "quick": bool(args.quick),
            "errors": [f"{t.path} r{t.round}: {t.error}" for t in trials if t.error],
            "measured": {
                "ours": "first publish -> JetStream timestamp of the last event in hub "
                        "UP_READING; read back, (device, seq) exactly once and in order",
                "baseline": "first publish -> last PUBACK, bare nats-server MQTT listener, "
                            "nothing downstream",
                "peer": "first publish -> last new message at a center subscriber of a "
                        "mosquitto bridged to mosquitto (QoS 1, persistent, persistence on)",
            },
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "seconds": time.perf_counter() - started,
            **machine_info(),
        },
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
