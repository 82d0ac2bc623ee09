"""Core NATS publish->subscribe throughput: raw nats-py bytes vs `Bus` typed events vs FastStream.

Publisher and subscriber run in separate (spawned) processes against one throwaway
nats-server; the rate is taken at the subscriber, from the first to the last of N messages.
The three paths alternate round by round (raw, typed, faststream, raw, ...) and the medians
are reported, so machine drift hits all of them alike.

    python -m bench.bus_throughput [--quick] [--n N] [--rounds R] [--profile DIR]

Per message, with the same N, the same `Event[DeviceReading]` shape, the same server:

- raw: `nc.publish(subject, data)` of one pre-encoded event (the bytes a typed publisher
  sends); the subscriber is a nats-py callback that only counts (no decoding).
- typed: `bus.emit(subject, reading)` (a fresh event each time: new id and time, the
  validated payload encoded into the envelope bytes directly) and
  `bus.subscribe(subject, DeviceReading, handler)` (full pydantic validation,
  dead-lettering on failure) with a handler that counts.
- raw-bus: the raw path's bytes over the client every `Bus` connection uses
  (`bus.client.open_connection`: nats-py's client with edgebus's header and protocol parsers),
  so the typed path's cost splits into what the transport saves and what typing costs.
- faststream: `NatsBroker.publish(envelope, subject)` of a fresh pydantic envelope with the
  same fields and constraints, and a `@broker.subscriber` handler whose argument is typed with
  that model (FastStream decodes and validates it); per-message logging off, as in `Bus`.

The payload model instance is built once per publisher and wrapped in a fresh envelope per
message: the bench measures the messaging layer, not the building of readings.

Consumption pattern: raw and typed both use the nats-py callback subscription
(`nc.subscribe(cb=...)`, one awaited callback per message, which is also the fastest public
nats-py pattern: `sub.messages` and `next_msg()` create a task per message). FastStream
uses its own subscriber on nats-py. Every publisher yields to its event loop every
`--yield-every` messages so nats-py's flusher streams the buffer while publishing (without
that, a tight loop buffers up to `pending_size` before the first byte leaves).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, Literal

from bench.common import (
    BenchResult,
    ResourceSampler,
    bench_args,
    format_table,
    machine_info,
    median,
    nats_server,
    rate,
    safe_ratio,
)
from bus.natsserver import NatsServerProcess

BENCH = "bus_throughput"
PATHS = ("raw", "typed", "raw-bus", "faststream")
TARGET_TYPED_VS_RAW = 0.7
FULL_N, FULL_ROUNDS = 200_000, 3
QUICK_N, QUICK_ROUNDS = 40_000, 2
DEFAULT_YIELD_EVERY = 1000
PENDING_SIZE = 64 * 1024 * 1024  # the publish buffer `Bus` uses; raw and FastStream get it too
SOURCE = "/site-01/ingest"
EVENT_TYPE = "edgebus.device.reading"
DATASCHEMA = "urn:edgebus:edgebus.device.reading:v1"
READY_TIMEOUT_S = 60.0  # a spawned worker imports pydantic, nats-py, FastStream...
IDLE_TIMEOUT_S = 3.0  # no message for this long after the first one: the rest is lost
TRIAL_TIMEOUT_S = 600.0

Closer = Callable[[], Awaitable[Any]]


def reading_fields() -> dict[str, Any]:
    """The payload every path sends: one device reading, as ingest produces it."""
    return {"site": "site-01", "device": "dev-042", "channel": "temp", "payload": {"value": 21.5}}


def sample_event_bytes() -> bytes:
    """One encoded `Event[DeviceReading]`: what the raw path publishes, N times."""
    from schemas.devices import DeviceReading
    from schemas.wire import encode_new_event

    # The exact bytes `Bus.emit` produces, so raw and typed move the same payload size.
    return encode_new_event(DeviceReading(**reading_fields()), source=SOURCE)[1]


@dataclass(frozen=True)
class Job:
    """What one worker process needs (picklable: crosses the spawn boundary)."""

    path: str
    url: str
    subject: str
    n: int
    yield_every: int
    profile_path: str | None


# -- subscriber side ----------------------------------------------------------------


class _Tally:
    """Counts deliveries; stamps the first and the N-th: the same work on every path."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.t_first = self.t_last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.dead_letters = 0  # typed path: messages that failed to decode (must stay 0)
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == 1:
            self.t_first, self.cpu_first = time.perf_counter(), time.process_time()
        if self.count == self.n:
            self.t_last, self.cpu_last = time.perf_counter(), time.process_time()
            self.done.set()

    async def wait(self) -> None:
        """Until all N arrived, or nothing new came for IDLE_TIMEOUT_S (the rest is lost).

        A watchdog tick (every 0.1 s) notes when the count last moved, so the hot path
        stamps only the first and the N-th message; a lossy run's end is known to ~0.1 s.
        """
        started = time.perf_counter()
        last_count, last_change, last_cpu = 0, started, time.process_time()
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.1)
            now = time.perf_counter()
            if self.count != last_count:
                last_count, last_change, last_cpu = self.count, now, time.process_time()
                continue
            waited = now - (started if self.count == 0 else last_change)
            if waited > (READY_TIMEOUT_S if self.count == 0 else IDLE_TIMEOUT_S):
                break
        if not self.done.is_set() and self.count > 0:
            self.t_last, self.cpu_last = last_change, last_cpu

    def summary(self) -> dict[str, Any]:
        elapsed = self.t_last - self.t_first
        return {
            "received": self.count,
            "elapsed_s": elapsed,
            "rate": rate(self.count - 1, elapsed),
            "cpu_s": self.cpu_last - self.cpu_first,
            "dead_letters": self.dead_letters,
        }


