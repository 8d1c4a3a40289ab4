"""TLS with a generated CA and client certificate, password auth, refused credentials: nothing spooled is lost.

Every certificate mistake a fleet meets (the wrong CA file, an expired or foreign certificate on
either side, a key that is not the certificate's, plain and TLS mixed up) is one error that names
the setting to look at, and the spool keeps everything until the link is fixed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sync_testkit import Certs, Collector, Mosquitto, free_port
from test_uplink import msg, running, settings, wait_for

from cloud_sync.settings import SyncSettings

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


Device = Callable[[Certs, Path], dict[str, Any]]

# case: (the broker's certificate, its TLS version, the device's settings, code, setting, words of the message).
# The broker refuses a client certificate during the handshake under TLS 1.2, after it under TLS 1.3.
TLS_CASES: dict[str, tuple[str, str, Device, str, str, str]] = {
    "no_client_cert_tls12": ("server_cert", "tlsv1.2", lambda c, d: {"ca_file": c.ca},
                             "TLS_FAILED", "mqtt.cert_file", "requires a client certificate"),
    "no_client_cert_tls13": ("server_cert", "tlsv1.3", lambda c, d: {"ca_file": c.ca},
                             "TLS_FAILED", "mqtt.cert_file", "requires a client certificate"),
    "client_cert_of_other_ca_tls12": ("server_cert", "tlsv1.2", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_other_ca, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.cert_file", "refused the client certificate mqtt.cert_file {client_other_ca}"),
    "client_cert_of_other_ca_tls13": ("server_cert", "tlsv1.3", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_other_ca, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.cert_file", "refused the client certificate mqtt.cert_file {client_other_ca}"),
    "client_cert_expired": ("server_cert", "tlsv1.3", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_expired, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.cert_file", "certificate expired"),
    "wrong_ca": ("server_cert", "tlsv1.2", lambda c, d: {
        "ca_file": c.other_ca, "cert_file": c.client_cert, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.ca_file", "not signed by a CA in mqtt.ca_file {other_ca}"),
    "server_cert_expired": ("server_expired", "tlsv1.2", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_cert, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.url", "certificate has expired"),
    "server_cert_for_another_host": ("server_other_host", "tlsv1.2", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_cert, "key_file": c.client_key},
        "TLS_FAILED", "mqtt.url", "not valid for 127.0.0.1, the host in mqtt.url"),
    "missing_ca_file": ("server_cert", "tlsv1.2", lambda c, d: {"ca_file": d / "nope.crt"},
                        "LINK_ERROR", "mqtt.ca_file", "mqtt.ca_file {tmp}/nope.crt: No such file or directory"),
    "key_of_another_certificate": ("server_cert", "tlsv1.2", lambda c, d: {
        "ca_file": c.ca, "cert_file": c.client_cert, "key_file": c.server_key},
        "LINK_ERROR", "mqtt.key_file", "is not the key of the certificate in mqtt.cert_file {client_cert}"),
    "certificate_without_key": ("server_cert", "tlsv1.2", lambda c, d: {"ca_file": c.ca, "cert_file": c.client_cert},
                                "LINK_ERROR", "mqtt.cert_file", "no private key in it, and mqtt.key_file is not set"),
}


@pytest.mark.parametrize("case", sorted(TLS_CASES))
async def test_tls_failures_are_one_error_naming_the_setting_and_keep_the_spool(tmp_path: Path, certs: Certs,
                                                                                case: str) -> None:
    """What an operator sees for each certificate mistake: one error (counted per attempt, not
    repeated), the setting to look at and the file; nothing spooled is lost."""
    server_cert, tls_version, device, code, setting, words = TLS_CASES[case]
    broker = Mosquitto(tmp_path / "broker", certs=certs, server_cert=getattr(certs, server_cert),
                       tls_version=tls_version)
    broker.start()
    try:
        async with running(settings(broker.url, **device(certs, tmp_path)), tmp_path / "spool.db") as (uplink, spool):
            await spool.append_many([msg("tls/a", i) for i in range(20)])
            await wait_for(lambda: bool(uplink.errors) and uplink.errors[-1].get("count", 1) >= 2,
                           what="two failed attempts")
            status = uplink.status()
            assert status["state"] in {"backoff", "connecting"} and status["connects"] == 0
            assert len(status["errors"]) == 1, status["errors"]
            error = status["errors"][0]
            assert (error["code"], error["setting"]) == (code, setting), error
            expected = words.format(tmp=tmp_path, **{f: getattr(certs, f) for f in certs.__dataclass_fields__})
            assert expected in error["message"], error["message"]
            assert spool.stats().messages == 20
    finally:
        broker.stop()


async def test_a_certificate_replaced_on_disk_is_used_at_the_next_attempt(tmp_path: Path, certs: Certs) -> None:
    """The TLS files are read at every attempt: fixing a wrong CA file recovers without a restart,
    and the backlog spooled meanwhile is delivered."""
    broker = Mosquitto(tmp_path / "broker", certs=certs)
    broker.start()
    try:
        collector = tls_collector(broker, certs)
        await collector.start()
        ca_file = tmp_path / "ca.crt"
        ca_file.write_bytes(certs.other_ca.read_bytes())
        s = settings(broker.url, ca_file=ca_file, cert_file=certs.client_cert, key_file=certs.client_key)
        async with running(s, tmp_path / "spool.db") as (uplink, spool):
            ids = await spool.append_many([msg("tls/a", i) for i in range(30)])
            await wait_for(lambda: any(e["code"] == "TLS_FAILED" for e in uplink.errors), what="TLS_FAILED")
            assert spool.stats().messages == 30
            ca_file.write_bytes(certs.ca.read_bytes())
            await collector.wait_ids(set(map(str, ids)))
            await wait_for(lambda: spool.stats().messages == 0, what="drained")
        await collector.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize("direction", ["plain_url_to_tls_listener", "tls_url_to_plain_listener"])
async def test_plain_and_tls_mixed_up_says_which_scheme(tmp_path: Path, certs: Certs, direction: str) -> None:
    tls_broker = direction == "plain_url_to_tls_listener"
    broker = Mosquitto(tmp_path / "broker", certs=certs if tls_broker else None)
    broker.start()
    try:
        url = broker.url.replace("mqtts://", "mqtt://") if tls_broker else broker.url.replace("mqtt://", "mqtts://")
        async with running(settings(url, **({} if tls_broker else {"ca_file": certs.ca})),
                           tmp_path / "spool.db") as (uplink, _):
            await wait_for(lambda: bool(uplink.errors), what="a failed attempt")
            message = uplink.errors[-1]["message"]
            assert ("mqtt.url must be mqtts://" if tls_broker else "mqtt.url must be mqtt://") in message, message
    finally:
        broker.stop()


async def test_refused_password_is_reported_then_right_password_delivers_everything(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"device": "s3cret", "cloud": "cloudpw"})
    broker.start()
    try:
        collector = Collector(broker.port, client_kwargs={"username": "cloud", "password": "cloudpw"})
        await collector.start()
        bad = settings(broker.url, username="device", password="hunter2")
        async with running(bad, tmp_path / "spool.db") as (uplink, spool):
            ids = await spool.append_many([msg("auth/a", i) for i in range(50)])
            await wait_for(lambda: bool(uplink.errors) and uplink.errors[-1].get("count", 1) >= 2,
                           what="two refusals")
            assert [e["code"] for e in uplink.errors] == ["AUTH_REFUSED"]
            assert "the broker refused mqtt.username 'device'" in uplink.errors[0]["message"]
            assert "hunter2" not in str(uplink.status())  # no password in status or logs
            assert spool.stats().messages == 50
        good = settings(broker.url, username="device", password="s3cret")
        async with running(good, tmp_path / "spool.db") as (uplink, spool):
            await collector.wait_ids(set(map(str, ids)))
            await wait_for(lambda: spool.stats().messages == 0, what="drained")
        await collector.stop()
    finally:
        broker.stop()


@pytest.mark.parametrize(("section", "words"), [
    ({"url": "mqtts://device:pw@broker:8883"}, "mqtt.url must not carry credentials (user:password@): give "
                                               "mqtt.username and mqtt.password instead"),
    ({"url": "mqtt://broker", "ca_file": "ca.crt"}, "mqtt.ca_file set but mqtt.url mqtt://broker is not TLS"),
    ({"url": "mqtts://broker", "key_file": "k.pem"}, "mqtt.key_file is set without mqtt.cert_file"),
    ({"url": "mqtts://broker", "password": 123}, "must be a string"),
    ({"url": "mqtts://broker", "password": "pw"}, "mqtt.password is set without mqtt.username"),
    ({"url": "http://broker"}, "must be mqtt://host[:port] or mqtts://host[:port]"),
])
def test_link_settings_that_would_be_ignored_are_refused(section: dict[str, Any], words: str) -> None:
    """Each of these used to start and then silently do something else: the URL's credentials were
    dropped, TLS files were ignored on a plain link (the password went in clear text), a key
    without its certificate was never sent, a YAML number was no password, a password without a user
