"""Greengrass-style cloud publishing walked through outages: raw (verbatim) and enveloped messages
on one topic, the broker gone and the daemon killed with them spooled. Real daemon, real Mosquitto."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Mosquitto

from cloud_sync import envelope
from ipc import Client
from tests.conftest import FAST_SETTINGS

pytestmark = pytest.mark.timeout(90)

THING = "dev-walk"
TOPIC = f"fleet/{THING}/mixed"


def _declared_client(d: Any, name: str) -> str:
    policy = d.root.parent / f"{name}.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.mqttproxy": {"p": {
        "operations": ["aws.greengrass#PublishToIoTCore"], "resources": [TOPIC]}}}))
    return str(d.cli("client", "add", name, "--policy", str(policy)).stdout.strip().splitlines()[-1])


async def _collect(port: int, started: asyncio.Event, out: list[Any], want: int) -> None:
    """Every record the cloud reads on TOPIC, in arrival order: envelope items unpacked, raw ones as bytes."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as cloud:
        await cloud.subscribe(TOPIC, qos=1)
        started.set()
        async for m in cloud.messages:
            data = bytes(m.payload)
            try:
                _, delivered = envelope.parse(data)
                out.extend(x.payload for x in delivered)
            except ValueError:
                out.append(data)
            if len(out) >= want:
                return


async def test_raw_and_enveloped_messages_on_one_topic_keep_their_order_across_an_outage_and_kill9(
        daemon_factory: Any, broker: Mosquitto) -> None:
    """Spooled while the broker is down, then the daemon killed -9: the cloud reads them all, in order.

    The batcher used to let an enveloped message that came after a raw one on the same topic join
    the envelope opened before it, so it reached the cloud before the raw message.
    """
    settings = {**FAST_SETTINGS, "thing_name": THING,
                "mqtt": {"url": broker.url, "forward_defaults": False, "reconnect_initial_s": 0.1,
                         "reconnect_max_s": 0.3}}
    d = daemon_factory("walk", settings)
    token = _declared_client(d, "mixer")
    broker.stop()
    expected: list[Any] = []
    async with Client(d.socket, token) as c:
        for i in range(12):
            if i % 3 == 1:
                raw = f"raw-{i}".encode()  # every other one with MQTT 5 properties (spooled ahead of its bytes)
                await c.publish_to_cloud(TOPIC, raw, raw=True,
                                         properties={"content_type": "text/plain"} if i % 2 else None)
                expected.append(raw)
            else:
                await c.publish_to_cloud(TOPIC, {"n": i})
                expected.append({"n": i})
    d.kill9()
    broker.start()
    received: list[Any] = []
    started = asyncio.Event()
    cloud = asyncio.create_task(_collect(broker.port, started, received, len(expected)))
    try:
        async with asyncio.timeout(10):
            await started.wait()
        await asyncio.to_thread(d.start)
        async with asyncio.timeout(30):
            await cloud
    finally:
        cloud.cancel()
    assert received == expected


async def test_publish_and_subscribe_to_iot_core_carry_the_mqtt5_fields(
        daemon_factory: Any, broker: Mosquitto) -> None:
    """userProperties, messageExpiryIntervalSeconds, correlationData, responseTopic, payloadFormat and
    contentType reach the broker from PublishToIoTCore, and a cloud message's reach SubscribeToIoTCore,
    as on Greengrass 2.10+. Before, both sides dropped them without a word (a request/response
    pattern on responseTopic/correlationData got neither)."""
    pytest.importorskip("awsiot.greengrasscoreipc.clientv2", reason="awsiotsdk is not installed")
    from awsiot.greengrasscoreipc import connect  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc.model import (  # type: ignore[import-untyped]
        QOS,
        InvalidArgumentsError,
        PayloadFormat,
        UserProperty,
    )
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    d = daemon_factory("m5", {**FAST_SETTINGS, "thing_name": THING,
                              "mqtt": {"url": broker.url, "forward_defaults": False}})
    policy = d.root.parent / "m5.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.mqttproxy": {"p": {"operations": ["*"], "resources": ["*"]}}}))
    token = d.cli("client", "add", "m5", "--policy", str(policy)).stdout.strip().splitlines()[-1]
    gg = GreengrassCoreIPCClientV2(client=connect(ipc_socket=str(d.root / "gg.sock"), authtoken=token, timeout=10))
    down: asyncio.Queue[Any] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(InvalidArgumentsError) as bad:  # the broker would refuse it at every attempt
            gg.publish_to_iot_core(topic_name=TOPIC, qos=QOS.AT_LEAST_ONCE, payload=b"\xff\xfe",
                                   payload_format=PayloadFormat.UTF8)
        assert "UTF-8" in bad.value.message
        async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as cloud:
            await cloud.subscribe(TOPIC, qos=1)
            await asyncio.to_thread(
                gg.publish_to_iot_core, topic_name=TOPIC, qos=QOS.AT_LEAST_ONCE, payload=b'{"ask":1}',
                user_properties=[UserProperty(key="k", value="v")], message_expiry_interval_seconds=600,
                correlation_data=b"\x00corr", response_topic=f"{TOPIC}/reply", payload_format=PayloadFormat.UTF8,
                content_type="application/json")
            async with asyncio.timeout(20):
                m = await anext(aiter(cloud.messages))
            assert bytes(m.payload) == b'{"ask":1}'
            props = m.properties
            assert ("k", "v") in props.UserProperty  # type: ignore[union-attr]
            assert 590 <= props.MessageExpiryInterval <= 600  # type: ignore[union-attr]
            assert props.CorrelationData == b"\x00corr"  # type: ignore[union-attr]
            assert props.ResponseTopic == f"{TOPIC}/reply"  # type: ignore[union-attr]
            assert props.PayloadFormatIndicator == 1  # type: ignore[union-attr]
            assert props.ContentType == "application/json"  # type: ignore[union-attr]

            await asyncio.to_thread(gg.subscribe_to_iot_core, topic_name="cmd/#", qos=QOS.AT_LEAST_ONCE,
                                    on_stream_event=lambda e: loop.call_soon_threadsafe(down.put_nowait, e.message))
            sent = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            sent.UserProperty = [("uk", "uv")]
            sent.CorrelationData = b"cd"
            sent.ResponseTopic = "cmd/reply"
            sent.ContentType = "application/octet-stream"
            got = None
            for _ in range(40):  # bounded: the link subscribes in the background
                await cloud.publish("cmd/x", bytes(range(256)), qos=1, properties=sent)
                try:
                    got = await asyncio.wait_for(down.get(), 0.5)
                    break
                except TimeoutError:
                    continue
            assert got is not None, "the cloud message never reached SubscribeToIoTCore"
            assert got.payload == bytes(range(256))
            assert [(u.key, u.value) for u in got.user_properties] == [("uk", "uv")]
            assert got.correlation_data == b"cd"
            assert got.response_topic == "cmd/reply"
            assert got.content_type == "application/octet-stream"
    finally:
        gg.close()