async def _connect_raw(job: Job, role: str) -> Any:
    """nats-py's own client, as a user of plain nats-py would connect."""
    import nats

    return await nats.connect(job.url, pending_size=PENDING_SIZE)


async def _connect_raw_bus(job: Job, role: str) -> Any:
    """The client every `Bus` connection uses (same pending buffer as above)."""
    from bus.client import open_connection
    from bus.config import NatsConfig

    return await open_connection(NatsConfig.from_url(job.url, name=f"bench-{role}"))


async def _count_bytes(nc: Any, job: Job, tally: _Tally) -> Closer:
    async def on_message(msg: Any) -> None:
        tally.hit()

    await nc.subscribe(job.subject, cb=on_message)
    await nc.flush()
    closer: Closer = nc.close
    return closer


async def _subscribe_raw(job: Job, tally: _Tally) -> Closer:
    return await _count_bytes(await _connect_raw(job, "sub"), job, tally)


async def _subscribe_raw_bus(job: Job, tally: _Tally) -> Closer:
    return await _count_bytes(await _connect_raw_bus(job, "sub"), job, tally)


async def _subscribe_typed(job: Job, tally: _Tally) -> Closer:
    from bus.client import Bus
    from bus.config import NatsConfig
    from schemas import Event
    from schemas.devices import DeviceReading

    bus = await Bus.connect(NatsConfig.from_url(job.url, name="bench-sub"), scope="bench")

    async def on_event(event: Event[DeviceReading]) -> None:
        tally.hit()

    await bus.subscribe(job.subject, DeviceReading, on_event)
    await bus.nc.flush()

    async def close() -> None:
        tally.dead_letters = sum(bus.dead_letters.counts.values())
        await bus.close()

    return close


async def _subscribe_faststream(job: Job, tally: _Tally) -> Closer:
    from faststream.nats import NatsBroker

    envelope_model = faststream_models()[1]
    broker = NatsBroker(job.url, logger=None, pending_size=PENDING_SIZE)

    async def on_event(event: Any) -> None:
        tally.hit()

    # FastStream validates against the handler's annotation; the model is built at run time.
    on_event.__annotations__["event"] = envelope_model
    broker.subscriber(job.subject)(on_event)
    await broker.start()
    return broker.stop


