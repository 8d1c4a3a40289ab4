"""TLS with a generated CA and client certificate, password auth, refused credentials: nothing spooled is lost."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from sync_testkit import Certs, Collector, Mosquitto
from test_uplink import msg, running, settings, wait_for

pytestmark = pytest.mark.timeout(60)


def tls_collector(broker: Mosquitto, certs: Certs) -> Collector:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return Collector(broker.port, client_kwargs={"tls_context": ctx})


async def test_tls_with_client_certificate_delivers(tmp_path: Path, certs: Certs) -> None:
    broker = Mosquitto(tmp_path / "broker", certs=certs)
    broker.start()
    try:
        collector = tls_collector(broker, certs)
        await collector.start()
        s = settings(broker.url, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        async with running(s, tmp_path / "spool.db") as (uplink, spool):
            ids = await spool.append_many([msg("tls/a", i) for i in range(100)])
            await collector.wait_ids(set(map(str, ids)))
            assert uplink.status()["broker"] == broker.url
        await collector.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize(("case", "code"), [("no_client_cert", "CONNECT_FAILED"),
                                            ("wrong_ca", "CONNECT_FAILED"),
                                            ("missing_files", "LINK_ERROR")])
async def test_tls_failures_are_reported_and_keep_the_spool(tmp_path: Path, certs: Certs, case: str,
                                                             code: str) -> None:
    broker = Mosquitto(tmp_path / "broker", certs=certs)
    broker.start()
    try:
        kw: dict[str, Any] = {
            "no_client_cert": {"ca_file": certs.ca},
            "wrong_ca": {"ca_file": certs.other_ca, "cert_file": certs.client_cert, "key_file": certs.client_key},
            "missing_files": {"ca_file": tmp_path / "nope.crt"},
        }[case]
        async with running(settings(broker.url, **kw), tmp_path / "spool.db") as (uplink, spool):
            await spool.append_many([msg("tls/a", i) for i in range(20)])
            await wait_for(lambda: len(uplink.status()["errors"]) >= 2, what="two failed attempts")
            status = uplink.status()
            assert status["state"] in {"backoff", "connecting"}
            assert {e["code"] for e in status["errors"]} == {code}
            assert spool.stats().messages == 20
    finally:
        broker.stop()


async def test_refused_password_is_reported_then_right_password_delivers_everything(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"device": "s3cret", "cloud": "cloudpw"})
    broker.start()
    try:
        collector = Collector(broker.port, client_kwargs={"username": "cloud", "password": "cloudpw"})
        await collector.start()
        bad = settings(broker.url.replace("mqtt://", "mqtt://device:hunter2@"), username="device", password="wrong")
        async with running(bad, tmp_path / "spool.db") as (uplink, spool):
            ids = await spool.append_many([msg("auth/a", i) for i in range(50)])
            await wait_for(lambda: any(e["code"] == "AUTH_REFUSED" for e in uplink.status()["errors"]),
                           what="AUTH_REFUSED")
            assert "hunter2" not in str(uplink.status())  # no password in status or logs
            assert spool.stats().messages == 50
        good = settings(broker.url, username="device", password="s3cret")
        async with running(good, tmp_path / "spool.db") as (uplink, spool):
            await collector.wait_ids(set(map(str, ids)))
            await wait_for(lambda: spool.stats().messages == 0, what="drained")
        await collector.stop()
    finally:
        broker.stop()


async def test_unreachable_broker_backs_off_exponentially(tmp_path: Path) -> None:
    from sync_testkit import free_port

    s = settings(f"mqtt://127.0.0.1:{free_port()}", reconnect_initial_s=0.02, reconnect_max_s=0.08,
                 reconnect_jitter=0.0)
    async with running(s, tmp_path / "spool.db") as (uplink, _):
        await wait_for(lambda: uplink.counters["connects"] == 0 and len(uplink.errors) >= 4, what="4 attempts")
        await asyncio.sleep(0)
        assert uplink.status()["state"] in {"backoff", "connecting"}
