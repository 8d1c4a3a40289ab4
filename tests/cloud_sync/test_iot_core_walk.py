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
            data = bytes(m.payload)  # type: ignore[arg-type]
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
                raw = f"raw-{i}".encode()
                await c.publish_to_cloud(TOPIC, raw, raw=True)
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
