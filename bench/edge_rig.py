"""Shared rig of the edge benches (`site_ingest`, `replay_catchup`): device publishers, a site
with its agent, reading the center back and checking it, and the mosquitto bridge peer."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from bus import subjects

# Device publishers are spawned processes driving paho-mqtt directly (they stand for devices,
# not edgebus code): QoS 1, own client id and devices, each payload a JSON object with a
# per-device `seq` (0, 1, ...) so the receiver can check loss, duplicates and order. Times
# crossing processes are wall clock (`time.time()`), comparable with JetStream's timestamps.
REPO = Path(__file__).resolve().parent.parent
SITE = "s1"
CHANNEL = "temp"
READY_TIMEOUT_S = 60.0  # a spawned process imports paho (and the parent's main module)
DEFAULT_INFLIGHT = 20  # paho's default (and `MqttConfig.max_inflight`'s)


def device_payload(seq: int) -> bytes:
    """What a device sends: a small JSON object with its own sequence number."""
    return b'{"seq":%d,"temp":%.2f,"humidity":%.1f,"battery":3.71}' % (
        seq,
        20.0 + (seq % 100) / 10,
        40.0 + (seq % 50) / 5,
    )


# -- device publishers ------------------------------------------------------------------


@dataclass(frozen=True)
class PublisherJob:
    """One publisher process: `per_device` messages to each of `devices`, interleaved."""

    host: str
    port: int
    client_id: str
    devices: tuple[str, ...]
    per_device: int
    inflight: int = DEFAULT_INFLIGHT
    site: str = SITE
    timeout_s: float = 600.0

    @property
    def total(self) -> int:
        return len(self.devices) * self.per_device


@dataclass
class PublisherResult:
    client_id: str
    sent: int = 0
    acked: int = 0
    t_first: float = math.nan  # wall clock just before the first publish
    t_done: float = math.nan  # wall clock at the last PUBACK
    cpu_s: float = math.nan
    error: str | None = None


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def publisher_process(job: PublisherJob, ready: MpEvent, go: MpEvent, results: Any) -> None:
    """Connect, say ready, wait for `go`, publish everything, wait for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    result = PublisherResult(job.client_id)
    connected = threading.Event()
    done = threading.Event()
    lock = threading.Lock()
    total = job.total

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with lock:
            if reason.is_failure:
                result.error = f"publish {mid} refused: {reason}"
                done.set()
                return
            result.acked += 1
            if result.acked == total:
                result.t_done = time.time()
                done.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=job.client_id, protocol=mqtt.MQTTv311
    )
    client.max_inflight_messages_set(job.inflight)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_socket_open = _nodelay
    try:
        client.connect(job.host, job.port, keepalive=60)
        client.loop_start()
        if not connected.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"no CONNACK from {job.host}:{job.port}")
        topics = [subjects.mqtt_device_topic(job.site, d, CHANNEL) for d in job.devices]
        payloads = [device_payload(seq) for seq in range(job.per_device)]
        ready.set()
        if not go.wait(READY_TIMEOUT_S):
            raise RuntimeError("never told to go")
        cpu0 = time.process_time()
        result.t_first = time.time()
        publish = client.publish
        for payload in payloads:
            for topic in topics:
                publish(topic, payload, qos=1)
        result.sent = total
        if not done.wait(job.timeout_s):
            result.error = result.error or f"only {result.acked}/{total} PUBACKs"
        result.cpu_s = time.process_time() - cpu0
    except Exception as exc:
        result.error = repr(exc)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_stop()
        results.put(result)


