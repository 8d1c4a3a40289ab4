"""Fleet documents carry Greengrass's runWith inside ``components`` (CreateDeployment's shape); a real
daemon applies it (a cgroup CPU limit here), and refuses a bad one naming the component and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fleet_kit import COMPONENT, ArtifactServer, LightDaemon, daemon_settings, recipe, retained
from sync_testkit import Mosquitto

from cloud_sync import fleet
from cloud_sync.deployment_document import DeploymentDocument, Target
from nucleus.cgroups import Cgroups, Limits

TARGET = Target(type="thing", name="rw-1")
_PROBLEM = Cgroups().problem(Limits(cpus=0.5))


def _final(deployment_id: str) -> Any:
    def done(docs: dict[str, dict[str, Any]]) -> bool:
        return any((d.get("deployments", {}).get(TARGET.key) or {}).get("deployment_id") == deployment_id
                   and d["deployments"][TARGET.key]["status"] in fleet.FINAL for d in docs.values())
    return done


@pytest.mark.skipif(_PROBLEM is not None, reason=f"cgroups not writable here: {_PROBLEM}")
@pytest.mark.timeout(120)
async def test_a_fleet_document_with_run_with_applies_it_and_a_bad_one_is_refused(broker: Mosquitto,
                                                                                   short_tmp: Path) -> None:
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "rw", daemon_settings("rw-1", broker.url, []))
        device.start()
        try:
            hello = recipe("1.0.0", digest=server.add(COMPONENT, "1.0.0", "hello.txt", b"hi\n"))
            raw = {"deployment_id": "rw-good", "target": TARGET.model_dump(), "sequence": 1, "created_at": 1.0,
                   "artifacts_base_url": server.url, "settle_time_s": 0.2,
                   "recipes": [hello.model_dump()],
                   "components": {COMPONENT: {"componentVersion": "1.0.0",
                                              "runWith": {"systemResourceLimits": {"cpus": 0.5}}}}}
            doc = DeploymentDocument.model_validate(raw)
            assert json.loads(doc.encode())["components"][COMPONENT]["runWith"] == {
                "systemResourceLimits": {"cpus": 0.5}}  # published in Greengrass's shape
            await fleet.publish(fleet.Broker(broker.url), doc)
            docs = await retained(broker.port, "nucleus/things/rw-1/deployments/status", until=_final("rw-good"))
            entry = next(iter(docs.values()))["deployments"][TARGET.key]
            assert entry["status"] == "SUCCEEDED", entry
            status = json.loads(device.cli("status", COMPONENT))["run_with"]
            assert status["systemResourceLimits"] == {"cpus": 0.5}
            quota = [Path(g) / "cpu.cfs_quota_us" for g in status["cgroups"] if (Path(g) / "cpu.cfs_quota_us").exists()]
            assert all(q.read_text().strip() == "50000" for q in quota)
            # an unknown field inside runWith: refused as a whole, naming the component and the field
            bad = {**raw, "deployment_id": "rw-bad", "sequence": 2,
                   "components": {COMPONENT: {"componentVersion": "1.0.0", "runWith": {"systemResourceLimits": {
                       "cpus": 0.5}, "windowsUser": "x"}}}}
            import aiomqtt

            async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
                await cloud.publish(TARGET.topic, json.dumps(bad).encode(), qos=1, retain=True)
            docs = await retained(broker.port, "nucleus/things/rw-1/deployments/status", until=lambda d: any(
                (x["deployments"].get(TARGET.key) or {}).get("status") == "REJECTED" for x in d.values()))
            reason = next(iter(docs.values()))["deployments"][TARGET.key]["reason"]
            assert f"run_with.{COMPONENT}.windowsUser" in reason, reason
            assert json.loads(device.cli("status", COMPONENT))["run_with"]["systemResourceLimits"] == {"cpus": 0.5}
        finally:
            device.stop()
