"""`bus.kvmirror.KvMirror` pause and resume on a real server: paused, the copy keeps its values
and takes its writer's own writes through `remember`; resumed, it catches up on the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.kv import KeyValue

from bus import kvmirror
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


async def test_barrier_waits_for_every_write_so_far_and_resyncs_a_stalled_copy(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-barrier"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-writer"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="BARRIERTEST"))
        mirror: KvMirror[str] = KvMirror(js, kv, "BARRIERTEST", _text)
        await mirror.start()
        writer = await other.jetstream().key_value("BARRIERTEST")
        for n in range(300):  # another replica's writes
            await writer.put(f"k{n}", str(n).encode())
        assert await mirror.barrier(5.0)
        assert len(mirror) == 300 and sorted(mirror.values()) == sorted(map(str, range(300)))

        await mirror.stop()  # the watcher is gone (as when its consumer is lost)
        await writer.put("late", b"x")
        assert not await mirror.barrier(0.3)  # no progress: it gives up, and resyncs
        assert mirror.resyncs == 1 and mirror.get("late") == "x"
        assert await mirror.barrier(1.0)
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_start_returns_with_every_write_made_before_it(hub: NatsServerProcess) -> None:
    """nats-py's watcher may say "loaded" before handing over what it loaded (it saw nothing
    pending and nothing taken yet); a restarted copy must not miss the newest write for it.
    Seen in about one restart in forty before `start` also waited for the revision."""
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-restart"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-restart-writer"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="RESTARTTEST"))
        writer = await other.jetstream().key_value("RESTARTTEST")
        for n in range(300):
            await writer.put(f"k{n}", b"v")
        mirror: KvMirror[str] = KvMirror(js, kv, "RESTARTTEST", _text)
        missed = []
        for n in range(60):
            await writer.put(f"late{n}", b"x")
            await mirror.start()
            if mirror.get(f"late{n}") != "x":
                missed.append(n)
            await mirror.stop()
        assert missed == []
        await js.purge_stream("KV_RESTARTTEST")  # keeps its last sequence, holds nothing
        await asyncio.wait_for(mirror.start(), 5)  # nothing to wait for
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_start_does_not_wait_for_a_newest_message_purged_away(
    hub: NatsServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvmirror, "LOAD_GRACE_S", 0.3)
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-removed"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="REMOVEDTEST"))
        await kv.put("a", b"1")
        newest = await kv.put("b", b"2")
        # As `KeyValue.purge_deletes` does with old delete markers: the stream keeps its last
        # sequence, and no watcher can deliver it.
        await js.purge_stream("KV_REMOVEDTEST", subject="$KV.REMOVEDTEST.b")
        state = (await js.stream_info("KV_REMOVEDTEST")).state
        assert state.last_seq == newest and state.messages == 1
        mirror: KvMirror[str] = KvMirror(js, kv, "REMOVEDTEST", _text)
        await asyncio.wait_for(mirror.start(), 3)  # the grace, not the 60 s load timeout
        assert dict(mirror.items()) == {"a": "1"}
        for _ in range(3):  # and it is no stall: no resync, no wait
            await mirror.check()
        assert mirror.resyncs == 0
        assert await mirror.barrier(0.5)
        await kv.put("c", b"3")  # a newer write is waited for again
        assert await mirror.barrier(5.0) and mirror.get("c") == "3"
        await mirror.stop()
    finally:
        await nc.close()


# -- the follower: its own pull consumer ------------------------------------------------------


async def _consumers(js: JetStreamContext, bucket: str) -> list[str]:
    return sorted(info.name for info in await js.consumers_info(f"KV_{bucket}"))


async def _eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.parametrize("told", [False, True], ids=["lazy", "on_change"])
async def test_deletes_and_purges_are_followed_and_an_empty_value_is_a_value(
    hub: NatsServerProcess, told: bool
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-deletes"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-deleter"))
    changes: list[tuple[str, str | None, str | None]] = []
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="DELETETEST"))
        writer = await other.jetstream().key_value("DELETETEST")
        for key in ("a", "b", "c", "gone"):
            await writer.put(key, key.encode())
        await writer.delete("gone")  # a delete marker in the initial load
        on_change = (lambda k, before, after: changes.append((k, before, after))) if told else None
        mirror: KvMirror[str] = KvMirror(js, kv, "DELETETEST", _text, on_change)
        await mirror.start()
        assert dict(mirror.items()) == {"a": "a", "b": "b", "c": "c"}
        assert mirror.revision("gone") == 5  # a deleted key keeps its marker's revision

        await writer.delete("a")  # revision 6
        await writer.purge("b")  # 7
        await writer.put("c", b"")  # an empty value is a value, not a delete
        assert await mirror.barrier(5.0)
        assert dict(mirror.items()) == {"c": ""}
        assert mirror.revision("a") == 6 and mirror.revision("b") == 7
        if told:
            assert changes == [("a", "a", None), ("b", "b", None), ("c", "c", "")]
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_followed_values_are_parsed_only_when_read_without_on_change(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-lazy"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-lazy-writer"))
    parsed: list[tuple[str, bytes]] = []

    def counting(key: str, value: bytes) -> str | None:
        parsed.append((key, value))
        return value.decode()

    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="LAZYTEST"))
        writer = await other.jetstream().key_value("LAZYTEST")
        for n in range(20):
            await writer.put(f"k{n}", b"0")
        mirror: KvMirror[str] = KvMirror(js, kv, "LAZYTEST", counting)
        await mirror.start()
        assert parsed == []  # loaded, not parsed
        newest = 0
        for round_ in range(1, 4):  # every key written again, three times, each one followed
            for n in range(20):
                newest = await writer.put(f"k{n}", str(round_).encode())
            assert await mirror.barrier(5.0)
        assert parsed == [] and mirror.applied == newest
        assert mirror.get("k7") == "3"
        assert sorted(parsed) == sorted((f"k{n}", b"3") for n in range(20))  # the newest, once
        assert len(mirror) == 20 and set(mirror.values()) == {"3"} and len(parsed) == 20
        assert mirror.revision("k19") == newest
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


def _strict(key: str, value: bytes) -> str | None:
    """Rejects b"bad" (as a model validation would: skipped)."""
    return None if value == b"bad" else value.decode()


@pytest.mark.parametrize("told", [False, True], ids=["lazy", "on_change"])
async def test_a_rejected_value_leaves_the_newest_accepted_one_in_place(
    hub: NatsServerProcess, told: bool
) -> None:
    """Parsed on arrival (with `on_change`) or lazily, the same: a rejected value is skipped,
    the one before it stays, with its revision (a compare-and-set writer uses it)."""
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-rejected"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-rejecter"))
    changes: list[tuple[str, str | None, str | None]] = []
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="REJECTTEST"))
        writer = await other.jetstream().key_value("REJECTTEST")
        await writer.put("a", b"1")
        await writer.put("only-bad", b"bad")
        on_change = (lambda k, before, after: changes.append((k, before, after))) if told else None
        mirror: KvMirror[str] = KvMirror(js, kv, "REJECTTEST", _strict, on_change)
        await mirror.start()

        async def put(key: str, value: bytes) -> int:
            revision = await writer.put(key, value)
            assert await mirror.barrier(5.0)  # followed one by one: none skipped as superseded
            return revision

        two = await put("a", b"2")
        await put("a", b"bad")
        assert mirror.get("a") == "2" and mirror.revision("a") == two
        assert mirror.get("only-bad") is None and mirror.revision("only-bad") == 0
        # Many writes of one key, never read, the newest rejected: the one before it stays.
        for n in range(3, 3 + 2 * kvmirror._MAX_UNPARSED):
            last_good = await put("b", str(n).encode())
        await put("b", b"bad")
        await put("b", b"bad")
        assert mirror.revision("b") == last_good and mirror.get("b") == str(n)
        await put("only-bad", b"bad")
        assert len(mirror) == 2 and "only-bad" not in dict(mirror.items())
        # The next accepted write is taken again.
        three = await put("a", b"3")
        assert mirror.get("a") == "3" and mirror.revision("a") == three
        if told:
            assert [c for c in changes if c[0] == "a"] == [("a", "1", "2"), ("a", "2", "3")]
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_a_deleted_consumer_is_replaced_and_the_copy_caught_up(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-lost"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-lost-writer"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="LOSTTEST"))
        writer = await other.jetstream().key_value("LOSTTEST")
        await writer.put("a", b"1")
        mirror: KvMirror[str] = KvMirror(js, kv, "LOSTTEST", _text)
        await mirror.start()
        [first] = await _consumers(js, "LOSTTEST")
        await js.delete_consumer("KV_LOSTTEST", first)
        await writer.put("a", b"2")
        await writer.put("b", b"x")
        # No watchdog asked: the follower itself starts over with a new consumer.
        await _eventually(lambda: mirror.get("a") == "2" and mirror.get("b") == "x", "caught up")
        assert mirror.resyncs == 1
        [second] = await _consumers(js, "LOSTTEST")
        assert second != first
        await writer.put("c", b"y")
        assert await mirror.barrier(5.0) and mirror.get("c") == "y"
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_a_server_restart_ends_in_a_new_consumer_and_a_current_copy(
    hub: NatsServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server forgets the follower's (in-memory) consumer: pull requests then find no
    responder, for good. The follower notices when quiet and starts over."""
    monkeypatch.setattr(kvmirror, "IDLE_CHECK_S", 0.3)
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-restart"))
    other = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-restart-w"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="SERVERRESTART"))
        writer = await other.jetstream().key_value("SERVERRESTART")
        await writer.put("a", b"1")
        mirror: KvMirror[str] = KvMirror(js, kv, "SERVERRESTART", _text)
        await mirror.start()
        await asyncio.to_thread(hub.stop)
        await asyncio.to_thread(hub.start)
        await _eventually(lambda: nc.is_connected and other.is_connected, "reconnected")
        for _ in range(50):  # JetStream may still be recovering the stream
            try:
                await writer.put("a", b"2")
                break
            except Exception:
                await asyncio.sleep(0.1)
        await _eventually(lambda: mirror.get("a") == "2", "the write after the restart")
        assert mirror.resyncs >= 1
        assert len(await _consumers(js, "SERVERRESTART")) == 1
        await writer.put("b", b"x")
        assert await mirror.barrier(5.0) and mirror.get("b") == "x"
        await mirror.stop()
    finally:
        await other.close()
        await nc.close()


