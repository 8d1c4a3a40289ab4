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
            assert status["cgroups"], status  # the component's CPU group (v1 cpu controller or v2 unified)
            for group in map(Path, status["cgroups"]):
                v1 = group / "cpu.cfs_quota_us"
                quota = v1.read_text().strip() if v1.exists() else (group / "cpu.max").read_text().strip()
                assert quota in ("50000", "50000 100000"), (group, quota)  # half of each 100 ms period
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


def test_fleet_deploy_run_with_writes_greengrass_components_and_refuses_a_bad_one(short_tmp: Path) -> None:
    from fleet_kit import fleet_cli

    (short_tmp / "app.yaml").write_text(
        "RecipeFormatVersion: '2020-01-25'\nComponentName: com.example.App\nComponentVersion: 1.0.0\n"
        "Manifests:\n  - Platform: {os: linux}\n    Lifecycle: {Run: 'exec sleep 600'}\n")
    out = fleet_cli(short_tmp, "deploy", "app.yaml", "--thing", "t1", "--broker", "mqtt://127.0.0.1:1", "--dry-run",
                    "--run-with", "com.example.App:memory=262144", "--run-with", "com.example.App:posixUser=")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["components"] == {"com.example.App": {
        "componentVersion": "1.0.0", "runWith": {"posixUser": None, "systemResourceLimits": {"memory": 262144}}}}
    bad = fleet_cli(short_tmp, "deploy", "app.yaml", "--thing", "t1", "--broker", "mqtt://127.0.0.1:1", "--dry-run",
                    "--run-with", "com.example.App:cpus=0")
    assert bad.returncode != 0 and "run_with.com.example.App.systemResourceLimits.cpus" in bad.stderr, bad.stderr
    # JSON's 1e999 is inf (no limit, and published as Infinity, which is not JSON); true was read as 1
    for limits, field in (('{"cpus": 1e999}', "cpus"), ('{"memory": true}', "memory")):
        odd = fleet_cli(short_tmp, "deploy", "app.yaml", "--thing", "t1", "--broker", "mqtt://127.0.0.1:1",
                        "--dry-run", "--run-with", f'{{"com.example.App": {{"systemResourceLimits": {limits}}}}}')
        assert odd.returncode != 0, odd.stdout
        assert f"run_with.com.example.App.systemResourceLimits.{field}" in odd.stderr, odd.stderr
    other = fleet_cli(short_tmp, "deploy", "app.yaml", "--thing", "t1", "--broker", "mqtt://127.0.0.1:1", "--dry-run",
                      "--run-with", "com.example.Other:cpus=1")
    assert other.returncode != 0 and "runWith for com.example.Other" in other.stderr, other.stderr
