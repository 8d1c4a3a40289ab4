"""cloud_sync.inbound against a real Mosquitto: ids applied once (across restarts), supersession by
sequence, one fleet deployment at a time with ``remove`` computed, rejections reported.

The engine is the daemon's seam (``submit`` / ``lookup`` / listener): here a recorder that the test
finishes by calling the listener as the engine would. The daemon end to end is in test_fleet.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Mosquitto
from test_uplink import FAST, wait_for

from cloud_sync.deployment_document import RecipeText, Rollout, Target, new_document
from cloud_sync.service import CloudSync
from cloud_sync.settings import SyncSettings
from ipc.core import IpcCore

pytestmark = pytest.mark.timeout(60)

THING = "dev-1"
GROUP = Target(type="group", name="g1")
SHA = "0123456789abcdef" * 4


def _recipe(version: str, name: str = "com.example.A") -> RecipeText:
    return RecipeText(text=json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
        "Manifests": [{"Artifacts": [{"Uri": "s3://b/a.bin", "Digest": SHA}], "Lifecycle": {"Run": "sleep 9"}}]}),
        format="json")


@dataclass
class Engine:
    """The daemon's engine as inbound sees it: submit(request) -> id, lookup(id) -> summary."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    journal: dict[str, dict[str, Any]] = field(default_factory=dict)
    refuse: str | None = None

    def submit(self, request: dict[str, Any]) -> str:
        if self.refuse:
            raise ValueError(self.refuse)
        self.requests.append(request)
        did = request["deployment_id"]
        self.journal[did] = {"id": did, "status": "QUEUED", "reason": None}
        return str(did)

    def lookup(self, did: str) -> dict[str, Any] | None:
        return self.journal.get(did)

    def finish(self, sync: CloudSync, did: str, status: str, reason: str | None = None) -> None:
        self.journal[did] = {"id": did, "status": status, "reason": reason}
        sync.deployment_changed(did, self.journal[did])


@contextlib.asynccontextmanager
async def device(tmp_path: Path, url: str, engine: Engine, **kw: Any) -> AsyncIterator[CloudSync]:
    settings = SyncSettings.model_validate({"url": url, **FAST, "status_check_s": 0.05, **kw})
    sync = CloudSync(settings, IpcCore(None, None), spool_path=tmp_path / "spool.db",  # type: ignore[arg-type]
                     thing_name=THING, thing_groups=["g1", "g2"])
    sync.attach_deployments(engine.submit, engine.lookup)
    task = asyncio.create_task(sync.run())
    await sync.wait_ready()
    await wait_for(lambda: sync.uplink.state == "connected" and len(sync.uplink.status()["subscriptions"]) == 3,
                   what="connected and subscribed")
    try:
        yield sync
    finally:
        await sync.close()
        await task


async def publish(port: int, topic: str, payload: bytes, *, retain: bool = True) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as cloud:
        await cloud.publish(topic, payload, qos=1, retain=retain)


def entry(sync: CloudSync, did: str) -> dict[str, Any]:
    return sync.deployments._deployments[did]


async def test_a_deployment_is_submitted_once_across_redelivery_and_restarts(broker: Mosquitto,
                                                                             tmp_path: Path) -> None:
    engine = Engine()
    doc = new_document([_recipe("1.0.0")], target=GROUP, artifacts_base_url="http://127.0.0.1:1/a")
    async with device(tmp_path, broker.url, engine) as sync:
        await publish(broker.port, GROUP.topic, doc.encode())
        await wait_for(lambda: len(engine.requests) == 1, what="submitted")
        assert engine.requests[0]["root_components"] == {"com.example.A": "=1.0.0"}
        assert engine.requests[0]["group"] == "thinggroup/g1"
        engine.finish(sync, doc.deployment_id, "IN_PROGRESS")
        engine.finish(sync, doc.deployment_id, "SUCCEEDED")
        await publish(broker.port, GROUP.topic, doc.encode(), retain=False)  # a duplicate delivery
        await wait_for(lambda: sync.deployments.counters["duplicates"] == 1, what="duplicate seen")
    async with device(tmp_path, broker.url, engine) as sync:  # restart: the retained copy arrives again
        await wait_for(lambda: sync.deployments.counters["duplicates"] == 1, what="retained copy seen")
        assert entry(sync, doc.deployment_id)["status"] == "SUCCEEDED"
    # The state file is gone (say, a crash right after submitting), but the journal knows the id.
    (tmp_path / "fleet-deployments.json").unlink()
    async with device(tmp_path, broker.url, engine) as sync:
        await wait_for(lambda: entry(sync, doc.deployment_id)["status"] == "SUCCEEDED"
                       if doc.deployment_id in sync.deployments._deployments else False, what="adopted")
    assert len(engine.requests) == 1


