"""The uplink against a real Mosquitto: delivery, order, ack-then-delete, outages, raw mode, inbound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Collector, LinkCutter, Mosquitto, assert_ordered_first_arrivals

from cloud_sync.envelope import KIND_JSON, encode_payload
from cloud_sync.settings import SyncSettings
from cloud_sync.spool import NewMessage, Spool
from cloud_sync.uplink import Uplink

pytestmark = pytest.mark.timeout(60)

FAST = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "connect_timeout_s": 3.0, "publish_timeout_s": 5.0,
        "flush_timeout_s": 1.0}


def settings(url: str | None, **kw: Any) -> SyncSettings:
    return SyncSettings.model_validate({"url": url, **FAST, **kw})


def msg(topic: str, i: int, **kw: Any) -> NewMessage:
    payload, kind = encode_payload({"i": i})
    return NewMessage(topic, payload, kind, **kw)


@contextlib.asynccontextmanager
async def running(s: SyncSettings, spool_path: Path, thing: str = "dev-1") -> AsyncIterator[tuple[Uplink, Spool]]:
    spool = Spool(spool_path)
    await spool.open()
    uplink = Uplink(s, spool, thing_name=thing)
    task = asyncio.create_task(uplink.run())
    try:
        yield uplink, spool
    finally:
        await uplink.close()
        await asyncio.wait_for(task, 15)
        await spool.close()


async def wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_backlog_is_delivered_in_order_and_deleted_after_puback(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    spool = Spool(tmp_path / "spool.db")
    await spool.open()
    ids = await spool.append_many([msg(f"t/{i % 3}", i) for i in range(3000)])
    await spool.close()
    async with running(settings(broker.url, batch_max_messages=50), tmp_path / "spool.db") as (uplink, spool):
        await collector.wait_ids(set(map(str, ids)))
        await wait_for(lambda: spool.stats().messages == 0, what="spool empty")
        assert spool.stats().counters["delivered"] == 3000
        assert uplink.counters["published_records"] == 3000
        assert uplink.counters["published_messages"] >= 3000 // 50
    assert Counter(collector.ids) == Counter(map(str, ids))  # no duplicates without outages
    assert_ordered_first_arrivals(collector.by_topic)
    assert collector.payloads[str(ids[7])] == {"i": 7}
    await collector.stop()


async def test_no_broker_configured_keeps_everything_spooled(tmp_path: Path) -> None:
    async with running(settings(None), tmp_path / "spool.db") as (uplink, spool):
        await spool.append_many([msg("a", i) for i in range(10)])
        await asyncio.sleep(0.1)
        assert uplink.status()["state"] == "disabled"
        assert spool.stats().messages == 10


async def test_link_cut_ten_times_while_publishing_loses_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    cutter = LinkCutter(broker.port)
    await cutter.restore()
    s = settings(cutter.url, batch_max_messages=20, max_inflight=8)
    acked: list[str] = []
    async with running(s, tmp_path / "spool.db") as (uplink, spool):
        async def produce() -> None:
            for i in range(4000):
                acked.append(await spool.append(msg(f"p/{i % 4}", i)))
                if i % 50 == 0:
                    await asyncio.sleep(0.001)

        producer = asyncio.create_task(produce())
        for _ in range(10):
            await wait_for(lambda: uplink.state == "connected", what="connected")
            await asyncio.sleep(0.05)
            await cutter.cut()
            await asyncio.sleep(0.05)
            await cutter.restore()
        await producer
        await collector.wait_ids(set(acked))
        await wait_for(lambda: spool.stats().messages == 0, what="spool drained")
        assert uplink.counters["connects"] >= 11
    counts = Counter(collector.ids)
    duplicates = sum(c - 1 for c in counts.values())
    # a duplicate is only ever a message in flight when the link went: <= window per outage
    assert duplicates <= 10 * s.max_inflight * s.batch_max_messages
    assert_ordered_first_arrivals(collector.by_topic)
    await cutter.cut()
    await collector.stop()


async def test_broker_stop_and_start_loses_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    acked: list[str] = []
    async with running(settings(broker.url), tmp_path / "spool.db") as (uplink, spool):
        acked += await spool.append_many([msg("s/a", i) for i in range(500)])
        await collector.wait_ids(set(acked))
        broker.stop()
        await wait_for(lambda: uplink.state != "connected", what="link down")
        acked += await spool.append_many([msg("s/a", i) for i in range(500, 1500)])
        assert spool.stats().messages >= 1000  # spooled while the broker is away
        broker.start()
        await collector.wait_ids(set(acked))
        await wait_for(lambda: spool.stats().messages == 0, what="spool drained")
        assert any(e["code"] in {"LINK_LOST", "CONNECT_FAILED"} for e in uplink.status()["errors"])
    assert set(collector.ids) == set(acked)
    assert_ordered_first_arrivals(collector.by_topic)
    await collector.stop()


async def test_raw_mode_sends_payload_unchanged_with_id_property(broker: Mosquitto, tmp_path: Path) -> None:
    got: list[tuple[str, bytes, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as cloud:
        await cloud.subscribe("raw/#", qos=1)
        async with running(settings(broker.url, envelope="raw"), tmp_path / "spool.db") as (_, spool):
            ids = await spool.append_many([NewMessage("raw/x", b"\x00\x01bin", "b"),
                                           NewMessage("raw/x", b'{"a":1}', KIND_JSON)])
            async with asyncio.timeout(10):
                async for m in cloud.messages:
                    props = dict(m.properties.UserProperty) if m.properties is not None else {}
                    got.append((m.topic.value, bytes(m.payload), props.get("nucleus-id")))  # type: ignore[arg-type]
                    if len(got) == 2:
                        break
    assert got == [("raw/x", b"\x00\x01bin", ids[0]), ("raw/x", b'{"a":1}', ids[1])]


async def test_expired_messages_are_dropped_and_counted(tmp_path: Path, broker: Mosquitto) -> None:
    spool = Spool(tmp_path / "spool.db", clock=lambda: 1000.0)
    await spool.open()
    await spool.append_many([msg("e", 0, ttl_s=5), msg("e", 1)])
    await spool.close()
    collector = Collector(broker.port)
    await collector.start()
    spool = Spool(tmp_path / "spool.db", clock=lambda: 1010.0)  # 10 s later
    await spool.open()
    uplink = Uplink(settings(broker.url), spool, thing_name="d")
    task = asyncio.create_task(uplink.run())
    await wait_for(lambda: len(collector.ids) == 1, what="delivery")
    await uplink.close()
    await task
    assert spool.stats().counters["dropped_expired"] == 1
    assert collector.payloads[collector.ids[0]] == {"i": 1}
    await spool.close()
    await collector.stop()


async def test_cloud_messages_reach_local_subscribers_and_oversized_ones_are_dropped(
        broker: Mosquitto, tmp_path: Path) -> None:
    s = settings(broker.url, max_inbound_bytes=1000)
    async with running(s, tmp_path / "spool.db") as (uplink, _):
        async with uplink.subscribe("nucleus/things/dev-1/cmd/#") as sub:
            await wait_for(lambda: uplink.state == "connected", what="connected")
            await wait_for(lambda: "nucleus/things/dev-1/cmd/#" in uplink.status()["subscriptions"])
            await asyncio.sleep(0.2)  # SUBACK
            async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
                await cloud.publish("nucleus/things/dev-1/cmd/a", b"x" * 5000, qos=1)  # oversized
                await cloud.publish("nucleus/things/dev-1/cmd/b", b"hello", qos=1)
                await cloud.publish("nucleus/things/other/cmd/b", b"not mine", qos=1)
            async with asyncio.timeout(10):
                m, dropped = await anext(sub)
        assert (m.topic, m.payload, dropped) == ("nucleus/things/dev-1/cmd/b", b"hello", 0)
        errors = uplink.status()["errors"]
        assert [e["code"] for e in errors] == ["INBOUND_OVERSIZED"]
        assert errors[0]["topic"] == "nucleus/things/dev-1/cmd/a"


async def test_status_document_is_retained_and_republished_on_connect(broker: Mosquitto, tmp_path: Path) -> None:
    async with running(settings(broker.url), tmp_path / "spool.db") as (uplink, _):
        uplink.publish_latest("nucleus/things/dev-1/status", json.dumps({"n": 1}).encode())
        await wait_for(lambda: uplink.state == "connected")
        await asyncio.sleep(0.2)
    async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
        await cloud.subscribe("nucleus/things/+/status", qos=1)
        async with asyncio.timeout(5):
            m = await anext(cloud.messages)
    assert m.retain and json.loads(bytes(m.payload)) == {"n": 1}  # type: ignore[arg-type]