async def test_stop_and_pause_delete_the_consumer(hub: NatsServerProcess) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-stop"))
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="STOPTEST"))
        await kv.put("a", b"1")
        mirror: KvMirror[str] = KvMirror(js, kv, "STOPTEST", _text)
        await mirror.start()
        [first] = await _consumers(js, "STOPTEST")
        info = await js.consumer_info("KV_STOPTEST", first)
        assert info.config.ack_policy == AckPolicy.NONE
        assert info.config.inactive_threshold  # a dead process's consumer goes away
        await mirror.pause()
        assert await _consumers(js, "STOPTEST") == []
        await mirror.resume()
        [second] = await _consumers(js, "STOPTEST")
        assert second != first  # one name per start: never an old one's
        await mirror.stop()
        assert await _consumers(js, "STOPTEST") == []
    finally:
        await nc.close()


async def test_a_failing_on_change_is_logged_and_the_follower_starts_over(
    hub: NatsServerProcess,
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-failing"))
    failures = [RuntimeError("a bug in the callback")]
    told: list[tuple[str, str | None, str | None]] = []

    def on_change(key: str, before: str | None, after: str | None) -> None:
        if failures:
            raise failures.pop()
        told.append((key, before, after))

    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="FAILTEST"))
        mirror: KvMirror[str] = KvMirror(js, kv, "FAILTEST", _text, on_change)
        await mirror.start()
        await kv.put("a", b"1")  # its callback raises: the task must not just end
        await _eventually(lambda: mirror.resyncs == 1, "a new consumer")
        await kv.put("b", b"2")
        assert await mirror.barrier(5.0) and mirror.get("b") == "2" and mirror.get("a") == "1"
        # The change whose callback failed was not taken: the reload told it again.
        assert told == [("a", None, "1"), ("b", None, "2")]
        await mirror.stop()
    finally:
        await nc.close()


