"""Real-process site rig for end-to-end tests: `python -m edge_agent` processes, paho QoS 1
devices publishing per-device `seq`, and readers of what the center's streams really hold."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessageInfo

from bus import subjects
from bus.client import Bus
from bus.config import NatsConfig
from schemas import REGISTRY
from schemas.devices import DeviceReading
from schemas.site import SiteStatusQuery, SiteStatusReport

REPO = Path(__file__).resolve().parents[1]
Key = tuple[str, str]  # (site, device)


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll `condition` (sync or async) until true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"after {timeout:.1f}s: {detail}")
        await asyncio.sleep(interval)


# -- the agent as a real process ---------------------------------------------------------


class AgentProcess:
    """`python -m edge_agent ...` for one site; every start appends to the same log file."""

    def __init__(self, site: str, nats_url: str, data_dir: Path, *extra: str) -> None:
        self.site = site
        self.log_path = data_dir.parent / f"agent-{site}.log"
        self.argv = [
            sys.executable,
            "-m",
            "edge_agent",
            "--site",
            site,
            "--nats",
            nats_url,
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert not self.running, "already running"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=REPO, stdout=log, stderr=log, env=env
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal_kill(self) -> None:
        """Send SIGKILL now (from a callback, say); `kill()` also waits for the exit."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def kill(self) -> None:
        """kill -9: no goodbye, nothing flushed, nothing handed back."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.signal_kill()
        await asyncio.wait_for(self.proc.wait(), 10)
        assert self.proc.returncode == -signal.SIGKILL

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return "(no log)"


async def observer(url: str, site: str) -> Bus:
    """A local service's connection to the site's server (reconnects for ever)."""
    return await Bus.connect(NatsConfig.from_url(url, name=f"observer-{site}"), scope=site)


async def status(bus: Bus, site: str, timeout: float = 1.0) -> SiteStatusReport:
    answer = await bus.request(
        subjects.local_control(site, "status"), SiteStatusQuery(), SiteStatusReport, timeout=timeout
    )
    return answer.data


async def try_status(bus: Bus, site: str) -> SiteStatusReport | None:
    try:
        return await status(bus, site, timeout=0.5)
    except Exception:
        return None


async def wait_agent_up(bus: Bus, agent: AgentProcess, timeout: float = 30.0) -> SiteStatusReport:
    """Until the agent process answers a local status request (its parts are all started)."""
    deadline = time.monotonic() + timeout
    while True:
        if not agent.running:
            raise AssertionError(f"agent {agent.site} exited:\n{agent.log_tail()}")
        report = await try_status(bus, agent.site)
        if report is not None:
            return report
        if time.monotonic() >= deadline:
            raise AssertionError(f"agent {agent.site} silent for {timeout}s:\n{agent.log_tail()}")
        await asyncio.sleep(0.1)


# -- devices: paho QoS 1 clients ----------------------------------------------------------


class Device:
    """One paho MQTT 3.1.1 client publishing `{"seq": n, "t": unix time}` with QoS 1.

    A seq counts as acked only once paho saw its PUBACK (paho's `on_publish` for its mid).
    While disconnected paho keeps the messages and (re)sends them after reconnecting, the
    in-flight ones with the DUP flag: the device side of "at least once".

    Paced publishing holds new readings from a disconnect until everything sent before is
    acked: paho 2.2 sends a publish made during its reconnect (after it reset its in-flight
    window, before the CONNACK handler re-sends the backlog) ahead of that backlog. Seen
    here: seq 210 reached the broker before 106..209. That reorder is the device's own.
    """

    def __init__(self, site: str, name: str, host: str, port: int, max_inflight: int) -> None:
        self.site = site
        self.name = name
        self.topic = subjects.mqtt_device_topic(site, name, "temp")
        self.connected = threading.Event()
        self.connects = 0
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"{site}-{name}")
        self.client.max_inflight_messages_set(max_inflight)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._sent: list[tuple[int, MQTTMessageInfo]] = []
        # Appended by paho's thread without our lock: paho may call on_publish while
        # `publish` (holding our lock) waits for paho's own. list.append is atomic.
        self._acked_mids: list[int] = []
        self._held = False  # from a disconnect until the backlog is acked (see above)

    def _on_connect(
        self, client: Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not reason.is_failure:
            self.connects += 1
            self.connected.set()

    def _on_disconnect(self, client: Client, userdata: Any, *args: Any) -> None:
        self._held = True
        self.connected.clear()

    def may_publish(self) -> bool:
        """False while disconnected, and after reconnecting until the backlog is acked."""
        if not self.connected.is_set():
            return False
        if self._held and len(self.acked()) == self.sent:
            self._held = False
        return not self._held

    def _on_publish(self, client: Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._acked_mids.append(mid)

    def start(self) -> None:
        self.client.connect_async(self._host, self._port, keepalive=10)
        self.client.loop_start()

    def publish(self, **extra: Any) -> int:
        """Queue the next seq (sent at once when connected, else after reconnecting)."""
        with self._lock:
            seq = len(self._sent)
            payload = json.dumps({"seq": seq, "t": time.time(), **extra}).encode()
            info = self.client.publish(self.topic, payload, qos=1)
            self._sent.append((seq, info))
        return seq

    @property
    def sent(self) -> int:
        return len(self._sent)

    def acked(self) -> list[int]:
        mids = set(self._acked_mids[:])  # fewer than 65536 publishes per device: no mid reuse
        with self._lock:
            return [seq for seq, info in self._sent if info.mid in mids]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """Devices of one site; blocking API (call through asyncio.to_thread from async tests)."""

    def __init__(
        self,
        site: str,
        port: int,
        names: Iterable[str],
        *,
        host: str = "127.0.0.1",
        max_inflight: int = 50,
    ) -> None:
        self.site = site
        self.devices = [Device(site, name, host, port, max_inflight) for name in names]
        self._pacer: threading.Thread | None = None
        self._stop_pacing = threading.Event()

    def connect(self, timeout: float = 10.0) -> None:
        for device in self.devices:
            device.start()
        deadline = time.monotonic() + timeout
        for device in self.devices:
            if not device.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"device {device.name} not connected within {timeout}s")

    def burst(self, per_device: int) -> None:
        """`per_device` readings from every device, round-robin, as fast as paho queues them."""
        for _ in range(per_device):
            for device in self.devices:
                device.publish()

    def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_count() < self.sent_count():
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.site}: {self.acked_count()} of {self.sent_count()} acked in {timeout}s"
                )
            time.sleep(0.02)

    def start_paced(self, per_device_rate: float) -> None:
        """Keep publishing from every device at `per_device_rate` per second until stopped."""
        self._stop_pacing.clear()
        period = 1.0 / per_device_rate

        def pace() -> None:
            next_at = time.monotonic()
            while not self._stop_pacing.is_set():
                for device in self.devices:
                    if device.may_publish():
                        device.publish()
                next_at += period
                self._stop_pacing.wait(max(0.0, next_at - time.monotonic()))

        self._pacer = threading.Thread(target=pace, name=f"pacer-{self.site}", daemon=True)
        self._pacer.start()

    def stop_paced(self) -> None:
        self._stop_pacing.set()
        if self._pacer is not None:
            self._pacer.join(5)
            self._pacer = None

    def sent_count(self) -> int:
        return sum(d.sent for d in self.devices)

    def acked_count(self) -> int:
        return sum(len(d.acked()) for d in self.devices)

    def acked(self) -> dict[Key, list[int]]:
        return {(self.site, d.name): d.acked() for d in self.devices}

    def sent(self) -> dict[Key, list[int]]:
        return {(self.site, d.name): list(range(d.sent)) for d in self.devices}

    def close(self) -> None:
        self.stop_paced()
        for device in self.devices:
            device.close()


# -- what the center holds ------------------------------------------------------------------


@dataclass(frozen=True)
class Arrived:
    """One reading as stored in the center's UP_READING stream."""

    event_id: str
    site: str
    device: str
    seq: int
    sent_at: float | None  # the device's clock (same machine)

    @property
    def key(self) -> Key:
        return (self.site, self.device)


async def stream_count(js: JetStreamContext, stream: str = "UP_READING") -> int:
    return int((await js.stream_info(stream)).state.messages)


async def stream_raw(js: JetStreamContext, stream: str, subject: str) -> list[bytes]:
    """Every message of `stream`, in stream order (an ordered consumer; bounded waits)."""
    total = await stream_count(js, stream)
    if not total:
        return []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        return [(await sub.next_msg(timeout=5)).data for _ in range(total)]
    finally:
        await sub.unsubscribe()


async def center_readings(js: JetStreamContext) -> list[Arrived]:
    raws = await stream_raw(js, "UP_READING", subjects.up_all("reading"))
    out = []
    for raw in raws:
        event = REGISTRY.decode_as(raw, DeviceReading)
        payload = event.data.payload
        out.append(
            Arrived(event.id, event.data.site, event.data.device, payload["seq"], payload.get("t"))
        )
    return out


def by_key(arrived: Sequence[Arrived]) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = defaultdict(list)
    for item in arrived:
        out[item.key].append(item.seq)
    return dict(out)


@dataclass(frozen=True)
class Audit:
    """Exactly-once figures of what the center holds against what devices sent."""

    total: int
    duplicate_ids: int
    duplicate_readings: int  # same (site, device, seq) stored more than once
    missing: dict[Key, list[int]]  # expected but absent
    unexpected: dict[Key, list[int]]
    # Per device: places where a seq is below the one before (first copies only: a
    # duplicate is counted above, not again as a reorder).
    out_of_order: dict[Key, int]

    def summary(self) -> str:
        missing = sum(len(v) for v in self.missing.values())
        return (
            f"{self.total} at the center: {self.duplicate_ids} duplicate ids, "
            f"{self.duplicate_readings} duplicate (device, seq), {missing} missing, "
            f"{sum(len(v) for v in self.unexpected.values())} unexpected, "
            f"order breaks {dict(self.out_of_order)}"
        )


def audit(arrived: Sequence[Arrived], expected: Mapping[Key, Sequence[int]]) -> Audit:
    ids = Counter(a.event_id for a in arrived)
    readings = Counter((a.site, a.device, a.seq) for a in arrived)
    got = by_key(arrived)
    missing: dict[Key, list[int]] = {}
    unexpected: dict[Key, list[int]] = {}
    for key in set(expected) | set(got):
        want, have = set(expected.get(key, ())), set(got.get(key, ()))
        if want - have:
            missing[key] = sorted(want - have)
        if have - want:
            unexpected[key] = sorted(have - want)
    breaks = {}
    for key, seqs in got.items():
        firsts = list(dict.fromkeys(seqs))
        count = sum(1 for a, b in itertools.pairwise(firsts) if b < a)
        if count:
            breaks[key] = count
    return Audit(
        total=len(arrived),
        duplicate_ids=sum(n - 1 for n in ids.values()),
        duplicate_readings=sum(n - 1 for n in readings.values()),
        missing=missing,
        unexpected=unexpected,
        out_of_order=breaks,
    )


def assert_exactly_once(arrived: Sequence[Arrived], expected: Mapping[Key, Sequence[int]]) -> None:
    """Exactly the expected readings: none missing, none extra, no duplicate by event id nor
    by (device, seq), every device's readings in its own seq order."""
    result = audit(arrived, expected)
    assert result.duplicate_ids == 0, result.summary()
    assert result.duplicate_readings == 0, result.summary()
    assert not result.missing, result.summary()
    assert not result.unexpected, result.summary()
    assert not result.out_of_order, result.summary()
    assert result.total == sum(len(v) for v in expected.values()), result.summary()
