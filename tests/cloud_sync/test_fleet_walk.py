"""An operator's attack walk on fleet deployments: hostile documents published by hand on a real
daemon's deployment topic (real Mosquitto, real `nucleus run`, artifacts over real HTTP).

Each one must be refused and reported on the device's deployment status topic naming the reason,
nothing running changes, and the device keeps accepting the next good deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from fleet_kit import COMPONENT, REPO, ArtifactServer, LightDaemon, _kill_components, daemon_settings, recipe, retained
from sync_testkit import Mosquitto

from cloud_sync import fleet
from cloud_sync.deployment_document import MAX_VALUES, DeploymentDocument, RecipeText, Target, new_document
from cloud_sync.inbound import KEEP_DEPLOYMENTS

GROUP = "walkers"
TARGET = Target(type="group", name=GROUP)
THING = "walk-1"
STATUS = f"nucleus/things/{THING}/deployments/status"


def _entry(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doc = docs.get(STATUS) or {}
    return doc.get("deployments", {}).get(TARGET.key) or {}


def _has_error(code: str) -> Any:
    return lambda docs: any(e.get("code") == code for e in (docs.get(STATUS) or {}).get("errors", []))


async def _applied(broker: Mosquitto, doc: DeploymentDocument, timeout: float = 60.0) -> DeploymentDocument:
    """``doc`` published to the fleet, once the device reports it SUCCEEDED (the document as published)."""
    doc = await fleet.publish(fleet.Broker(broker.url), doc)
    await retained(broker.port, STATUS, until=lambda d: _entry(d).get("deployment_id") == doc.deployment_id
                   and _entry(d).get("status") == "SUCCEEDED", timeout=timeout)
    return doc


async def _publish_raw(port: int, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as cloud:
        await cloud.publish(TARGET.topic, payload, qos=1, retain=True)


def _alias_bomb(version: str, digest: str, levels: int) -> RecipeText:
    """A recipe of a few hundred bytes whose configuration is 10**(levels+1) values once its YAML
    aliases are expanded (the billion-laughs shape, kept small enough to be harmless unfixed)."""
    anchors = ["    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    text = recipe(version, digest=digest).text.replace("    greeting: hi\n", "    greeting: hi\n"
                                                      + "\n".join(anchors) + "\n")
    return RecipeText(text=text, format="yaml", source=f"bomb-{version}.yaml")


@pytest.mark.timeout(120)
async def test_hostile_documents_are_refused_reported_and_the_device_keeps_listening(
        broker: Mosquitto, short_tmp: Path) -> None:
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "dev", daemon_settings(THING, broker.url, [GROUP]))
        device.start()
        try:
            first = new_document([recipe("1.0.0", digest=server.add(COMPONENT, "1.0.0", "hello.txt", b"one\n"))],
                                 target=TARGET, artifacts_base_url=server.url)
            first = await _applied(broker, first)

            # 1. ~10 KiB of nested brackets: json's parser raised RecursionError, which ended the
            # device's subscription task silently; every later deployment was ignored.
            await _publish_raw(broker.port, b'{"v": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
            docs = await retained(broker.port, STATUS, until=lambda d: _entry(d).get("status") == "REJECTED",
                                  timeout=20)
            assert _entry(docs)["reason"].startswith("SCHEMA: nested deeper than"), _entry(docs)

            # 2. The operator's own tool reads that retained document back before publishing (for
            # the sequence): it crashed with the same RecursionError; it is "not one of ours" now.
            async with fleet.connect(fleet.Broker(broker.url)) as client:
                assert await fleet.current_document(client, TARGET) is None
            digest = server.add(COMPONENT, "1.0.1", "hello.txt", b"two\n")
            # 3. A YAML alias bomb in a recipe: 10**6 values from ~500 bytes. Unchecked, the device
            # expanded it in its event loop (and a billion-value one would exhaust its memory).
            bomb = new_document([_alias_bomb("1.0.1", digest, levels=5)], target=TARGET, artifacts_base_url=server.url,
                                components={COMPONENT: "1.0.1"}, sequence=first.sequence + 1)
            assert MAX_VALUES < 10**6 and len(bomb.encode()) < 4096
            await _publish_raw(broker.port, bomb.encode())
            docs = await retained(broker.port, STATUS, until=lambda d: _entry(d).get("deployment_id")
                                  == bomb.deployment_id, timeout=20)
            assert _entry(docs)["status"] == "REJECTED", _entry(docs)
            assert _entry(docs)["reason"].startswith("RECIPE_INVALID:") and "values" in _entry(docs)["reason"]

            # 4. The id of the applied deployment with other content (another version): refused
            # and reported, not silently dropped; what the id did stays as it was.
            imposter = new_document([recipe("1.0.1", digest=digest)], target=TARGET, artifacts_base_url=server.url,
                                    deployment_id=first.deployment_id, sequence=first.sequence + 10**6)
            await _publish_raw(broker.port, imposter.encode())
            docs = await retained(broker.port, STATUS, until=_has_error("DUPLICATE_ID"), timeout=20)
            [err] = [e for e in docs[STATUS]["errors"] if e["code"] == "DUPLICATE_ID"]
            assert err["deployment_id"] == first.deployment_id and "another document" in err["message"]
            recent = {r["deployment_id"]: r["status"] for r in docs[STATUS]["recent"]}
            assert recent[first.deployment_id] == "SUCCEEDED"

            # 5. A digest algorithm downgrade: the right SHA-1 of the artifact is still refused.
            sha1 = hashlib.sha1(b"two\n").hexdigest()
            weak = recipe("1.0.1", digest=sha1)
            weak = RecipeText(text=weak.text.replace("        Digest:", "        Algorithm: SHA-1\n        Digest:"),
                              format="yaml", source="weak.yaml")
            weak_doc = new_document([weak], target=TARGET, artifacts_base_url=server.url,
                                    components={COMPONENT: "1.0.1"}, sequence=first.sequence + 2)
            await _publish_raw(broker.port, weak_doc.encode())
            docs = await retained(broker.port, STATUS, until=lambda d: _entry(d).get("deployment_id")
                                  == weak_doc.deployment_id, timeout=20)
            assert _entry(docs)["status"] == "REJECTED", _entry(docs)
            assert _entry(docs)["reason"].startswith("BAD_DIGEST:") and "SHA-1" in _entry(docs)["reason"]

            # 6. An infinite settle time (Python's json writes and reads "Infinity"; JSON has no such
            # number): accepted, it kept the deployment, and every fleet deployment after it,
            # IN_PROGRESS for ever.
            stuck = json.loads(new_document([recipe("1.0.1", digest=digest)], target=TARGET,
                                            artifacts_base_url=server.url, sequence=first.sequence + 3).encode())
            stuck["settle_time_s"] = float("inf")
            await _publish_raw(broker.port, json.dumps(stuck).encode())
            docs = await retained(broker.port, STATUS, until=lambda d: any(
                e["code"] == "SCHEMA" and "Infinity" in e["message"]
                for e in (d.get(STATUS) or {}).get("errors", [])), timeout=20)
            assert _entry(docs)["status"] == "REJECTED", _entry(docs)

            # 7. A document over max_inbound_bytes is reported OVERSIZED.
            await _publish_raw(broker.port, json.dumps({"v": 1, "pad": "x" * (129 * 1024)}).encode())
            await retained(broker.port, STATUS, until=_has_error("OVERSIZED"), timeout=20)

            # The device still listens: the next good deployment is applied.
            second = new_document([recipe("1.0.1", digest=digest)], target=TARGET, artifacts_base_url=server.url)
            second = await _applied(broker, second, timeout=30)
            device_docs = await retained(broker.port, f"nucleus/things/{THING}/status", until=lambda d: any(
                ((x.get("device") or {}).get("components") or {}).get(COMPONENT, {}).get("version") == "1.0.1"
                for x in d.values()), timeout=20)
            assert next(iter(device_docs.values()))["device"]["components"][COMPONENT]["state"] == "RUNNING"
        finally:
            device.stop()


@pytest.mark.timeout(120)
async def test_a_flood_of_bad_documents_writes_nothing_and_pushes_out_no_applied_deployment(
        broker: Mosquitto, short_tmp: Path) -> None:
    flood = KEEP_DEPLOYMENTS + 44
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "dev", daemon_settings(THING, broker.url, [GROUP]))
        device.start()
        try:
            first = new_document([recipe("1.0.0", digest=server.add(COMPONENT, "1.0.0", "hello.txt", b"one\n"))],
                                 target=TARGET, artifacts_base_url=server.url)
            first = await _applied(broker, first)
            state = device.root / "db" / "fleet-deployments.json"
            before = state.stat()
            payloads = [json.dumps({"v": 1, "junk": i}).encode() for i in range(flood)]
            async with aiomqtt.Client("127.0.0.1", broker.port) as cloud:
                for payload in payloads:
                    await cloud.publish(TARGET.topic, payload, qos=1, retain=True)
            last_id = f"rejected:{hashlib.sha256(payloads[-1]).hexdigest()[:16]}"
            await retained(broker.port, STATUS, until=lambda d: _entry(d).get("deployment_id") == last_id, timeout=60)
            # Every refusal was reported; none was written (an fsync each, in the event loop, before).
            after = state.stat()
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
            # The next real change writes the records: the applied deployment is still among them
            # (the refused ones went first), so its target's report does not lose it.
            second = new_document([recipe("1.0.1", digest=server.add(COMPONENT, "1.0.1", "hello.txt", b"two\n"))],
                                  target=TARGET, artifacts_base_url=server.url)
            second = await _applied(broker, second, timeout=30)
            records = device.fleet_state()["deployments"]
            assert len(records) <= KEEP_DEPLOYMENTS
            assert records[first.deployment_id]["status"] == "SUCCEEDED"
        finally:
            device.stop()


def _escalating_component(thing: str, evil_doc: bytes) -> RecipeText:
    """A component allowed to publish to the cloud on any topic ("*", as Greengrass examples grant)
    that tries to deploy to its own device through the device's link."""
    script = (
        "import asyncio, json, os, sys\n"
        "from ipc import Client\n"
        "async def main():\n"
        "    async with Client.from_env() as c:\n"
        "        try:\n"
        f"            r = await c.call('cloud.publish', {{'topic': 'nucleus/things/{thing}/deployments',\n"
        f"                                               'payload': {evil_doc.decode()!r}, 'retain': True}})\n"
        "        except Exception as exc:\n"
        "            r = {'refused': getattr(exc, 'code', type(exc).__name__), 'message': str(exc)}\n"
        "    with open(os.path.join(os.getcwd(), 'result.json'), 'w') as f:\n"
        "        json.dump(r, f)\n"
        "asyncio.run(main())\n")
    recipe_doc = {
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "com.example.Escalator", "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": {"accessControl": {"aws.greengrass.ipc.mqttproxy": {
            "com.example.Escalator:mqttproxy:1": {"operations": ["aws.greengrass#PublishToIoTCore"],
                                                  "resources": ["*"]}}}}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {
            "Setenv": {"PYTHONPATH": str(REPO)},
            "Run": f"cd {{work:path}} && {sys.executable} -c {shlex.quote(script)} && exec sleep 600"}}]}
    return RecipeText(text=json.dumps(recipe_doc), format="json", source="escalator.json")