# -- reloads: what changed while the follower was away ---------------------------------------


async def _change_while_away(kv: KeyValue, js: JetStreamContext, bucket: str) -> None:
    """a changed, b deleted (its marker stays), gone deleted and purged away, d new."""
    await kv.put("a", b"2")
    await kv.delete("b")
    await kv.delete("gone")
    await js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.gone")
    await kv.put("d", b"1")


async def _fill(kv: KeyValue) -> None:
    for key in ("a", "b", "c", "gone"):
        await kv.put(key, b"1")


EXPECTED_TOLD = [("a", "1", "2"), ("b", "1", None), ("d", None, "1"), ("gone", "1", None)]


@pytest.mark.parametrize("told", [False, True], ids=["lazy", "on_change"])
async def test_a_resumed_copy_is_told_what_changed_while_paused_and_drops_purged_keys(
    hub: NatsServerProcess, told: bool
) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-reload"))
    changes: list[tuple[str, str | None, str | None]] = []
    try:
        js = nc.jetstream()
        bucket = f"RELOAD{int(told)}"
        kv = await ensure_kv(js, KvSpec(bucket=bucket))
        await _fill(kv)
        on_change = (lambda *change: changes.append(change)) if told else None
        mirror: KvMirror[str] = KvMirror(js, kv, bucket, _text, on_change)
        await mirror.start()
        assert changes == [] and len(mirror) == 4  # the first load is read, not told
        await mirror.pause()
        await _change_while_away(kv, js, bucket)
        await mirror.resume()
        assert dict(mirror.items()) == {"a": "2", "c": "1", "d": "1"}
        assert mirror.revision("gone") == 0
        assert sorted(changes) == (EXPECTED_TOLD if told else [])
        await kv.put("gone", b"back")  # a purged key written again is a new key
        assert await mirror.barrier(5.0) and mirror.get("gone") == "back"
        if told:
            assert changes[-1] == ("gone", None, "back")
        await mirror.stop()
    finally:
        await nc.close()