async def test_newer_supersedes_older_and_waits_for_the_one_in_flight(broker: Mosquitto, tmp_path: Path) -> None:
    engine = Engine()
    base = "http://127.0.0.1:1/a"
    first = new_document([_recipe("1.0.0"), _recipe("1.0.0", "com.example.B")], target=GROUP,
                         artifacts_base_url=base, sequence=10)
    stale = new_document([_recipe("0.9.0")], target=GROUP, artifacts_base_url=base, sequence=5)
    second = new_document([_recipe("2.0.0")], target=GROUP, artifacts_base_url=base, sequence=11)
    third = new_document([_recipe("3.0.0")], target=GROUP, artifacts_base_url=base, sequence=12)
    async with device(tmp_path, broker.url, engine) as sync:
        await publish(broker.port, GROUP.topic, first.encode())
        await wait_for(lambda: len(engine.requests) == 1, what="first submitted")
        await publish(broker.port, GROUP.topic, stale.encode(), retain=False)
        await wait_for(lambda: stale.deployment_id in sync.deployments._deployments, what="stale seen")
        assert entry(sync, stale.deployment_id)["status"] == "SUPERSEDED"
        # While the first runs, two newer ones arrive: the second never starts.
        await publish(broker.port, GROUP.topic, second.encode())
        await publish(broker.port, GROUP.topic, third.encode())
        await wait_for(lambda: third.deployment_id in sync.deployments._deployments, what="third seen")
        assert entry(sync, second.deployment_id)["status"] == "SUPERSEDED"
        assert len(engine.requests) == 1
        engine.finish(sync, first.deployment_id, "SUCCEEDED")
        await wait_for(lambda: len(engine.requests) == 2, what="third submitted")
        assert engine.requests[1]["deployment_id"] == third.deployment_id
        assert engine.requests[1]["remove"] == ["com.example.B"]  # the group's set is replaced
        engine.finish(sync, third.deployment_id, "FAILED_ROLLBACK_COMPLETE", "com.example.A: BROKEN")
        status = sync.deployments.status_document()
        assert status["deployments"]["thinggroup/g1"]["status"] == "FAILED_ROLLBACK_COMPLETE"
        assert status["deployments"]["thinggroup/g1"]["reason"] == "com.example.A: BROKEN"
        # After a rollback the group's applied set is still the first deployment's.
        fourth = new_document([_recipe("4.0.0")], target=GROUP, artifacts_base_url=base, sequence=13)
        await publish(broker.port, GROUP.topic, fourth.encode())
        await wait_for(lambda: len(engine.requests) == 3, what="fourth submitted")
        assert engine.requests[2]["remove"] == ["com.example.B"]
    assert [r["deployment_id"] for r in engine.requests] == [first.deployment_id, third.deployment_id,
                                                              fourth.deployment_id]


async def test_rollout_slot_delays_the_start(broker: Mosquitto, tmp_path: Path) -> None:
    engine = Engine()
    doc = new_document([_recipe("1.0.0")], target=Target(type="thing", name=THING),
                       artifacts_base_url="http://127.0.0.1:1/a", rollout=Rollout(window_s=3600))
    async with device(tmp_path, broker.url, engine) as sync:
        await publish(broker.port, doc.target.topic, doc.encode())
        await wait_for(lambda: doc.deployment_id in sync.deployments._deployments, what="queued")
        assert entry(sync, doc.deployment_id)["status"] == "QUEUED"
        assert "rollout window" in entry(sync, doc.deployment_id)["reason"]
        assert engine.requests == []


async def test_clearing_the_document_cancels_what_has_not_started_and_keeps_what_was_applied(
        broker: Mosquitto, tmp_path: Path) -> None:
    """`nucleus fleet clear` publishes an empty retained message: that is not a bad document (it used to be
    reported REJECTED "not JSON"), it withdraws a deployment still waiting for its slot, and leaves alone
    what the target already applied."""
    engine = Engine()
    base = "http://127.0.0.1:1/a"
    thing = Target(type="thing", name=THING)
    waiting = new_document([_recipe("1.0.0")], target=thing, artifacts_base_url=base, rollout=Rollout(window_s=3600))
    applied = new_document([_recipe("2.0.0")], target=GROUP, artifacts_base_url=base)
    async with device(tmp_path, broker.url, engine) as sync:
        await publish(broker.port, thing.topic, waiting.encode())
        await wait_for(lambda: waiting.deployment_id in sync.deployments._deployments, what="queued")
        await publish(broker.port, thing.topic, b"")  # what `fleet clear` sends
        await wait_for(lambda: sync.deployments.counters["cleared"] == 1, what="cleared")
        assert entry(sync, waiting.deployment_id)["status"] == "CANCELED"
        await publish(broker.port, GROUP.topic, applied.encode())
        await wait_for(lambda: len(engine.requests) == 1, what="group deployment submitted")
        engine.finish(sync, applied.deployment_id, "SUCCEEDED")
        await publish(broker.port, GROUP.topic, b"")
        await wait_for(lambda: sync.deployments.counters["cleared"] == 2, what="cleared again")
        assert entry(sync, applied.deployment_id)["status"] == "SUCCEEDED"
        assert sync.deployments.counters["rejected"] == 0 and not sync.deployments.errors
        status = sync.deployments.status_document()
        assert status["deployments"]["thing/" + THING]["status"] == "CANCELED"
        assert status["deployments"]["thinggroup/g1"]["status"] == "SUCCEEDED"
    assert [r["deployment_id"] for r in engine.requests] == [applied.deployment_id]


