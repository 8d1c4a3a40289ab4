"""What the cloud receives from a Greengrass component's PublishToIoTCore: the component's bytes,
unchanged, whatever the device's `mqtt.envelope` (Greengrass's contract with the cloud side: rules
written for Greengrass parse the payload itself). Real daemon, real awsiotsdk component, real broker."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.properties import Properties
from sync_testkit import Mosquitto

from cloud_sync import envelope
from tests.conftest import FAST_SETTINGS

pytest.importorskip("awsiot.greengrasscoreipc.clientv2", reason="awsiotsdk is not installed")
pytestmark = pytest.mark.timeout(90)

THING = "dev-gg"
TOPIC = f"fleet/{THING}/telemetry"
PAYLOADS = [b'{"temp": 21.5}', b"\x00\x01raw\xff"]

GG_PUBLISHER = """
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import QOS
    import threading
    client = GreengrassCoreIPCClientV2()
    for payload in {payloads!r}:
        client.publish_to_iot_core(topic_name={topic!r}, qos=QOS.AT_LEAST_ONCE, payload=payload)
    open({out!r}, "w").write("published\\n")
    threading.Event().wait(600)
"""

NATIVE_PUBLISHER = """
    import asyncio, threading
    from ipc import Client
    async def main():
        async with Client.from_env() as c:
            await c.publish_to_cloud({topic!r}, {{"temp": 21.5}})
    asyncio.run(main())
    open({out!r}, "w").write("published\\n")
    threading.Event().wait(600)
"""


def _deploy(d: Any, base: Path, name: str, code: str) -> None:
    """A Python component allowed PublishToIoTCore on TOPIC, its script an artifact; deployed and waited for."""
    art = base / "artifacts" / name / "1.0.0"
    art.mkdir(parents=True)
    (art / "main.py").write_text(textwrap.dedent(code))
    policy = {"aws.greengrass.ipc.mqttproxy": {f"{name}:mqttproxy:1": {
        "operations": ["aws.greengrass#PublishToIoTCore"], "resources": [TOPIC]}}}
    recipe = base / f"{name}-1.0.0.json"
    recipe.write_text(json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": {"accessControl": policy}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "python3 -u {artifacts:path}/main.py"},
                       "Artifacts": [{"URI": "s3://test-bucket/main.py"}]}]}))
    d.cli("deploy", "--artifacts", str(base / "artifacts"), str(recipe))


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and "published" in path.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never said 'published'")
        time.sleep(0.05)


async def _receive(port: int, count: int, started: asyncio.Event,
                   out: list[tuple[bytes, Properties | None]]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as cloud:
        await cloud.subscribe(TOPIC, qos=1)
        started.set()
        async for m in cloud.messages:
            out.append((bytes(m.payload), m.properties))  # type: ignore[arg-type]
            if len(out) == count:
                return


@pytest.mark.parametrize("device_envelope", ["batch", "raw"])
async def test_publish_to_iot_core_reaches_the_cloud_as_the_component_published_it(
        daemon_factory: Any, broker: Mosquitto, tmp_path: Path, device_envelope: str) -> None:
    d = daemon_factory("gg", {**FAST_SETTINGS, "thing_name": THING,
                              "mqtt": {"url": broker.url, "envelope": device_envelope, "forward_defaults": False}})
    received: list[tuple[bytes, Properties | None]] = []
    started = asyncio.Event()
    cloud = asyncio.create_task(_receive(broker.port, len(PAYLOADS) + 1, started, received))
    try:
        async with asyncio.timeout(10):
            await started.wait()
        gg_out, native_out = tmp_path / "gg.out", tmp_path / "native.out"
        await asyncio.to_thread(_deploy, d, tmp_path / "gg", "test.GgTelemetry",
                                GG_PUBLISHER.format(payloads=PAYLOADS, topic=TOPIC, out=str(gg_out)))
        await asyncio.to_thread(_wait_file, gg_out, 30.0)  # the two are in the spool, in order
        await asyncio.to_thread(_deploy, d, tmp_path / "native", "test.NativeTelemetry",
                                NATIVE_PUBLISHER.format(topic=TOPIC, out=str(native_out)))
        async with asyncio.timeout(30):
            await cloud
    finally:
        cloud.cancel()
    assert [p for p, _ in received[:2]] == PAYLOADS  # not wrapped, not re-encoded, in order
    for _, props in received[:2]:  # the stable id still travels, as an MQTT 5 user property
        ids = dict(getattr(props, "UserProperty", []) or [])
        assert envelope.ID_PROPERTY in ids
    native_payload, native_props = received[2]
    if device_envelope == "batch":  # the native SDK's messages keep the device's envelope
        _, delivered = envelope.parse(native_payload)
        assert [m.payload for m in delivered] == [{"temp": 21.5}]
        assert getattr(native_props, "ContentType", None) == envelope.CONTENT_TYPE_BATCH
    else:
        assert native_payload == b'{"temp":21.5}'
