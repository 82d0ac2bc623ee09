"""`python -m edgebus.devices`: the demo's simulated devices, publishing readings over MQTT.

Each device is its own MQTT 3.1.1 connection to its site's listener (port from the site's
site.json) sending a QoS 1 JSON reading `{"value", "ts"}` per channel every interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus import subjects
from bus.log import configure_logging, get_logger
from bus.mqtt import AsyncMqttClient, MqttConfig, MqttError
from edge_agent.supervisor import SiteStateError, read_site_state

DEFAULT_CHANNELS = ("temp", "humidity")
_BASELINE = {"temp": (21.0, 3.0), "humidity": (45.0, 10.0), "pressure": (1013.0, 8.0)}
_PERIOD_S = 120.0  # one slow wave per two minutes, so the values visibly move
STOP_GRACE_S = 1.0
STATS_EVERY_S = 0.25  # often, so the demo's "sent" column rarely trails the center's count


def device_ids(count: int) -> list[str]:
    return [f"d{n:02d}" for n in range(1, count + 1)]


def reading(channel: str, device_index: int, now_s: float, rng: random.Random) -> dict[str, Any]:
    """A plausible reading: a slow wave per channel, shifted per device, with a little noise."""
    base, swing = _BASELINE.get(channel, (50.0, 10.0))
    phase = device_index * 0.7
    value = base + swing * math.sin(2 * math.pi * now_s / _PERIOD_S + phase) + rng.gauss(0, 0.1)
    return {"value": round(value, 2), "ts": int(now_s * 1000)}


@dataclass
class SiteCounters:
    sent: int = 0  # acknowledged by the site (PUBACK)
    unacked: int = 0  # no PUBACK in time (paho may still deliver it after a reconnect)
    connected: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "unacked": self.unacked, "connected": len(self.connected)}


@dataclass(frozen=True)
class DevicePlan:
    sites_dir: Path
    sites: tuple[str, ...]
    devices: int
    channels: tuple[str, ...]
    interval_s: float


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _site_address(plan: DevicePlan, site: str, stop: asyncio.Event) -> tuple[str, int] | None:
    """The site's MQTT host and port, once its supervisor has written site.json."""
    while not stop.is_set():
        try:
            state = read_site_state(plan.sites_dir / site)
            return state.local_host, state.mqtt_port
        except SiteStateError:
            await _wait(stop, 0.5)
    return None


async def _connect(
    site: str, device: str, address: tuple[str, int], stop: asyncio.Event
) -> AsyncMqttClient | None:
    """A connected client; retried while the site's listener is not up yet."""
    log = get_logger("edgebus.devices", site=site, device=device)
    delay = 0.5
    while not stop.is_set():
        client = AsyncMqttClient(
            MqttConfig(
                host=address[0],
                port=address[1],
                client_id=f"{site}-{device}",
                connect_timeout=5.0,
                ack_timeout=5.0,
            )
        )
        try:
            await client.connect()
            log.info("device_connected", broker=f"{address[0]}:{address[1]}")
            return client
        except (MqttError, OSError) as exc:
            log.info("device_connect_retry", error=str(exc), retry_in_s=delay)
        await _wait(stop, delay)
        delay = min(delay * 2, 5.0)
    return None


async def run_device(
    plan: DevicePlan, site: str, index: int, counters: SiteCounters, stop: asyncio.Event
) -> None:
    device = device_ids(plan.devices)[index]
    address = await _site_address(plan, site, stop)
    if address is None:
        return
    client = await _connect(site, device, address, stop)
    if client is None:
        return
    log = get_logger("edgebus.devices", site=site, device=device)
    rng = random.Random(f"{site}/{device}")
    counters.connected.add(device)
    try:
        # Spread devices over the interval rather than all publishing at the same instant.
        await _wait(stop, rng.uniform(0, plan.interval_s))
        while not stop.is_set():
            started = time.monotonic()
            for channel in plan.channels:
                if stop.is_set():
                    break
                topic = subjects.mqtt_device_topic(site, device, channel)
                body = json.dumps(reading(channel, index, time.time(), rng)).encode()
                try:
                    await client.publish(topic, body, qos=1)
                    counters.sent += 1
                except MqttError as exc:
                    counters.unacked += 1
                    log.warning("publish_unacked", topic=topic, error=str(exc))
            await _wait(stop, max(0.0, plan.interval_s - (time.monotonic() - started)))
    finally:
        counters.connected.discard(device)
        with contextlib.suppress(MqttError):
            # A site that is already gone would never answer a DISCONNECT.
            await (client.disconnect() if client.is_connected else client.abort())


def write_stats(path: Path, counters: dict[str, SiteCounters]) -> None:
    """Atomically, so the demo never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({site: c.as_dict() for site, c in counters.items()}))
    os.replace(tmp, path)


def read_stats(path: Path) -> dict[str, dict[str, int]]:
    """What `write_stats` wrote; empty before the first write."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def run(plan: DevicePlan, stats_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = {site: SiteCounters() for site in plan.sites}
    tasks = [
        asyncio.create_task(run_device(plan, site, index, counters[site], stop))
        for site in plan.sites
        for index in range(plan.devices)
    ]
    get_logger("edgebus.devices").info(
        "devices_started", sites=list(plan.sites), per_site=plan.devices
    )
    while not stop.is_set():
        if stats_file is not None:
            write_stats(stats_file, counters)
        await _wait(stop, STATS_EVERY_S)
    # A publish waiting for a PUBACK from a site that is stopping would hold us up to its
    # ack timeout: give the devices a moment, then cancel what is left.
    _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if stats_file is not None:
        write_stats(stats_file, counters)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgebus.devices", description=__doc__)
    p.add_argument("--sites-dir", type=Path, required=True, help="holds <site>/site.json")
    p.add_argument("--site", action="append", required=True, help="a site id (repeat)")
    p.add_argument("--devices", type=int, default=3, help="devices per site")
    p.add_argument("--channels", default=",".join(DEFAULT_CHANNELS), help="comma-separated")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between readings")
    p.add_argument("--stats-file", type=Path, help="write per-site counters here (JSON)")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    channels = tuple(c.strip() for c in args.channels.split(",") if c.strip())
    if args.devices < 1 or not channels or args.interval_s <= 0:
        get_logger("edgebus.devices").error("bad_arguments")
        return 2
    plan = DevicePlan(
        sites_dir=args.sites_dir,
        sites=tuple(subjects.site_id(s) for s in args.site),
        devices=args.devices,
        channels=tuple(subjects.token(c) for c in channels),
        interval_s=args.interval_s,
    )
    asyncio.run(run(plan, args.stats_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
