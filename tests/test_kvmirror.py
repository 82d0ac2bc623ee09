"""`bus.kvmirror.KvMirror` pause and resume on a real server: paused, the copy keeps its values
and takes its writer's own writes through `remember`; resumed, it catches up on the rest."""

from __future__ import annotations

import asyncio

from bus.client import open_connection
from bus.config import NatsConfig
from bus.kvmirror import KvMirror
from bus.natsserver import NatsServerProcess
from bus.streams import KvSpec, ensure_kv


def _text(key: str, value: bytes) -> str | None:
    return value.decode()


async def test_a_paused_mirror_keeps_its_values_and_catches_up_on_resume(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-test"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="MIRRORTEST"))
        await kv.put("a", b"1")
        mirror: KvMirror[str] = KvMirror(js, kv, "MIRRORTEST", _text)
        await mirror.start()
        assert mirror.get("a") == "1"

        await mirror.pause()
        assert mirror.paused
        ours = await kv.put("a", b"2")  # the writer's own write, taken directly
        mirror.remember("a", "2", ours)
        await kv.put("b", b"from someone else")
        await asyncio.sleep(0.3)
        assert mirror.get("a") == "2" and mirror.get("b") is None  # not watching
        await mirror.check()  # a paused copy is not "stalled": no resync
        assert mirror.resyncs == 0

        await mirror.resume()
        assert not mirror.paused
        assert mirror.get("b") == "from someone else" and mirror.get("a") == "2"
        await kv.put("c", b"3")
        for _ in range(100):
            if mirror.get("c") == "3":
                break
            await asyncio.sleep(0.02)
        assert mirror.get("c") == "3"  # following again
        await mirror.stop()
    finally:
        await nc.close()