async def test_bad_documents_are_reported_on_the_status_topics_and_nothing_is_submitted(
        broker: Mosquitto, tmp_path: Path) -> None:
    engine = Engine()
    reports: list[dict[str, Any]] = []
    async with device(tmp_path, broker.url, engine, max_inbound_bytes=4096) as sync, \
            aiomqtt.Client("127.0.0.1", broker.port) as cloud:
        await cloud.subscribe(sync.deployments.status_topic, qos=1)

        async def read() -> None:
            async for m in cloud.messages:
                reports.append(json.loads(m.payload))
        reader = asyncio.create_task(read())
        base = "http://127.0.0.1:1/a"
        for_other = new_document([_recipe("1.0.0")], target=Target(type="thing", name="dev-2"),
                                 artifacts_base_url=base)
        cases = [
            (GROUP.topic, b"{ not json", "SCHEMA"),
            (GROUP.topic, b"x" * 5000, "OVERSIZED"),
            (Target(type="thing", name=THING).topic, for_other.encode(), "WRONG_TARGET"),
            (GROUP.topic, new_document([_recipe("1.0.0")], target=GROUP).encode(), "ARTIFACT_UNREACHABLE"),
            (GROUP.topic, new_document([_recipe("1.0.0")], target=GROUP, artifacts_base_url=base,
                                       components={"com.example.Nope": "1.0.0"}).encode(), "UNKNOWN_COMPONENT"),
        ]
        for topic, payload, code in cases:
            await publish(broker.port, topic, payload)
            await wait_for(lambda code=code: any(e["code"] == code for e in sync.deployments.errors), what=code)
            await wait_for(lambda code=code: any(e["code"] == code for r in reports for e in r["errors"]),
                           what=f"{code} reported")
        rejected = sync.deployments.counters["rejected"]
        await publish(broker.port, GROUP.topic, b"{ not json")  # the same bad retained document again
        await publish(broker.port, GROUP.topic, b"{ not json")
        engine.refuse = "recipe com.example.A: Manifests[0].Lifecycle.Run: not a script"
        refused = new_document([_recipe("1.0.0")], target=GROUP, artifacts_base_url=base)
        await publish(broker.port, GROUP.topic, refused.encode())
        await wait_for(lambda: entry(sync, refused.deployment_id)["status"] == "REJECTED"
                       if refused.deployment_id in sync.deployments._deployments else False, what="refused")
        assert entry(sync, refused.deployment_id)["reason"].startswith("ENGINE_REFUSED: recipe com.example.A")
        assert sync.deployments.counters["rejected"] == rejected + 1  # the repeated bad copy not counted again
        codes = [e["reason"] for e in sync.errors if e["code"] == "DEPLOYMENT_REJECTED"]
        assert {"SCHEMA", "WRONG_TARGET", "ARTIFACT_UNREACHABLE", "UNKNOWN_COMPONENT", "OVERSIZED"} <= set(codes)
        device_status = sync.device_status("test")
        assert device_status["fleet"]["rejected"] == rejected + 1
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert engine.requests == []


async def test_a_refused_retained_document_is_not_reported_again_after_a_restart(
        broker: Mosquitto, tmp_path: Path) -> None:
    """The broker hands the retained document over at every connect: refused once is refused, not new."""
    engine = Engine()
    async with device(tmp_path, broker.url, engine) as sync:
        await publish(broker.port, GROUP.topic, b"{ not json")
        await wait_for(lambda: sync.deployments.counters["rejected"] == 1, what="refused")
        refused = [i for i, e in sync.deployments._deployments.items() if e["status"] == "REJECTED"]
        assert len(refused) == 1
    async with device(tmp_path, broker.url, engine) as sync:  # restart: the retained copy arrives again
        await wait_for(lambda: sync.deployments.counters["received"] == 1, what="retained copy received")
        assert sync.deployments.counters["rejected"] == 0
        assert list(sync.deployments.errors) == []
        assert [e["code"] for e in sync.errors if e["code"] == "DEPLOYMENT_REJECTED"] == []
        assert entry(sync, refused[0])["status"] == "REJECTED"  # still reported, from the state file
        assert sync.deployments.status_document()["deployments"]["thinggroup/g1"]["deployment_id"] == refused[0]
    assert engine.requests == []