@dataclass
class PublishRun:
    """What a set of publishers did together."""

    results: list[PublisherResult]
    total: int

    @property
    def t_first(self) -> float:
        return min((r.t_first for r in self.results), default=math.nan)

    @property
    def t_done(self) -> float:
        return max((r.t_done for r in self.results), default=math.nan)

    @property
    def acked(self) -> int:
        return sum(r.acked for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [f"{r.client_id}: {r.error}" for r in self.results if r.error]

    @property
    def rate(self) -> float:
        """PUBACKed messages per second, first publish to last PUBACK (all publishers)."""
        span = self.t_done - self.t_first
        return self.acked / span if self.acked == self.total and span > 0 else math.nan

    @property
    def cpu_s(self) -> float:
        return sum(r.cpu_s for r in self.results)


def publisher_jobs(
    host: str, port: int, tag: str, publishers: int, devices_each: int, per_device: int,
    inflight: int = DEFAULT_INFLIGHT,
) -> list[PublisherJob]:
    """`publishers` jobs, device ids unique to `tag` (one round of one path)."""
    return [
        PublisherJob(
            host=host,
            port=port,
            client_id=f"{tag}-p{p}",
            devices=tuple(f"{tag}-p{p}-d{d}" for d in range(devices_each)),
            per_device=per_device,
            inflight=inflight,
        )
        for p in range(publishers)
    ]


class Publishers:
    """Spawned publisher processes: `start()` (connected, waiting), `go()`, `join()`."""

    def __init__(self, ctx: SpawnContext, jobs: Sequence[PublisherJob]) -> None:
        self.jobs = list(jobs)
        self._ctx = ctx
        self._go = ctx.Event()
        self._results: Any = ctx.Queue()
        self._procs: list[mp.process.BaseProcess] = []
        self._ready: list[MpEvent] = []

    @property
    def total(self) -> int:
        return sum(job.total for job in self.jobs)

    def start(self) -> None:
        for job in self.jobs:
            ready = self._ctx.Event()
            proc = self._ctx.Process(
                target=publisher_process, args=(job, ready, self._go, self._results),
                name=job.client_id, daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._ready.append(ready)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for ready, started in zip(self._ready, self._procs, strict=True):
            while not ready.wait(0.2):
                if not started.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"publisher {started.name} not ready")

    def go(self) -> None:
        self._go.set()

    def join(self, timeout_s: float) -> PublishRun:
        results: list[PublisherResult] = []
        deadline = time.monotonic() + timeout_s
        while len(results) < len(self.jobs) and time.monotonic() < deadline:
            try:
                results.append(self._results.get(timeout=0.5))
            except queue.Empty:
                if not any(p.is_alive() for p in self._procs) and self._results.empty():
                    break
        self.stop()
        missing = {j.client_id for j in self.jobs} - {r.client_id for r in results}
        results += [PublisherResult(cid, error="no result") for cid in sorted(missing)]
        return PublishRun(results, self.total)

    def stop(self) -> None:
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def run(self, timeout_s: float) -> PublishRun:
        """Start, go, join: for callers with nothing to do in between."""
        self.start()
        self.go()
        return self.join(timeout_s)


# -- checking what arrived ----------------------------------------------------------------


@dataclass
class Delivery:
    """Loss, duplicates and per-device order of (device, seq) pairs against what was sent."""

    expected: int
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    foreign: int = 0  # devices nobody sent in this trial
    duplicate_event_ids: int = 0

    @property
    def lost(self) -> int:
        return self.expected - self.unique

    @property
    def exact(self) -> bool:
        return (
            self.lost == 0 and self.duplicates == 0 and self.out_of_order == 0
            and self.foreign == 0 and self.duplicate_event_ids == 0
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "expected": self.expected, "received": self.received, "lost": self.lost,
            "duplicates": self.duplicates, "out_of_order": self.out_of_order,
            "foreign": self.foreign, "duplicate_event_ids": self.duplicate_event_ids,
        }


def check_delivery(
    pairs: Iterable[tuple[str, int]], jobs: Sequence[PublisherJob],
    event_ids: Iterable[str] = (),
) -> Delivery:
    """Every (device, seq) of `jobs` exactly once, each device's seqs in increasing order."""
    per_device = {d: job.per_device for job in jobs for d in job.devices}
    result = Delivery(expected=sum(per_device.values()))
    seen: dict[str, set[int]] = defaultdict(set)
    last: dict[str, int] = {}
    for device, seq in pairs:
        result.received += 1
        if device not in per_device or not 0 <= seq < per_device[device]:
            result.foreign += 1
            continue
        if seq in seen[device]:
            result.duplicates += 1
            continue
        seen[device].add(seq)
        if seq < last.get(device, -1):
            result.out_of_order += 1
        last[device] = max(seq, last.get(device, -1))
    result.unique = sum(len(s) for s in seen.values())
    ids = list(event_ids)
    result.duplicate_event_ids = len(ids) - len(set(ids))
    return result


# -- the site: servers, agent, center ---------------------------------------------------


def agent_command(site_url: str, data_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """Exactly what the site supervisor runs, plus bench-specific flags."""
    return [
        sys.executable, "-m", "edge_agent", "--site", SITE, "--nats", site_url,
        "--data-dir", str(data_dir), "--log-level", "warning", *extra,
    ]


class AgentProcess:
    """`python -m edge_agent` as a child process; SIGTERM on stop (it must exit 0)."""

    def __init__(
        self, site_url: str, workdir: Path, extra: Sequence[str] = (),
        profile_path: Path | None = None,
    ) -> None:
        self.argv = agent_command(site_url, workdir / "agent", extra)
        if profile_path is not None:  # cProfile writes its file when the agent exits cleanly
            self.argv[1:3] = ["-m", "cProfile", "-o", str(profile_path), "-m", "edge_agent"]
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        # Its own session shields it from our Ctrl-C: make sure it never outlives the bench.
        atexit.register(self._kill_if_running, self.proc)
        return self.proc.pid

    @staticmethod
    def _kill_if_running(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def wait_agent_ready(site_url: str, agent: AgentProcess, timeout_s: float = 60.0) -> None:
    """Until the agent has declared its ingest and forwarder consumers at the site."""
    nc = await connect(site_url, "bench-site-probe")
    js = nc.jetstream()

    async def declared() -> bool:
        if agent.proc is None or agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited:\n{agent.log_tail()}")
        await js.consumer_info("INGEST", "ingest")
        await js.consumer_info("REPLAY", "forwarder")
        return True

    try:
        await wait_for(declared, timeout_s, "agent consumers declared")
    finally:
        await nc.close()


async def connect(url: str, name: str) -> Any:
    import nats

    return await nats.connect(
        url, name=name, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
        pending_size=64 * 1024 * 1024,
    )


async def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll an async condition until it is truthy; TimeoutError after `timeout_s`."""
    from nats.errors import Error as NatsError

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(NatsError, OSError, TimeoutError):
            value = await condition()
            if value:
                return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"after {timeout_s:.0f}s: {what}")
        await asyncio.sleep(interval_s)


async def stream_messages(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def stream_last_seq(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.last_seq)


async def stored_time(js: Any, stream: str, seq: int) -> float:
    """Wall-clock time JetStream stored message `seq` at (its own timestamp)."""
    raw = await js.get_msg(stream, seq)
    return float(raw.time.timestamp()) if raw.time is not None else math.nan


async def wait_count(
    js: Any, stream: str, target: int, idle_timeout_s: float, interval_s: float = 0.05,
) -> int:
    """Poll until the stream holds `target` messages, or nothing new for `idle_timeout_s`."""
    count, last_change, last_count = 0, time.monotonic(), -1
    while True:
        count = await stream_messages(js, stream)
        if count >= target:
            return count
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        elif now - last_change > idle_timeout_s:
            return count
        await asyncio.sleep(interval_s)


async def read_events(js: Any, stream: str, first_seq: int, last_seq: int) -> list[bytes]:
    """The payloads of stream messages first_seq..last_seq, through an ephemeral consumer."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    if last_seq < first_seq:
        return []
    wanted = last_seq - first_seq + 1
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq,
        ack_policy=AckPolicy.NONE, inactive_threshold=30.0, max_waiting=1,
    )
    info = await js.stream_info(stream)
    subject = info.config.subjects[0] if len(info.config.subjects) == 1 else ">"
    psub = await js.pull_subscribe(subject, stream=stream, config=config)
    out: list[bytes] = []
    try:
        while len(out) < wanted:
            try:
                msgs = await psub.fetch(min(2000, wanted - len(out)), timeout=5)
            except TimeoutError:
                break
            for msg in msgs:
                if msg.metadata.sequence.stream > last_seq:
                    return out
                out.append(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return out


def decode_readings(raws: Iterable[bytes]) -> tuple[list[tuple[str, int]], list[str], int]:
    """((device, seq) pairs in stream order, event ids, undecodable count)."""
    from schemas import REGISTRY
    from schemas.devices import DeviceReading

    pairs: list[tuple[str, int]] = []
    ids: list[str] = []
    bad = 0
    for raw in raws:
        try:
            event = REGISTRY.decode_as(raw, DeviceReading)
            pairs.append((event.data.device, int(event.data.payload["seq"])))
            ids.append(event.id)
        except Exception:
            bad += 1
    return pairs, ids, bad


# -- the peer: mosquitto bridged to mosquitto -----------------------------------------------


@dataclass
class SubscriberResult:
    received: int = 0
    t_first: float = math.nan
    t_last_new: float = math.nan  # wall clock of the last message not seen before
    pairs: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None


def subscriber_process(
    host: str, port: int, client_id: str, expected: int, device_prefix: str, ready: MpEvent,
    stop: MpEvent, results: Any, idle_timeout_s: float,
) -> None:
    """A center application: persistent session, QoS 1 on dev/#; collects (device, seq).

    Done once `expected` distinct pairs of devices named `device_prefix...` have arrived, or
    nothing arrived for `idle_timeout_s` after the first message.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    result = SubscriberResult()
    subscribed = threading.Event()
    lock = threading.Lock()
    seen: set[tuple[str, int]] = set()
    complete = threading.Event()
    last_activity = [time.monotonic()]

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe("dev/#", qos=1)

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        subscribed.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            device = msg.topic.split("/")[2]
            seq = int(json.loads(msg.payload)["seq"])
        except Exception:
            device, seq = "?", -1
        with lock:
            result.received += 1
            last_activity[0] = time.monotonic()
            if result.received == 1:
                result.t_first = now
            result.pairs.append((device, seq))
            if device.startswith(device_prefix) and (device, seq) not in seen:
                seen.add((device, seq))
                result.t_last_new = now
                if len(seen) >= expected:
                    complete.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_socket_open = _nodelay
    try:
        client.connect(host, port, keepalive=60)
        client.loop_start()
        if not subscribed.wait(READY_TIMEOUT_S):
            raise RuntimeError("no SUBACK")
        ready.set()
        while not complete.is_set() and not stop.is_set():
            complete.wait(0.2)
            with lock:
                idle = time.monotonic() - last_activity[0]
            if result.received and idle > idle_timeout_s:
                break
        # Let duplicates that trail the last new message arrive (they count too).
        time.sleep(0.5)
    except Exception as exc:
        result.error = repr(exc)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_stop()
        results.put(result)


class CenterSubscriber:
    """One `subscriber_process`; `start()` returns once it is subscribed."""

    def __init__(
        self, ctx: SpawnContext, host: str, port: int, client_id: str, expected: int,
        device_prefix: str, idle_timeout_s: float,
    ) -> None:
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=subscriber_process,
            args=(host, port, client_id, expected, device_prefix, self._ready, self._stop,
                  self._results, idle_timeout_s),
            name=client_id, daemon=True,
        )

    def start(self) -> None:
        self._proc.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.2):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("center subscriber not ready")

    def result(self, timeout_s: float) -> SubscriberResult:
        try:
            got: SubscriberResult = self._results.get(timeout=timeout_s)
        except queue.Empty:
            self._stop.set()
            try:
                got = self._results.get(timeout=10)
            except queue.Empty:
                got = SubscriberResult(error="no result")
        self.stop()
        return got

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


@contextlib.contextmanager
def bridged_mosquittos(base: Path, via_proxy: bool = True) -> Iterator[tuple[Any, Any, Any]]:
    """(edge, proxy, center): an edge mosquitto bridged through a LinkProxy to a center one
    (or straight to it, `via_proxy=False`: the proxy then exists but carries nothing).

    Bridge "dev/# out 1", cleansession false, persistence on at both ends, unbounded queues.
    """
    from bus.linkproxy import LinkProxy
    from bus.mosquitto import MosquittoBridge, MosquittoProcess, MosquittoSpec

    center = MosquittoProcess(
        MosquittoSpec(persistence=True, persistence_dir=base / "center-data"),
        base / "center", name="center",
    )
    proxy = LinkProxy(center.host, center.port, name="mosquitto-bridge")
    edge: MosquittoProcess | None = None
    try:
        center.start()
        proxy.start()
        bridge = MosquittoBridge(
            remote_host=proxy.listen_host if via_proxy else center.host,
            remote_port=proxy.port if via_proxy else center.port,
            topics=("dev/# out 1",),
        )
        edge = MosquittoProcess(
            MosquittoSpec(persistence=True, persistence_dir=base / "edge-data", bridge=bridge),
            base / "edge", name="edge",
        )
        edge.start()
        yield edge, proxy, center
    finally:
        if edge is not None:
            edge.stop()
        proxy.stop()
        center.stop()


def probe_bridge(edge: Any, center: Any, timeout_s: float = 20.0) -> float:
    """Publish probes at the edge until one reaches the center; returns the seconds it took.

    Probes use their own device id, before any trial subscriber exists (none sees them).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = subjects.mqtt_device_topic(SITE, "probe", CHANNEL)
    arrived = threading.Event()
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-sub", protocol=mqtt.MQTTv311)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-pub", protocol=mqtt.MQTTv311)
    sub.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
    sub.on_subscribe = lambda c, u, m, r, p: subscribed.set()
    sub.on_message = lambda c, u, m: arrived.set()
    started = time.monotonic()
    try:
        sub.connect(center.host, center.port)
        sub.loop_start()
        pub.connect(edge.host, edge.port)
        pub.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("probe subscriber got no SUBACK")
        deadline = started + timeout_s
        while not arrived.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no probe crossed the bridge within {timeout_s:.0f}s")
            pub.publish(topic, device_payload(0), qos=1)
            arrived.wait(0.1)
        return time.monotonic() - started
    finally:
        for client in (sub, pub):
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_stop()


# -- the forwarding site both edge benches time ----------------------------------------------


class ForwardingSiteRig:
    """A hub, one site on it and the site's agent forwarding readings to the center's
    `UP_READING`, warmed up (agent consumers declared, leaf interest in place) before
    anything is timed. The benches subclass it with their own baselines and trials."""

    up_stream = "UP_READING"

    def __init__(self, ctx: SpawnContext, base: Path) -> None:
        # Imported here: the spawned publishers import this module and need none of it.
        from bus.testing import EdgeTopology

        self.ctx = ctx
        self.base = base
        self.topology = EdgeTopology(base / "edge")
        self.agent = AgentProcess("", base)
        self.hub_nc: Any = None
        self.hub_js: Any = None

    async def start_site(
        self,
        *,
        via_proxy: bool = True,
        agent_args: Sequence[str] = (),
        profile_path: Path | None = None,
    ) -> Any:
        """Start hub, site (through the link proxy unless not `via_proxy`) and agent, then
        warm the whole path with a few readings; the site (`EdgeTopology` entry)."""
        from bus.streams import ensure_uplink_streams

        await asyncio.to_thread(self.topology.start_hub)
        site = await asyncio.to_thread(self.topology.add_site, SITE, via_proxy=via_proxy)
        self.hub_nc = await connect(self.topology.hub.url, "bench-center")
        self.hub_js = self.hub_nc.jetstream()
        await ensure_uplink_streams(self.hub_js)
        self.agent = AgentProcess(site.url, self.base, agent_args, profile_path=profile_path)
        self.agent.start()
        await wait_agent_ready(site.url, self.agent)
        warm = publisher_jobs(site.mqtt_host, site.mqtt_port, "warmup", 1, 1, 10)
        await asyncio.to_thread(Publishers(self.ctx, warm).run, 60.0)
        try:
            await wait_for(lambda: self.center_has(10), 60, "warm-up readings at the center")
        except TimeoutError:
            raise RuntimeError(f"agent not forwarding:\n{self.agent.log_tail()}") from None
        return site

    async def center_has(self, count: int) -> bool:
        return await stream_messages(self.hub_js, self.up_stream) >= count

    async def stop_site(self) -> None:
        """Stop the agent (its log printed if it failed), the hub connection and topology."""
        code = self.agent.stop()
        if code not in (0, None):
            print(f"agent exited {code}:\n{self.agent.log_tail()}")
        if self.hub_nc is not None:
            await self.hub_nc.close()
        self.topology.stop()
