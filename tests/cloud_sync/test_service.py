"""CloudSync over real IPC: cloud.publish / cloud.subscribe under policy, bad input, sync.status, device status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Collector, LinkCutter, Mosquitto, Policy, TokenAuth
from test_uplink import FAST, wait_for

from cloud_sync.service import MQTTPROXY, OP_PUBLISH_IOT, OP_SUBSCRIBE_IOT, CloudSync
from cloud_sync.settings import SyncSettings
from ipc import Client, InvalidArguments, LimitExceeded, Unauthorized
from ipc.core import IpcCore
from ipc.server import IpcServer

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, url: str | None, device: dict[str, Any] | None = None,
                **kw: Any) -> AsyncIterator[tuple[CloudSync, Client]]:
    auth, policy = TokenAuth(), Policy()
    auth.add("tok", "com.example.App")
    policy.allow("com.example.App", MQTTPROXY, OP_PUBLISH_IOT, "fleet/dev-1/alarm")
    policy.allow("com.example.App", MQTTPROXY, OP_SUBSCRIBE_IOT, "fleet/dev-1/cmd/#")
    core = IpcCore(auth, policy)
    settings = SyncSettings.model_validate({"url": url, **FAST, "status_check_s": 0.05, **kw})
    sync = CloudSync(settings, core, spool_path=tmp_path / "spool.db", thing_name="dev-1",
                     status_provider=(lambda: dict(device)) if device is not None else None)
    sync.register_operations()
    sock_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="cs"))
    task = asyncio.create_task(sync.run())
    await sync.wait_ready()
    try:
        async with IpcServer(core, sock_dir / "ipc.sock") as _, Client(sock_dir / "ipc.sock", "tok") as client:
            yield sync, client
    finally:
        await sync.close()
        await task
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_publish_to_cloud_through_ipc_arrives_with_its_id(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    async with stack(tmp_path, broker.url) as (_sync, client):
        result = await client.call("cloud.publish", {"topic": "fleet/dev-1/alarm", "payload": {"level": 3},
                                                     "priority": 5, "ttl_s": 3600})
        await client.publish_to_cloud("fleet/dev-1/alarm", b"\x00raw")
        await client.publish_to_cloud("fleet/dev-1/alarm", "text")
        await wait_for(lambda: len(collector.ids) == 3, what="3 deliveries")
        assert collector.ids[0] == result["id"]
        assert [collector.payloads[i] for i in collector.ids] == [{"level": 3}, b"\x00raw", "text"]
        status = await client.call("sync.status")
        assert status["link"]["state"] == "connected"
        assert status["spool"]["accepted"] == 3
        assert status["publish"]["published"] == 3
    await collector.stop()


async def test_a_raw_publish_leaves_the_batch_envelope_alone(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    async with stack(tmp_path, broker.url) as (_sync, client):  # the device's envelope: batch
        await client.publish_to_cloud("fleet/dev-1/alarm", b"\x00plain", raw=True)
        enveloped = await client.publish_to_cloud("fleet/dev-1/alarm", "text")
        def alarms() -> list[tuple[str, bytes, bool]]:  # the device's retained status shares the broker
            return [r for r in collector.raw if r[0] == "fleet/dev-1/alarm"]

        await wait_for(lambda: len(alarms()) == 2, what="2 deliveries")
        assert alarms()[0] == ("fleet/dev-1/alarm", b"\x00plain", False)
        assert collector.ids == [enveloped]
    await collector.stop()


async def test_publish_and_subscribe_are_governed_by_policy(tmp_path: Path) -> None:
    async with stack(tmp_path, None) as (sync, client):
        with pytest.raises(Unauthorized) as denied:
            await client.publish_to_cloud("fleet/dev-2/alarm", {"x": 1})
        assert denied.value.details["operation"] == OP_PUBLISH_IOT
        assert denied.value.details["resource"] == "fleet/dev-2/alarm"
        with pytest.raises(Unauthorized):
            async with client.subscribe_to_cloud("fleet/#") as messages:
                await anext(messages)
        assert sync.spool.stats().messages == 0


@pytest.mark.parametrize(("args", "argument"), [
    ({"topic": "fleet/dev-1/alarm", "payload": 1, "qos": 2}, "qos"),
    ({"topic": "fleet/dev-1/alarm", "payload": 1, "priority": -1}, "priority"),
    ({"topic": "fleet/dev-1/alarm", "payload": 1, "priority": "high"}, "priority"),
    ({"topic": "fleet/dev-1/alarm", "payload": 1, "ttl_s": 0}, "ttl_s"),
    ({"topic": "fleet/dev-1/alarm", "payload": 1, "retain": "yes"}, "retain"),
    ({"topic": "fleet/dev-1/alarm", "payload": "x" * 2000}, "payload"),
    ({"topic": "fleet/dev-1/alarm", "payload": float("nan")}, "payload"),
    ({"topic": "fleet/dev-1/alarm", "payload": {"level": 3}, "raw": True}, "payload"),  # raw: bytes or text
    ({"topic": "fleet/dev-1/alarm", "payload": "x", "raw": "yes"}, "raw"),
])
async def test_bad_arguments_are_refused_naming_the_argument(tmp_path: Path, args: dict[str, Any],
                                                              argument: str) -> None:
    async with stack(tmp_path, None, max_payload_bytes=1000) as (sync, client):
        with pytest.raises(InvalidArguments) as exc:
            await client.call("cloud.publish", args)
        assert exc.value.details["argument"] == argument
        with pytest.raises(InvalidArguments):
            await client.call("cloud.publish", {"topic": "fleet/+/alarm", "payload": 1})
        assert sync.spool.stats().messages == 0


async def test_spool_full_is_reported_to_the_publisher(tmp_path: Path) -> None:
    async with stack(tmp_path, None, spool_max_messages=3, overflow="reject_new") as (_sync, client):
        for i in range(3):
            await client.publish_to_cloud("fleet/dev-1/alarm", i)
        with pytest.raises(LimitExceeded) as exc:
            await client.publish_to_cloud("fleet/dev-1/alarm", 3)
        assert exc.value.details["reason"] == "spool_full"
        status = await client.call("sync.status")
        assert status["spool"]["rejected_full"] == 1 and status["spool"]["messages"] == 3
        assert status["link"]["state"] == "disabled"


async def test_cloud_messages_reach_an_ipc_subscriber(broker: Mosquitto, tmp_path: Path) -> None:
    async with stack(tmp_path, broker.url) as (sync, client):
        await wait_for(lambda: sync.uplink.state == "connected", what="connected")
        async with client.subscribe_to_cloud("fleet/dev-1/cmd/#") as messages:
            await wait_for(lambda: "fleet/dev-1/cmd/#" in sync.uplink.status()["subscriptions"])
            await asyncio.sleep(0.2)
            async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
                await cloud.publish("fleet/dev-1/cmd/stop", b'{"now":true}', qos=1)
            async with asyncio.timeout(10):
                m = await anext(messages)
        assert (m.topic, m.payload, m.sender) == ("fleet/dev-1/cmd/stop", b'{"now":true}', "cloud")
        assert (m.retain, m.properties) == (False, {})


async def test_a_cloud_subscriber_sees_retain_and_mqtt5_properties(broker: Mosquitto, tmp_path: Path) -> None:
    """subscribe_to_cloud() gave topic and payload only: a retained command (stale by nature) looked like
    a live one, and the MQTT 5 properties the daemon receives (a response topic to answer on, a content
    type) were reachable only through the raw stream."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async with stack(tmp_path, broker.url) as (sync, client):  # MQTT 5 is the default
        await wait_for(lambda: sync.uplink.state == "connected", what="connected")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "fleet/dev-1/replies"
        props.ContentType = "application/json"
        props.UserProperty = [("origin", "ops")]
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as cloud:
            await cloud.publish("fleet/dev-1/cmd/old", b"{}", qos=1, retain=True)
            async with client.subscribe_to_cloud("fleet/dev-1/cmd/#") as messages:
                async with asyncio.timeout(10):
                    old = await anext(messages)
                await cloud.publish("fleet/dev-1/cmd/live", b"{}", qos=1, properties=props)
                async with asyncio.timeout(10):
                    live = await anext(messages)
            await cloud.publish("fleet/dev-1/cmd/old", b"", qos=1, retain=True)  # clear the retained one
        assert (old.topic, old.retain) == ("fleet/dev-1/cmd/old", True)
        assert (live.topic, live.retain) == ("fleet/dev-1/cmd/live", False)
        assert live.properties["response_topic"] == "fleet/dev-1/replies"
        assert live.properties["content_type"] == "application/json"
        assert ["origin", "ops"] in [list(p) for p in live.properties["user_properties"]]