async def test_a_replaced_consumer_tells_what_changed_meanwhile(hub: NatsServerProcess) -> None:
    """Changes made while the follower's consumer is gone are told (by its reload) as if it
    had followed them."""
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-reload-lost"))
    changes: list[tuple[str, str | None, str | None]] = []
    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="RELOADLOST"))
        await _fill(kv)
        mirror: KvMirror[str] = KvMirror(
            js, kv, "RELOADLOST", _text, lambda *change: changes.append(change)
        )
        await mirror.start()
        [consumer] = await _consumers(js, "RELOADLOST")
        await js.delete_consumer("KV_RELOADLOST", consumer)
        await _change_while_away(kv, js, "RELOADLOST")
        await _eventually(lambda: mirror.resyncs == 1 and len(changes) >= 4, "four changes told")
        assert sorted(changes, key=str) == EXPECTED_TOLD, changes
        assert dict(mirror.items()) == {"a": "2", "c": "1", "d": "1"}
        await mirror.stop()
    finally:
        await nc.close()


async def test_a_removal_whose_on_change_failed_is_told_again(hub: NatsServerProcess) -> None:
    nc = await open_connection(NatsConfig.from_url(hub.url, name="kvmirror-gone-failing"))
    failures = [RuntimeError("a bug in the callback")]
    changes: list[tuple[str, str | None, str | None]] = []

    def on_change(key: str, before: str | None, after: str | None) -> None:
        if key == "gone" and failures:
            raise failures.pop()
        changes.append((key, before, after))

    try:
        js = nc.jetstream()
        kv = await ensure_kv(js, KvSpec(bucket="GONEFAIL"))
        await _fill(kv)
        mirror: KvMirror[str] = KvMirror(js, kv, "GONEFAIL", _text, on_change)
        await mirror.start()
        await mirror.pause()
        await kv.delete("gone")
        await js.purge_stream("KV_GONEFAIL", subject="$KV.GONEFAIL.gone")
        await kv.put("d", b"1")  # a newest revision that can be delivered: no load grace
        await mirror.resume()  # its reload's callback fails: the follower starts over
        await _eventually(lambda: ("gone", "1", None) in changes, "the removal told again")
        assert mirror.resyncs == 1 and mirror.get("gone") is None and len(mirror) == 4
        await mirror.stop()
    finally:
        await nc.close()