@pytest.mark.timeout(120)
async def test_a_component_cannot_publish_a_deployment_document_through_the_devices_link(
        broker: Mosquitto, short_tmp: Path) -> None:
    thing = "walk-2"
    settings = daemon_settings(thing, broker.url, [GROUP])
    settings["mqtt"]["envelope"] = "raw"  # payloads go out as given: a document stays a document
    device = LightDaemon(short_tmp / "dev", settings)
    device.start()
    target = Target(type="thing", name=thing)
    evil = new_document([RecipeText(text=json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "com.example.Evil", "ComponentVersion": "1.0.0",
        "Manifests": [{"Lifecycle": {"Run": "exec sleep 600"}}]}), format="json")], target=target)
    try:
        doc = new_document([_escalating_component(thing, evil.encode())], target=TARGET)
        doc = await fleet.publish(fleet.Broker(broker.url), doc)
        status = f"nucleus/things/{thing}/deployments/status"
        await retained(broker.port, status, until=lambda d: (d.get(status, {}).get("deployments", {}).get(
            TARGET.key) or {}).get("status") == "SUCCEEDED")
        result = device.root / "work" / "com.example.Escalator" / "result.json"
        for _ in range(100):  # the component writes it right after starting
            if result.exists() and result.read_text():
                break
            await asyncio.sleep(0.1)
        outcome = json.loads(result.read_text())
        assert outcome.get("refused") == "INVALID_ARGUMENTS", outcome
        assert "deployment topic" in outcome["message"]
        async with fleet.connect(fleet.Broker(broker.url)) as client:
            assert await fleet.current_document(client, target) is None  # nothing reached the broker
    finally:
        device.stop()
        _kill_components(device.root)