async def test_device_status_on_change_and_heartbeat_retained(broker: Mosquitto, tmp_path: Path) -> None:
    device = {"components": {"a": {"version": "1.0.0", "state": "RUNNING"}}, "last_deployment": None}
    got: list[dict[str, Any]] = []
    async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
        await cloud.subscribe("nucleus/things/dev-1/status", qos=1)

        async def read() -> None:
            async for m in cloud.messages:
                got.append(json.loads(bytes(m.payload)))  # type: ignore[arg-type]

        reader = asyncio.create_task(read())
        async with stack(tmp_path, broker.url, device, heartbeat_s=0.5) as (_sync, _):
            await wait_for(lambda: len(got) >= 1, what="startup status")
            device["last_deployment"] = {"id": "d1", "status": "SUCCEEDED"}
            await wait_for(lambda: any(d["reason"] == "change" for d in got), what="change status")
            await wait_for(lambda: any(d["reason"] == "heartbeat" for d in got), what="heartbeat")
        reader.cancel()
    assert got[0]["reason"] == "startup" and got[0]["thing"] == "dev-1"
    change = next(d for d in got if d["reason"] == "change")
    assert change["device"]["last_deployment"] == {"id": "d1", "status": "SUCCEEDED"}
    assert "backlog" in change["sync"]
    seqs = [d["seq"] for d in got]
    assert seqs == sorted(seqs)


