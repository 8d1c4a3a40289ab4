"""A fleet document cannot make a device fill its disk: the device's artifact limits
(``deployments.max_artifact_bytes``, ``max_unarchived_bytes`` in its nucleus.yaml) hold for what a
broker sends as for a local deployment, and the refusal reaches the operator's status table.

Before, a device fetched whatever the document's artifact server returned, in full, and unpacked a
verified ZIP bomb in full: the digest is only compared once every byte is on the disk.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fleet_kit import COMPONENT, ArtifactServer, LightDaemon, daemon_settings, recipe, retained
from sync_testkit import Mosquitto

from cloud_sync import fleet
from cloud_sync.deployment_document import RecipeText, Target, new_document

MiB = 1024 * 1024
THING = "lim-1"
TARGET = Target(type="thing", name=THING)
STATUS = f"nucleus/things/{THING}/deployments/status"


def _final(deployment_id: str) -> Any:
    def done(docs: dict[str, dict[str, Any]]) -> bool:
        return any((d.get("deployments", {}).get(TARGET.key) or {}).get("deployment_id") == deployment_id
                   and d["deployments"][TARGET.key]["status"] in fleet.FINAL for d in docs.values())
    return done


def _bomb() -> bytes:
    """32 MiB of zeros, deflated to ~32 KiB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(32 * MiB))
    return buf.getvalue()


def _zip_recipe(version: str, digest: str) -> RecipeText:
    text = f"""RecipeFormatVersion: '2020-01-25'
ComponentName: {COMPONENT}
ComponentVersion: {version}
Manifests:
  - Platform: {{os: linux}}
    Artifacts:
      - Uri: s3://fleet-bucket/bundle.zip
        Digest: '{digest}'
        Unarchive: ZIP
    Lifecycle:
      Run: exec sleep 600
"""
    return RecipeText(text=text, format="yaml", source=f"{COMPONENT}-{version}.yaml")


async def _deploy(broker: Mosquitto, server: ArtifactServer, version: str, text: RecipeText) -> dict[str, Any]:
    doc = new_document([text], target=TARGET, deployment_id=f"lim-{version}", artifacts_base_url=server.url,
                       settle_time_s=0.2)
    await fleet.publish(fleet.Broker(broker.url), doc)
    docs = await retained(broker.port, STATUS, until=_final(doc.deployment_id))
    return dict(next(iter(docs.values()))["deployments"][TARGET.key])


@pytest.mark.timeout(120)
async def test_a_fleet_artifact_over_the_devices_limits_fails_and_the_running_version_stays(
        broker: Mosquitto, short_tmp: Path) -> None:
    settings = daemon_settings(THING, broker.url, [])
    settings["deployments"].update(max_artifact_bytes=MiB, max_unarchived_bytes=8 * MiB)
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "dev", settings)
        device.start()
        try:
            first = await _deploy(broker, server, "1.0.0",
                                  recipe("1.0.0", digest=server.add(COMPONENT, "1.0.0", "hello.txt", b"hi\n")))
            assert first["status"] == "SUCCEEDED", first
            before = {c["name"]: c for c in json.loads(device.cli("list", "--json"))}[COMPONENT]

            big = server.add(COMPONENT, "2.0.0", "hello.txt", bytes(2 * MiB))
            entry = await _deploy(broker, server, "2.0.0", recipe("2.0.0", digest=big))
            assert entry["status"] == "FAILED_NO_STATE_CHANGE", entry
            for words in (COMPONENT, f"{server.url}/{COMPONENT}/2.0.0/hello.txt", "2.0 MiB",
                          "deployments.max_artifact_bytes"):
                assert words in entry["reason"], entry

            bomb = server.add(COMPONENT, "3.0.0", "bundle.zip", _bomb())
            entry = await _deploy(broker, server, "3.0.0", _zip_recipe("3.0.0", bomb))
            assert entry["status"] == "FAILED_NO_STATE_CHANGE", entry
            for words in (COMPONENT, "bundle.zip", "unpacks to 32.0 MiB", "deployments.max_unarchived_bytes"):
                assert words in entry["reason"], entry

            after = {c["name"]: c for c in json.loads(device.cli("list", "--json"))}[COMPONENT]
            assert after["version"] == "1.0.0" and after["pids"] == before["pids"], after
            assert not (device.root / "packages" / "artifacts-unarchived" / COMPONENT / "3.0.0").exists()
        finally:
            device.stop()
