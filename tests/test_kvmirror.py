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


async def test_own_writes_remembered_as_bytes_are_parsed_once_when_first_read(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-encoded"))
    parsed: list[str] = []

    def counting(key: str, value: bytes) -> str | None:
        parsed.append(key)
        return value.decode()

    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="ENCODEDTEST"))
        mirror: KvMirror[str] = KvMirror(js, kv, "ENCODEDTEST", counting)
        await mirror.start()
        await mirror.pause()
        first = await kv.put("a", b"1")
        mirror.remember_encoded("a", b"1", first)
        second = await kv.put("a", b"2")
        mirror.remember_encoded("a", b"2", second)
        mirror.remember_encoded("a", b"stale", first)  # older than what we have: ignored
        assert parsed == [] and mirror.revision("a") == second  # nothing parsed yet
        assert mirror.get("a") == "2" and parsed == ["a"]  # the newest, parsed once
        assert dict(mirror.items()) == {"a": "2"} and len(mirror) == 1 and parsed == ["a"]
        third = await kv.put("a", b"3")
        mirror.remember_encoded("a", b"3", third)
        deleted = await js.publish("$KV.ENCODEDTEST.a", b"", headers={"KV-Operation": "DEL"})
        mirror.remember("a", None, deleted.seq)  # a later delete drops the unparsed write
        assert mirror.get("a") is None and parsed == ["a"]
        await mirror.resume()  # the watcher's load agrees
        assert mirror.get("a") is None
        await mirror.stop()
    finally:
        await nc.close()
