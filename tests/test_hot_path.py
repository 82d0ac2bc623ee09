"""The edge hot path's shortcuts (direct PubAcks, events encoded once, quick probes while no
one answers) behave as the paths they replace; the append is checked on a real JetStream."""

from __future__ import annotations

import json
from typing import Any

import nats
import pytest
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from bus.forwarder import ForwarderConfig, backoff_delay, retry_delay
from bus.jspublish import pub_ack
from bus.natsserver import NatsServerProcess
from bus.replaylog import STREAM, LogEntry, ReplayLog
from bus.streams import site_replay_stream
from schemas import REGISTRY, new_event
from schemas.devices import DeviceReading

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "reply",
    [
        {"stream": "REPLAY", "seq": 7},
        {"stream": "UP_READING", "domain": "hub", "seq": 12_345},
        {"stream": "UP_READING", "domain": "hub", "seq": 9, "duplicate": True},
        {"stream": "B", "seq": 3, "batch": "b-1", "count": 2},  # not plain: nats-py's path
    ],
)
def test_pub_ack_equals_nats_py_from_response(reply: dict[str, Any]) -> None:
    assert pub_ack(dict(reply)) == PubAck.from_response(dict(reply))


def test_retry_delay_is_short_while_nobody_answers_and_backs_off_otherwise() -> None:
    config = ForwarderConfig(backoff_min_s=0.2, backoff_max_s=10.0, unreachable_probe_s=0.5)
    # Link down for long: probes stay at the short pace instead of reaching 10 s.
    assert retry_delay(1, NoStreamResponseError(), config) == 0.2
    assert retry_delay(30, NoStreamResponseError(), config) == 0.5
    # The center answered with an error, or nothing came back: the full exponential backoff.
    for cause in (APIError(code=503, description="jetstream not ready"), TimeoutError(), None):
        assert retry_delay(30, cause, config) == 10.0
        assert retry_delay(3, cause, config) == backoff_delay(3, 0.2, 10.0)
    with pytest.raises(ValueError):
        ForwarderConfig(unreachable_probe_s=0)


async def test_replay_log_appends_pre_encoded_bytes_verbatim(hub: NatsServerProcess) -> None:
    nc = await nats.connect(hub.url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        spec = site_replay_stream("s1", max_bytes=1024**2, max_age_s=60, policy="refuse_new")
        log = ReplayLog(nc, "s1", spec, batch_size=10, ack_wait_s=5)
        await log.declare()
        reading = DeviceReading(site="s1", device="d1", channel="temp", payload={"seq": 1})
        plain, given = new_event(reading, source="/sites/s1"), new_event(reading, source="/s")
        # Same event, other spelling: only verbatim use stores these exact bytes.
        spelled = json.dumps(json.loads(REGISTRY.encode(given)), indent=1).encode()
        results = await log.append_batch(
            [LogEntry("reading", "d1", plain), LogEntry("reading", "d1", given, encoded=spelled)]
        )
        js = nc.jetstream()
        stored = [await js.get_msg(STREAM, r.seq) for r in results if r.seq is not None]
        assert [m.data for m in stored] == [REGISTRY.encode(plain), spelled]
        assert REGISTRY.decode_as(stored[1].data or b"", DeviceReading).id == given.id
        assert [m.headers and m.headers["Edgebus-Event-Id"] for m in stored] == [
            plain.id,
            given.id,
        ]
    finally:
        await nc.close()