@pytest.mark.timeout(120)
async def test_an_archive_named_dot_dot_zip_unpacks_into_its_own_folder(broker: Mosquitto, short_tmp: Path) -> None:
    """``...zip``'s stem is ``..``: its folder was the component's folder of all versions (the move
    into the store failed with EBUSY); ``..zip``'s is ``.``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("planted.txt", b"inside\n")
    with ArtifactServer(short_tmp / "artifacts") as server:
        device = LightDaemon(short_tmp / "dev", daemon_settings(THING, broker.url, [GROUP]))
        device.start()
        try:
            for version, name in (("2.0.0", "...zip"), ("2.0.1", "..zip")):
                r = recipe(version, digest=server.add(COMPONENT, version, name, buf.getvalue()), uri=f"s3://b/{name}",
                           run="exec sleep 600")
                r = RecipeText(text=r.text.replace("        Digest:", "        Unarchive: ZIP\n        Digest:"),
                               format="yaml", source=f"{version}.yaml")
                doc = await fleet.publish(fleet.Broker(broker.url), new_document([r], target=TARGET,
                                                                                  artifacts_base_url=server.url))
                docs = await retained(broker.port, STATUS, until=lambda d, i=doc.deployment_id: _entry(d).get(
                    "deployment_id") == i and _entry(d).get("status") in fleet.FINAL)
                assert _entry(docs)["status"] == "SUCCEEDED", _entry(docs)
                folder = device.root / "packages" / "artifacts-unarchived" / COMPONENT / version / name
                assert (folder / "planted.txt").read_bytes() == b"inside\n"
        finally:
            device.stop()