# -- publisher side -----------------------------------------------------------------


class _Clock:
    """Wall and CPU time of a publish loop and its final flush (connect and close excluded)."""

    def __init__(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.elapsed = self.cpu = 0.0

    def stop(self) -> _Clock:
        self.elapsed = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        return self


async def _publish_raw(job: Job) -> _Clock:
    return await _publish_bytes(await _connect_raw(job, "pub"), job)


async def _publish_raw_bus(job: Job) -> _Clock:
    return await _publish_bytes(await _connect_raw_bus(job, "pub"), job)


async def _publish_bytes(nc: Any, job: Job) -> _Clock:
    """One pre-encoded event, N times: the raw paths' publisher."""
    data = sample_event_bytes()
    publish, subject, every = nc.publish, job.subject, job.yield_every
    clock = _Clock()
    for i in range(1, job.n + 1):
        await publish(subject, data)
        if i % every == 0:
            await asyncio.sleep(0)
    await nc.flush()
    clock.stop()
    await nc.close()
    return clock


async def _publish_typed(job: Job) -> _Clock:
    from bus.client import Bus
    from bus.config import NatsConfig
    from schemas.devices import DeviceReading

    config = NatsConfig.from_url(job.url, name="bench-pub")
    bus = await Bus.connect(config, scope="bench", source=SOURCE)
    reading = DeviceReading(**reading_fields())
    subject, every = job.subject, job.yield_every
    clock = _Clock()
    for i in range(1, job.n + 1):
        await bus.emit(subject, reading)
        if i % every == 0:
            await asyncio.sleep(0)
    await bus.nc.flush()
    clock.stop()
    await bus.close()
    return clock


async def _publish_faststream(job: Job) -> _Clock:
    from faststream.nats import NatsBroker

    from schemas.envelope import utc_now
    from schemas.ids import new_event_id

    reading_model, envelope_model = faststream_models()
    broker = NatsBroker(job.url, logger=None, pending_size=PENDING_SIZE)
    nc = await broker.connect()
    reading = reading_model(**reading_fields())
    subject, every = job.subject, job.yield_every
    clock = _Clock()
    for i in range(1, job.n + 1):
        event = envelope_model(
            id=new_event_id(),
            source=SOURCE,
            type=EVENT_TYPE,
            time=utc_now(),
            dataschema=DATASCHEMA,
            data=reading,
        )
        await broker.publish(event, subject)
        if i % every == 0:
            await asyncio.sleep(0)
    await nc.flush()
    clock.stop()
    await broker.stop()
    return clock


def _is_none(value: object) -> bool:
    return value is None


def faststream_models() -> tuple[type[Any], type[Any]]:
    """`Event[DeviceReading]`'s fields and constraints, written as a FastStream user would."""
    from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

    from schemas.devices import ID_PATTERN

    class FsDeviceReading(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

        site: str = Field(pattern=ID_PATTERN)
        device: str = Field(pattern=ID_PATTERN)
        channel: str = Field(pattern=ID_PATTERN)
        payload: dict[str, Any]
        device_time: datetime | None = None

    class FsEvent(BaseModel):
        model_config = ConfigDict(frozen=True, extra="allow")

        specversion: Literal["1.0"] = "1.0"
        id: str = Field(min_length=1, max_length=128)
        source: str = Field(min_length=1, max_length=512)
        type: str = Field(min_length=1, max_length=256)
        time: AwareDatetime
        subject: str | None = Field(
            default=None, min_length=1, max_length=512, exclude_if=_is_none
        )
        datacontenttype: Literal["application/json"] = "application/json"
        dataschema: str = Field(min_length=1, max_length=512)
        correlationid: str | None = Field(default=None, max_length=128, exclude_if=_is_none)
        data: FsDeviceReading

    return FsDeviceReading, FsEvent


def check_same_shape() -> int:
    """Both envelope models accept each other's JSON; returns FastStream's encoded size."""
    from schemas import REGISTRY
    from schemas.devices import DeviceReading
    from schemas.envelope import utc_now
    from schemas.ids import new_event_id

    reading_model, envelope_model = faststream_models()
    fs_event = envelope_model(id=new_event_id(), source=SOURCE, type=EVENT_TYPE, time=utc_now(),
                              dataschema=DATASCHEMA, data=reading_model(**reading_fields()))
    try:  # what FastStream's default (fast_depends pydantic) serializer puts on the wire
        from fast_depends.pydantic.serializer import PydanticSerializer

        fs_json: bytes = PydanticSerializer.encode(fs_event)
    except ImportError:  # another FastStream generation: pydantic's own JSON
        fs_json = fs_event.__pydantic_serializer__.to_json(fs_event)
    REGISTRY.decode_as(fs_json, DeviceReading)
    envelope_model.model_validate_json(sample_event_bytes())
    return len(fs_json)


_SUBSCRIBERS: dict[str, Callable[[Job, _Tally], Awaitable[Closer]]] = {
    "raw": _subscribe_raw, "typed": _subscribe_typed, "raw-bus": _subscribe_raw_bus,
    "faststream": _subscribe_faststream,
}
_PUBLISHERS: dict[str, Callable[[Job], Awaitable[_Clock]]] = {
    "raw": _publish_raw, "typed": _publish_typed, "raw-bus": _publish_raw_bus,
    "faststream": _publish_faststream,
}


# -- worker processes ---------------------------------------------------------------


def _run(job: Job, coro: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        return asyncio.run(coro())

    if job.profile_path is None:
        return go()
    profiler = cProfile.Profile()
    try:
        result: dict[str, Any] = profiler.runcall(go)
        return result
    finally:
        profiler.dump_stats(job.profile_path)


def subscriber_process(job: Job, ready: MpEvent, results: mp.Queue[Any]) -> None:
    async def main() -> dict[str, Any]:
        tally = _Tally(job.n)
        close = await _SUBSCRIBERS[job.path](job, tally)
        ready.set()
        await tally.wait()
        await close()
        return tally.summary()

    try:
        results.put(("sub", _run(job, main)))
    except BaseException as exc:
        results.put(("sub", {"error": repr(exc)}))
        raise


def publisher_process(job: Job, results: mp.Queue[Any]) -> None:
    async def main() -> dict[str, Any]:
        clock = await _PUBLISHERS[job.path](job)
        return {"rate": rate(job.n, clock.elapsed), "elapsed_s": clock.elapsed,
                "cpu_s": clock.cpu}

    try:
        results.put(("pub", _run(job, main)))
    except BaseException as exc:
        results.put(("pub", {"error": repr(exc)}))
        raise


# -- orchestration ------------------------------------------------------------------


@dataclass
class Trial:
    path: str
    round: int
    rate: float = math.nan
    received: int = 0
    lost: int = 0
    pub_rate: float = math.nan
    sub_cpu_pct: float = math.nan
    pub_cpu_pct: float = math.nan
    server_cpu_pct: float = math.nan
    dead_letters: int = 0
    error: str | None = None


def _wait_for_interest(server: NatsServerProcess, subject: str, timeout: float = 10.0) -> None:
    """Until the server itself lists the subscription (not just the client's say-so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = server.monitor_json(f"subsz?subs=1&test={subject}")
        if any(s.get("subject") == subject for s in info.get("subscriptions_list") or []):
            return
        time.sleep(0.02)
    raise RuntimeError(f"no subscription for {subject} after {timeout:.0f}s")


def _stop(proc: mp.process.BaseProcess | None) -> None:
    if proc is None or proc.pid is None:
        return
    proc.join(timeout=15)
    if proc.is_alive():
        proc.kill()
        proc.join()


def run_trial(
    ctx: SpawnContext, server: NatsServerProcess, path: str, round_no: int, n: int,
    yield_every: int, profile_dir: Path | None,
) -> Trial:
    """One publisher process and one subscriber process on a subject of their own."""
    trial = Trial(path=path, round=round_no)

    def job(role: str) -> Job:
        profile = str(profile_dir / f"{path}-{role}-r{round_no}.prof") if profile_dir else None
        return Job(path, server.url, f"bench.throughput.{path}.r{round_no}", n, yield_every,
                   profile)

    results: mp.Queue[Any] = ctx.Queue()
    ready = ctx.Event()
    sub_job, pub_job = job("sub"), job("pub")
    sub = ctx.Process(target=subscriber_process, args=(sub_job, ready, results),
                      name=f"sub-{path}")
    pub = ctx.Process(target=publisher_process, args=(pub_job, results), name=f"pub-{path}")
    got: dict[str, dict[str, Any]] = {}
    server_pid = server.pid
    assert server_pid is not None
    try:
        sub.start()
        if not ready.wait(READY_TIMEOUT_S):
            raise RuntimeError("subscriber not ready")
        _wait_for_interest(server, sub_job.subject)
        with ResourceSampler({"server": server_pid}) as sampler:
            pub.start()
            deadline = time.monotonic() + TRIAL_TIMEOUT_S
            while len(got) < 2:
                if time.monotonic() > deadline:
                    raise RuntimeError("trial timed out")
                try:
                    role, summary = results.get(timeout=1.0)
                    got[role] = summary
                except queue.Empty:
                    for role, proc in (("sub", sub), ("pub", pub)):
                        if role not in got and not proc.is_alive():
                            raise RuntimeError(f"{role} process died") from None
        trial.server_cpu_pct = sampler.usage["server"].cpu_percent
    except Exception as exc:
        trial.error = repr(exc)
    finally:
        _stop(pub)
        _stop(sub)
    sub_r, pub_r = got.get("sub", {}), got.get("pub", {})
    trial.error = trial.error or sub_r.get("error") or pub_r.get("error")
    trial.received = int(sub_r.get("received", 0))
    trial.lost = n - trial.received
    trial.dead_letters = int(sub_r.get("dead_letters", 0))
    if trial.error is None:
        trial.rate = float(sub_r["rate"])
        trial.pub_rate = float(pub_r["rate"])
        trial.sub_cpu_pct = 100 * safe_ratio(float(sub_r["cpu_s"]), float(sub_r["elapsed_s"]))
        trial.pub_cpu_pct = 100 * safe_ratio(float(pub_r["cpu_s"]), float(pub_r["elapsed_s"]))
    return trial


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=None,
                        help=f"messages per trial (default {FULL_N}, quick {QUICK_N})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of the paths (default {FULL_ROUNDS}, quick {QUICK_ROUNDS})")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    parser.add_argument("--yield-every", type=int, default=DEFAULT_YIELD_EVERY,
                        help="publishers yield to their event loop every this many messages")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write one cProfile file per worker process into this directory")


def _per_path(trials: dict[str, list[Trial]], attr: str) -> dict[str, list[Any]]:
    return {p: [getattr(t, attr) for t in ts] for p, ts in trials.items()}


def main(argv: list[str] | None = None) -> int:
    args = bench_args(__doc__.splitlines()[0] if __doc__ else BENCH, argv, _add_arguments)
    n: int = args.n or (QUICK_N if args.quick else FULL_N)
    rounds: int = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        raise SystemExit(f"--paths: choose from {', '.join(PATHS)}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    say: Callable[[str], None] = (lambda _: None) if args.json_only else print

    envelope_bytes = len(sample_event_bytes())
    faststream_bytes = check_same_shape() if "faststream" in paths else None
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    say(f"{BENCH}: {n:,} messages per trial, {rounds} round(s) of {', '.join(paths)}; "
        f"envelope {envelope_bytes} B; publishers yield every {args.yield_every}")
    trials: list[Trial] = []
    with nats_server(BENCH.replace("_", "-")) as server:
        for round_no in range(1, rounds + 1):
            for path in paths:
                t = run_trial(ctx, server, path, round_no, n, args.yield_every, args.profile)
                trials.append(t)
                say(f"  round {round_no}  {path:<10} {t.rate:>9,.0f} msg/s   "
                    f"pub {t.pub_rate:>9,.0f}/s  lost {t.lost}  cpu% sub {t.sub_cpu_pct:.0f} "
                    f"pub {t.pub_cpu_pct:.0f} server {t.server_cpu_pct:.0f}"
                    + (f"  ERROR {t.error}" if t.error else ""))

    by_path = {p: [t for t in trials if t.path == p] for p in paths}
    med = {p: median(t.rate for t in ts) for p, ts in by_path.items()}
    raw, typed = med.get("raw", math.nan), med.get("typed", math.nan)
    faststream, raw_bus = med.get("faststream", math.nan), med.get("raw-bus", math.nan)
    typed_vs_raw, typed_vs_fs = safe_ratio(typed, raw), safe_ratio(typed, faststream)

    say("")
    say(format_table(
        ["path", "msg/s median", "vs raw", "pub msg/s", "lost", "sub cpu%", "pub cpu%",
         "server cpu%"],
        [[p, med[p], safe_ratio(med[p], raw), median(t.pub_rate for t in ts),
          sum(t.lost for t in ts), median(t.sub_cpu_pct for t in ts),
          median(t.pub_cpu_pct for t in ts), median(t.server_cpu_pct for t in ts)]
         for p, ts in by_path.items()],
    ))
    say(f"\ntyped/raw = {typed_vs_raw:.3f} (target >= {TARGET_TYPED_VS_RAW})   "
        f"typed/faststream = {typed_vs_fs:.2f} (target > 1)   "
        f"typed/raw-bus = {safe_ratio(typed, raw_bus):.3f} (typing alone, same client)")

    BenchResult(
        bench=BENCH,
        value=typed,
        unit="msg/s",
        baseline=raw,
        target=TARGET_TYPED_VS_RAW,
        extra={
            "faststream": faststream,
            "typed_vs_faststream": typed_vs_fs,
            "raw_bus": raw_bus,
            "typed_vs_raw_bus": safe_ratio(typed, raw_bus),
            "faststream_target_met": bool(typed_vs_fs > 1),
            "n": n,
            "rounds": rounds,
            "quick": bool(args.quick),
            "per_path": _per_path(by_path, "rate"),
            "lost": _per_path(by_path, "lost"),
            "dead_letters": sum(t.dead_letters for t in trials),
            "pub_rate": _per_path(by_path, "pub_rate"),
            "sub_cpu_pct": _per_path(by_path, "sub_cpu_pct"),
            "pub_cpu_pct": _per_path(by_path, "pub_cpu_pct"),
            "errors": [f"{t.path} r{t.round}: {t.error}" for t in trials if t.error],
            "envelope_bytes": envelope_bytes,
            "faststream_envelope_bytes": faststream_bytes,
            "measured": "at the subscriber, first to last of n messages; median over rounds",
            "pattern": {
                "raw": "nats-py subscribe(cb) callback per message, counts only; "
                       "publish of one pre-encoded event",
                "typed": "Bus.subscribe (nats-py subscribe(cb) callback per message) with full "
                         "pydantic validation; bus.emit() (fresh event) per message",
                "raw-bus": "the raw pattern over bus.client.open_connection (edgebus's "
                           "nats-py client: its header and protocol parsers)",
                "faststream": "NatsBroker subscriber with a pydantic-typed argument; "
                              "broker.publish(model) per message; logger=None",
            },
            "yield_every": args.yield_every,
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "seconds": time.perf_counter() - started,
            **machine_info(),
        },
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