name was never sent (MQTT sends it only with one), a bad URL left the
    daemon running without a link."""
    with pytest.raises(ValidationError, match=re.escape(words)):
        SyncSettings.model_validate(section)


def test_relative_tls_files_are_taken_from_the_root(tmp_path: Path) -> None:
    s = SyncSettings.model_validate({"url": "mqtts://broker", "ca_file": "certs/ca.crt",
                                     "cert_file": "/etc/dev.crt", "key_file": "certs/dev.key"})
    resolved = s.with_paths_under(tmp_path)
    assert (resolved.ca_file, resolved.cert_file, resolved.key_file) == (
        tmp_path / "certs/ca.crt", Path("/etc/dev.crt"), tmp_path / "certs/dev.key")


async def test_unreachable_broker_backs_off_exponentially(tmp_path: Path) -> None:
    s = settings(f"mqtt://127.0.0.1:{free_port()}", reconnect_initial_s=0.02, reconnect_max_s=0.08,
                 reconnect_jitter=0.0)
    async with running(s, tmp_path / "spool.db") as (uplink, _):
        await wait_for(lambda: uplink.counters["connects"] == 0 and bool(uplink.errors)
                       and uplink.errors[-1].get("count", 1) >= 4, what="4 attempts")
        await asyncio.sleep(0)
        assert uplink.status()["state"] in {"backoff", "connecting"}
        assert len(uplink.errors) == 1  # the same CONNECT_FAILED, counted
