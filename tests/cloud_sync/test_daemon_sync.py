"""The real daemon builds CloudSync: `nucleus sync status`, the retained device status, a clean stop, the
link's settings in nucleus.yaml (TLS files relative to the root, mistakes refused in one line)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sync_testkit import Certs, Mosquitto

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


async def test_daemon_links_over_mutual_tls_with_certificates_given_relative_to_the_root(
        daemon_factory: Any, tmp_path: Path, certs: Certs) -> None:
    """nucleus.yaml names its TLS files as a person writes them, relative to itself (the root);
    they were looked up from the daemon's working directory instead, and the link never came up."""
    broker = Mosquitto(tmp_path / "broker", certs=certs)
    broker.start()
    try:
        mqtt = {"url": broker.url, "ca_file": "certs/ca.crt", "cert_file": "certs/dev.crt", "key_file": "certs/dev.key"}
        d = daemon_factory("tls", {**FAST_SETTINGS, "thing_name": "dev-tls", "mqtt": mqtt}, start=False)
        (d.root / "certs").mkdir()
        for src, name in ((certs.ca, "ca.crt"), (certs.client_cert, "dev.crt"), (certs.client_key, "dev.key")):
            shutil.copy(src, d.root / "certs" / name)
        await asyncio.to_thread(d.start)
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, identifier="cloud") as cloud:
            await cloud.subscribe("nucleus/things/dev-tls/status", qos=1)
            async with asyncio.timeout(20):
                m = await anext(cloud.messages)
        assert json.loads(bytes(m.payload))["thing"] == "dev-tls"  # type: ignore[arg-type]
        info = json.loads((await asyncio.to_thread(d.cli, "sync", "status", "--json")).stdout)
        assert info["link"]["state"] == "connected" and info["link"]["errors"] == []
        assert await asyncio.to_thread(d.stop) == 0
    finally:
        broker.stop()


def test_sync_status_shows_a_refused_password_once_with_its_count(daemon_factory: Any, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"dev": "right"})
    broker.start()
    try:
        mqtt = {"url": broker.url, "username": "dev", "password": "wrong", "reconnect_initial_s": 0.05,
                "reconnect_max_s": 0.1}
        d = daemon_factory("pw", {**FAST_SETTINGS, "thing_name": "dev-pw", "mqtt": mqtt})
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline and " times, " not in text:
            text = d.cli("sync", "status").stdout
            time.sleep(0.1)
        errors = [line for line in text.splitlines() if line.startswith("error")]
        assert len(errors) == 1, text
        assert "AUTH_REFUSED: the broker refused mqtt.username 'dev' and its mqtt.password" in errors[0]
        assert " times, " in errors[0] and "wrong" not in text
    finally:
        broker.stop()


@pytest.mark.parametrize(("mqtt", "words"), [
    ({"url": "mqtt://127.0.0.1", "ca_file": "ca.crt"},
     "mqtt: mqtt.ca_file set but mqtt.url mqtt://127.0.0.1 is not TLS"),
    ({"url": "mqtts://127.0.0.1", "ca_path": "ca.crt"}, "mqtt.ca_path: unknown key"),
    ({"url": "mqtts://127.0.0.1", "password": 1234}, "mqtt.password: must be a string"),
])
def test_daemon_refuses_link_settings_in_one_line(daemon_factory: Any, mqtt: dict[str, Any], words: str) -> None:
    """A mistake in the mqtt section stops `nucleus run` with one line naming the file and key
    (it was pydantic's multi-line report, with the value in it: a password given as a number)."""
    d = daemon_factory("bad", {**FAST_SETTINGS, "mqtt": mqtt}, start=False)
    proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(d.root), "run"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nucleus: {d.root / 'nucleus.yaml'}: {words}"), proc.stderr
    assert "1234" not in proc.stderr
