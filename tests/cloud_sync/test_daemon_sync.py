"""The real daemon builds CloudSync: `nucleus sync status`, the retained device status, a clean stop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Mosquitto

from tests.conftest import FAST_SETTINGS

pytestmark = pytest.mark.timeout(90)


def test_sync_status_without_a_broker_shows_the_spool(daemon_factory: Any) -> None:
    d = daemon_factory("nob", {**FAST_SETTINGS, "thing_name": "dev-nob"})
    info = json.loads(d.cli("sync", "status", "--json").stdout)
    assert info["link"]["state"] == "disabled"
    assert info["spool"]["messages"] == 0
    assert info["status_topic"] == "nucleus/things/dev-nob/status"
    text = d.cli("sync", "status").stdout
    assert "backlog   0 messages" in text
    assert d.stop() == 0
    assert (d.root / "db" / "spool.db").exists()


async def test_daemon_reports_device_status_to_the_broker(daemon_factory: Any, broker: Mosquitto) -> None:
    d = daemon_factory("b", {**FAST_SETTINGS, "thing_name": "dev-b", "mqtt": {"url": broker.url}}, start=False)
    await asyncio.to_thread(d.start)
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
            await cloud.subscribe("nucleus/things/dev-b/status", qos=1)
            async with asyncio.timeout(20):
                m = await anext(cloud.messages)
        doc = json.loads(bytes(m.payload))  # type: ignore[arg-type]
        assert doc["thing"] == "dev-b" and doc["reason"] in {"startup", "change"}
        assert doc["device"]["components"] == {}
        info = json.loads((await asyncio.to_thread(d.cli, "sync", "status", "--json")).stdout)
        assert info["link"]["state"] == "connected"
    finally:
        assert await asyncio.to_thread(d.stop) == 0