async def test_device_status_says_when_an_outage_backlog_has_drained(broker: Mosquitto, tmp_path: Path) -> None:
    """The retained status said "backlog": N until the next heartbeat after an outage had drained (the
    backlog's size is not news on every message, but a backlog appearing or reaching zero is). Read from
    what the device hands to the uplink: what reaches the broker after a reconnect is only the newest."""
    cutter = LinkCutter(broker.port)
    await cutter.restore()
    sent: list[dict[str, Any]] = []
    async with stack(tmp_path, cutter.url, {}, heartbeat_s=3600) as (sync, client):
        publish_latest = sync.uplink.publish_latest

        def record(topic: str, payload: bytes) -> None:
            sent.append(json.loads(payload))
            publish_latest(topic, payload)

        sync.uplink.publish_latest = record  # type: ignore[method-assign]
        await wait_for(lambda: sync.uplink.state == "connected", what="connected")
        await cutter.cut()
        await wait_for(lambda: sync.uplink.state != "connected", what="link lost")
        await client.publish_to_cloud("fleet/dev-1/alarm", {"x": 1})  # spooled: the backlog is 1
        await wait_for(lambda: any(d["sync"]["backlog"] == 1 for d in sent), what="a status with the backlog")
        await cutter.restore()
        await wait_for(lambda: sync.spool.stats().messages == 0, what="the backlog delivered")
        await wait_for(lambda: sent[-1]["sync"]["backlog"] == 0, what="a status after the drain")
    await cutter.cut()
    assert sent[-1]["reason"] == "change"


async def test_forwarder_sends_matching_local_topics(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port)
    await collector.start()
    rules = [{"filter": "anomaly/#", "cloud_topic": "nucleus/things/{thing}/{topic}", "priority": 7}]
    async with stack(tmp_path, broker.url, forward=rules) as (sync, _):
        await asyncio.sleep(0.1)  # the rule's local subscription
        from ipc.core import NUCLEUS
        await sync._core.publish(NUCLEUS, "anomaly/turbine-1", {"score": 0.97})
        await sync._core.publish(NUCLEUS, "sensors/turbine-1/raw", {"rpm": 1})  # raw streams stay local
        await wait_for(lambda: len(collector.ids) == 1, what="forwarded")
        assert list(collector.by_topic) == ["nucleus/things/dev-1/anomaly/turbine-1"]
        assert collector.payloads[collector.ids[0]] == {"score": 0.97}
        assert sync.forwarder.counters["forwarded"] == 1
    await collector.stop()
