"""What leaves the device by default: protective-action decisions, anomalous events, retraining samples.
Raw sensor streams and normal anomaly events stay local. Real bus, real spool, real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from sync_testkit import Collector, Mosquitto
from test_uplink import FAST, wait_for

from cloud_sync.forwarder import matches_condition
from cloud_sync.service import CloudSync
from cloud_sync.settings import SyncSettings
from ipc.core import NUCLEUS, IpcCore

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def device(tmp_path: Path, url: str, **kw: Any) -> AsyncIterator[CloudSync]:
    settings = SyncSettings.model_validate({"url": url, **FAST, **kw})
    sync = CloudSync(settings, IpcCore(None, None), spool_path=tmp_path / "spool.db",  # type: ignore[arg-type]
                     thing_name="dev-1")
    task = asyncio.create_task(sync.run())
    await sync.wait_ready()
    await asyncio.sleep(0.1)  # the rules' local subscriptions
    try:
        yield sync
    finally:
        await sync.close()
        await task


def test_condition_matches_exact_top_level_values_only() -> None:
    def pack(value: Any) -> bytes:
        return msgpack.packb(value, use_bin_type=True)

    when = {"is_anomaly": True}
    assert matches_condition(pack({"is_anomaly": True, "score": 3.0}), when)
    assert not matches_condition(pack({"is_anomaly": False}), when)
    assert not matches_condition(pack({"is_anomaly": 1}), when)  # 1 is not true
    assert not matches_condition(pack({"score": 3.0}), when)
    assert not matches_condition(pack([True]), when)
    assert not matches_condition(b"\xc1 not msgpack", when)
    array = msgpack.ExtType(1, b"opaque numpy bytes")
    assert matches_condition(pack({"is_anomaly": True, "window": array}), when)


async def test_defaults_forward_decisions_anomalies_and_samples_not_raw_streams(broker: Mosquitto,
                                                                                tmp_path: Path) -> None:
    import numpy as np

    collector = Collector(broker.port, topic_filter="nucleus/things/dev-1/#")
    await collector.start()
    async with device(tmp_path, broker.url) as sync:
        bus = sync._core
        await bus.publish(NUCLEUS, "sensors/pump-1/raw", {"rpm": 1})
        await bus.publish(NUCLEUS, "anomaly/pump-1", {"is_anomaly": False, "score": 0.1})
        await bus.publish(NUCLEUS, "anomaly/pump-1", {"is_anomaly": True, "score": 9.5})
        await bus.publish(NUCLEUS, "actions/pump-1", {"action": "trip", "asset": "pump-1"})
        await bus.publish(NUCLEUS, "retraining/pump-1", {"kind": "low_confidence",
                                                         "features": np.arange(4, dtype=np.float32)})
        await wait_for(lambda: len(collector.ids) == 3, what="three forwarded")
        await asyncio.sleep(0.2)  # nothing else arrives
        assert sorted(collector.by_topic) == ["nucleus/things/dev-1/actions/pump-1",
                                              "nucleus/things/dev-1/anomaly/pump-1",
                                              "nucleus/things/dev-1/retraining/pump-1"]
        anomaly = collector.payloads[collector.by_topic["nucleus/things/dev-1/anomaly/pump-1"][0]]
        assert anomaly == {"is_anomaly": True, "score": 9.5}
        sample = collector.payloads[collector.by_topic["nucleus/things/dev-1/retraining/pump-1"][0]]
        assert isinstance(sample, bytes)  # a numpy array cannot be JSON: the bus data goes as is
        assert sync.forwarder.counters == {"forwarded": 3, "local_dropped": 0, "refused": 0, "filtered": 1}
    await collector.stop()


async def test_defaults_can_be_turned_off_and_rules_added(broker: Mosquitto, tmp_path: Path) -> None:
    collector = Collector(broker.port, topic_filter="#")
    await collector.start()
    rules = [{"filter": "sensors/+/raw", "cloud_topic": "raw/{thing}/{topic}"}]
    async with device(tmp_path, broker.url, forward_defaults=False, forward=rules) as sync:
        await sync._core.publish(NUCLEUS, "actions/pump-1", {"action": "trip"})
        await sync._core.publish(NUCLEUS, "sensors/pump-1/raw", {"rpm": 1})
        await wait_for(lambda: len(collector.ids) == 1, what="the configured stream")
        await asyncio.sleep(0.2)
        assert list(collector.by_topic) == ["raw/dev-1/sensors/pump-1/raw"]
    await collector.stop()


async def test_a_rule_that_would_forward_onto_a_deployment_topic_drops_the_message(broker: Mosquitto,
                                                                                   tmp_path: Path) -> None:
    """A "#" rule to "{topic}" made any local publisher a fleet operator: a component publishing on the
    local topic nucleus/things/dev-1/deployments deployed to its own device (cloud.publish already
    refuses that topic). The message is refused and counted; the rest of the rule still forwards."""
    collector = Collector(broker.port, topic_filter="#")
    await collector.start()
    rules = [{"filter": "#", "cloud_topic": "{topic}"}]
    async with device(tmp_path, broker.url, forward_defaults=False, forward=rules) as sync:
        await sync._core.publish(NUCLEUS, "nucleus/things/dev-1/deployments", {"deployment_id": "evil"})
        await sync._core.publish(NUCLEUS, "nucleus/groups/turbines/deployments", {"deployment_id": "evil"})
        await sync._core.publish(NUCLEUS, "site/notes", {"n": 1})
        await wait_for(lambda: len(collector.ids) == 1, what="the allowed message")
        await asyncio.sleep(0.2)
        assert list(collector.by_topic) == ["site/notes"]
        assert sync.forwarder.counters["refused"] == 2
    await collector.stop()
