"""Fleet deployments end to end: real `nucleus run` daemons, a real Mosquitto, artifacts over real HTTP.

The cloud side is `cloud_sync.fleet` (what `nucleus fleet` runs); the devices are daemons in
temporary roots. Progress is read the way an operator reads it: from the devices' retained
deployment status and device status documents on the broker.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleet_kit import (
    COMPONENT,
    ArtifactServer,
    LightDaemon,
    daemon_settings,
    daemons,
    fleet_cli,
    recipe,
    retained,
)
from sync_testkit import Mosquitto

from cloud_sync import fleet
from cloud_sync.deployment_document import Rollout, Target, new_document, start_delay

GROUP = "turbines"
TARGET = Target(type="group", name=GROUP)
FLEET_SIZE = 20


def _hello(server: ArtifactServer, version: str, text: bytes = b"hello fleet\n", **kw: Any) -> Any:
    return recipe(version, digest=server.add(COMPONENT, version, "hello.txt", text), **kw)


def _status_of(docs: dict[str, dict[str, Any]], deployment_id: str) -> dict[str, str]:
    out = {}
    for doc in docs.values():
        entry = doc.get("deployments", {}).get(TARGET.key) or {}
        if entry.get("deployment_id") == deployment_id:
            out[doc["thing"]] = entry["status"]
    return out


def _all_final(expected: int, deployment_id: str) -> Any:
    final = fleet.FINAL
    return lambda docs: len([s for s in _status_of(docs, deployment_id).values() if s in final]) >= expected


def _components(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {d["thing"]: (d.get("device") or {}).get("components", {}).get(COMPONENT) for d in docs.values()}


@pytest.mark.timeout(240)
async def test_twenty_daemons_deploy_then_roll_back_a_failing_version(broker: Mosquitto, short_tmp: Path) -> None:
    with ArtifactServer(short_tmp / "artifacts") as server, \
            daemons(short_tmp, broker.url, FLEET_SIZE, [GROUP, "all"]) as devices:
        things = {d.thing for d in devices}
        # Every device is up, connected and subscribed once it has reported its deployment status.
        await retained(broker.port, "nucleus/things/+/deployments/status",
                       until=lambda docs: {d["thing"] for d in docs.values()} == things, timeout=90)
        good = new_document([_hello(server, "1.0.0")], target=TARGET, artifacts_base_url=server.url)
        good = await fleet.publish(fleet.Broker(broker.url), good)
        docs = await retained(broker.port, "nucleus/things/+/deployments/status",
                              until=_all_final(FLEET_SIZE, good.deployment_id), timeout=90)
        assert set(_status_of(docs, good.deployment_id).values()) == {"SUCCEEDED"}, docs
        status = await fleet.fleet_status(fleet.Broker(broker.url), TARGET)
        assert status.deployment_id == good.deployment_id
        assert status.all_succeeded(expect=FLEET_SIZE), fleet.format_status(status)
        running = await retained(broker.port, "nucleus/things/+/status", timeout=30, until=lambda docs: all(
            (c or {}).get("state") == "RUNNING" for c in _components(docs).values()) and len(docs) == FLEET_SIZE)
        assert {c["version"] for c in _components(running).values()} == {"1.0.0"}

        bad = new_document([_hello(server, "2.0.0", run="exit 1")], target=TARGET, artifacts_base_url=server.url)
        bad = await fleet.publish(fleet.Broker(broker.url), bad)
        assert bad.sequence > good.sequence
        docs = await retained(broker.port, "nucleus/things/+/deployments/status",
                              until=_all_final(FLEET_SIZE, bad.deployment_id), timeout=90)
        assert set(_status_of(docs, bad.deployment_id).values()) == {"FAILED_ROLLBACK_COMPLETE"}, docs
        reasons = {d["deployments"][TARGET.key]["reason"] for d in docs.values()}
        assert all(COMPONENT in (r or "") for r in reasons), reasons
        back = await retained(broker.port, "nucleus/things/+/status", timeout=30, until=lambda docs: all(
            (c or {}).get("version") == "1.0.0" and c.get("state") == "RUNNING"
            for c in _components(docs).values()) and len(docs) == FLEET_SIZE)
        assert len(back) == FLEET_SIZE


@pytest.mark.timeout(120)
async def test_offline_device_applies_on_connect_and_never_twice(broker: Mosquitto, short_tmp: Path) -> None:
    with ArtifactServer(short_tmp / "artifacts") as server:
        doc = new_document([_hello(server, "1.0.0")], target=TARGET, artifacts_base_url=server.url, settle_time_s=0.2)
        doc = await fleet.publish(fleet.Broker(broker.url), doc)  # no device is online
        device = LightDaemon(short_tmp / "late", daemon_settings("late-1", broker.url, [GROUP]))
        device.start()
        try:
            docs = await retained(broker.port, "nucleus/things/late-1/deployments/status",
                                  until=_all_final(1, doc.deployment_id))
            assert _status_of(docs, doc.deployment_id) == {"late-1": "SUCCEEDED"}
            assert device.stop() == 0
            device.start()  # the retained document arrives again: recognised, not applied again
            docs = await retained(broker.port, "nucleus/things/late-1/status",
                                  until=lambda d: any((x.get("fleet") or {}).get("duplicates", 0) >= 1
                                                      for x in d.values()))
            listed = await asyncio.to_thread(device.cli, "deployments")
            assert listed.count(doc.deployment_id) == 1
            assert len([line for line in listed.splitlines()[1:] if line.strip()]) == 1
            state = device.fleet_state()
            assert state["deployments"][doc.deployment_id]["status"] == "SUCCEEDED"
        finally:
            device.stop()


@pytest.mark.timeout(120)
async def test_newer_deployment_supersedes_one_waiting_for_its_rollout_slot(broker: Mosquitto,
                                                                            short_tmp: Path) -> None:
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "sup", daemon_settings("sup-1", broker.url, [GROUP, "spares"]))
        device.start()
        try:
            await retained(broker.port, "nucleus/things/sup-1/deployments/status", until=bool)
            # An old deployment whose slot in a 10-minute window is at least a minute away for sup-1.
            old = None
            for i in range(200):
                candidate = new_document([_hello(server, "1.0.0")], target=TARGET, artifacts_base_url=server.url,
                                         rollout=Rollout(window_s=600), deployment_id=f"old-{i}")
                if start_delay(candidate, "sup-1", candidate.created_at) > 60:
                    old = candidate
                    break
            assert old is not None
            old = await fleet.publish(fleet.Broker(broker.url), old)
            await retained(broker.port, "nucleus/things/sup-1/deployments/status",
                           until=lambda d: _status_of(d, old.deployment_id) == {"sup-1": "QUEUED"})
            new = new_document([_hello(server, "1.0.1")], target=TARGET, artifacts_base_url=server.url)
            new = await fleet.publish(fleet.Broker(broker.url), new)
            docs = await retained(broker.port, "nucleus/things/sup-1/deployments/status",
                                  until=_all_final(1, new.deployment_id))
            assert _status_of(docs, new.deployment_id) == {"sup-1": "SUCCEEDED"}
            recent = {r["deployment_id"]: r for r in next(iter(docs.values()))["recent"]}
            assert recent[old.deployment_id]["status"] == "SUPERSEDED"
            assert new.deployment_id in recent[old.deployment_id]["reason"]
            old_view = await fleet.fleet_status(fleet.Broker(broker.url), TARGET, deployment_id=old.deployment_id)
            assert old_view.state_of("sup-1") == "SUPERSEDED"
            # The table is about the deployment asked for, and says it is not the current one (the header was
            # "no current deployment document", while a current document was there).
            head = fleet.format_status(old_view).splitlines()[0]
            assert head == (f"group {GROUP}: deployment {old.deployment_id} "
                            f"(not the current deployment: the current one is {new.deployment_id})")
            listed = await asyncio.to_thread(device.cli, "deployments")
            assert old.deployment_id not in listed and new.deployment_id in listed
            # The device is in a second group too: the id it remembers for GROUP is not a deployment of that
            # group (it was matched on its id alone and shown as SUPERSEDED there).
            with pytest.raises(fleet.FleetError, match=f"deployment {old.deployment_id} is unknown for group spares"):
                await fleet.fleet_status(fleet.Broker(broker.url), Target(type="group", name="spares"),
                                         deployment_id=old.deployment_id)
        finally:
            device.stop()


@pytest.mark.timeout(120)
async def test_bad_documents_are_reported_and_change_nothing(broker: Mosquitto, short_tmp: Path) -> None:
    import aiomqtt

    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "bad", daemon_settings("bad-1", broker.url, [GROUP]))
        device.start()
        try:
            good = new_document([_hello(server, "1.0.0")], target=TARGET, artifacts_base_url=server.url)
            good = await fleet.publish(fleet.Broker(broker.url), good)
            await retained(broker.port, "nucleus/things/bad-1/deployments/status",
                           until=_all_final(1, good.deployment_id))
            async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
                await cloud.publish(TARGET.topic, b'{"v": 1, "deployment_id": "x"}', qos=1, retain=True)
            docs = await retained(broker.port, "nucleus/things/bad-1/deployments/status", until=lambda d: any(
                (x["deployments"].get(TARGET.key) or {}).get("status") == "REJECTED" for x in d.values()))
            entry = next(iter(docs.values()))["deployments"][TARGET.key]
            assert entry["reason"].startswith("SCHEMA: not a v1 deployment document")
            assert "target" in entry["reason"]
            # A wrong digest gets as far as the engine's verification: nothing running changes.
            server.add(COMPONENT, "1.0.2", "hello.txt", b"not what the digest says\n")
            tampered = new_document([recipe("1.0.2", digest="0" * 64)], target=TARGET, artifacts_base_url=server.url)
            tampered = await fleet.publish(fleet.Broker(broker.url), tampered)
            docs = await retained(broker.port, "nucleus/things/bad-1/deployments/status",
                                  until=_all_final(1, tampered.deployment_id))
            entry = next(iter(docs.values()))["deployments"][TARGET.key]
            assert entry["status"] == "FAILED_NO_STATE_CHANGE" and "digest mismatch" in entry["reason"], entry["reason"]
            # The operator's table shows why, whole (it was cut at 80 characters: the digests were lost).
            assert len(entry["reason"]) > 80
            table = fleet.format_status(await fleet.fleet_status(fleet.Broker(broker.url), TARGET))
            [row] = [line for line in table.splitlines() if line.startswith("bad-1 ")]
            assert row.endswith(entry["reason"]), table
            device_docs = await retained(broker.port, "nucleus/things/bad-1/status", until=lambda d: any(
                (x.get("device") or {}).get("last_deployment", {}).get("id") == tampered.deployment_id
                for x in d.values()))
            device_doc = next(iter(device_docs.values()))
            assert device_doc["device"]["components"][COMPONENT] == {"version": "1.0.0", "state": "RUNNING"}
            assert any(e["code"] == "DEPLOYMENT_REJECTED" for e in device_doc["sync"]["errors"])
        finally:
            device.stop()


def test_status_table_keeps_a_multi_line_reason_on_its_device_line() -> None:
    reason = "com.example.A is BROKEN: run exited with 1\n" + "x" * 200
    status = fleet.FleetStatus(TARGET, None, {"dev-01": {"status": "FAILED_ROLLBACK_COMPLETE", "reason": reason}})
    lines = fleet.format_status(status).splitlines()
    assert len(lines) == 4  # header, column names, the device, the summary
    assert lines[2].endswith("com.example.A is BROKEN: run exited with 1 " + "x" * 200)


def test_fleet_cli_deploys_and_shows_status_without_a_daemon(broker: Mosquitto, short_tmp: Path) -> None:
    """The real command line: `nucleus fleet deploy` then `nucleus fleet status` (nothing listens yet)."""
    with ArtifactServer(short_tmp / "artifacts") as server:
        rec = _hello(server, "1.0.0")
        (short_tmp / "recipes").mkdir()
        (short_tmp / "recipes" / rec.source).write_text(rec.text)

        def nucleus(*args: str) -> subprocess.CompletedProcess[str]:
            return fleet_cli(short_tmp, *args)

        deployed = nucleus("deploy", str(short_tmp / "recipes"), "--broker", broker.url, "--group", GROUP,
                           "--artifacts-url", server.url, "--rollout-rate", "10", "--expected-devices", "5")
        assert deployed.returncode == 0, deployed.stderr
        assert f"published retained to {TARGET.topic}" in deployed.stdout
        status = nucleus("status", "--broker", broker.url, "--group", GROUP, "--json")
        assert status.returncode == 1  # no device has reported: not a success
        info = json.loads(status.stdout)
        assert info["deployment_id"] in deployed.stdout and info["things"] == {}
        refused = nucleus("deploy", str(short_tmp / "recipes"), "--broker", broker.url, "--group", GROUP,
                          "--rollout-rate", "10")
        assert refused.returncode == 1 and "--expected-devices" in refused.stderr
        missing = nucleus("deploy", str(short_tmp / "nope.yaml"), "--broker", broker.url, "--group", GROUP)
        assert missing.returncode == 1 and "no such file" in missing.stderr
        # A recipe every device would refuse (an artifact without a digest) is refused here, before publishing,
        # for a dry run too, with how to fix it; the retained document stays the one deployed above.
        hello = str(Path(__file__).resolve().parents[2] / "examples" / "hello_world" / "recipes")
        for extra in ((), ("--dry-run",)):
            undigested = nucleus("deploy", hello, "--broker", broker.url, "--group", GROUP, "--artifacts-url",
                                 server.url, *extra)
            assert undigested.returncode == 1, undigested.stdout
            assert "BAD_DIGEST" in undigested.stderr and "com.example.HelloWorld" in undigested.stderr
            assert "openssl dgst -sha256" in undigested.stderr
        again = nucleus("status", "--broker", broker.url, "--group", GROUP, "--json", "--expect", "1")
        assert json.loads(again.stdout)["deployment_id"] == info["deployment_id"]
        assert again.returncode == 1 and "expected 1 device(s), 0 reported" in again.stderr
        # A deployment id nothing is known of (mistyped, or another group's): one line naming it, not a table
        # of nothing under "no current deployment document".
        unknown = nucleus("status", "--broker", broker.url, "--group", GROUP, "--deployment", "no-such-id")
        assert unknown.returncode == 1 and unknown.stdout == ""
        assert unknown.stderr == (f"nucleus fleet: deployment no-such-id is unknown for group {GROUP}: it is not the "
                                  f"retained document (the current one is {info['deployment_id']}) and no device "
                                  "has reported it\n")
        # ... at once, also when asked to wait: no device can report an id that was never retained for it.
        waited = nucleus("status", "--broker", broker.url, "--group", GROUP, "--deployment", "no-such-id",
                         "--wait-s", "600")  # fleet_cli gives up after 60 s
        assert waited.returncode == 1 and waited.stderr == unknown.stderr
