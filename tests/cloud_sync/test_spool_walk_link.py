"""The link's error list as an operator reads it (`nucleus sync status`): one refusal, one entry."""

from __future__ import annotations

from pathlib import Path

from cloud_sync.mqtt_session import ClosedBeforeConnack
from cloud_sync.settings import BrokerAddress, SyncSettings, parse_url
from cloud_sync.spool import Spool
from cloud_sync.uplink import Uplink

REFUSED = ("failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
           "required (_ssl.c:2427)")
EOF_ONLY = "failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)"


URL = "mqtts://127.0.0.1:8883"


def _tls_uplink(tmp_path: Path) -> tuple[Uplink, BrokerAddress]:
    """An uplink to a TLS broker that is never started: only its error list is read."""
    return Uplink(SyncSettings(url=URL), Spool(tmp_path / "spool.db"), thing_name="dev"), parse_url(URL)


def test_a_refused_client_certificate_stays_one_entry_when_the_alert_is_lost(tmp_path: Path) -> None:
    """Seen in the suite under load (test_broker_auth, no client certificate): attempts alternated
    between the broker's alert (TLS_FAILED) and a bare EOF (CONNECT_FAILED 'cannot reach the
    broker'), three entries for one mistake, the middle one sending the operator to the network."""
    uplink, address = _tls_uplink(tmp_path)
    for socket_error in (REFUSED, EOF_ONLY, REFUSED, EOF_ONLY):
        uplink._lost(ClosedBeforeConnack(7, socket_error), address)
    [entry] = uplink.errors
    assert entry["code"] == "TLS_FAILED" and entry["setting"] == "mqtt.cert_file" and entry["count"] == 4
    assert "the broker requires a client certificate" in entry["message"]


def test_a_bare_eof_alone_is_still_a_connect_failure(tmp_path: Path) -> None:
    uplink, address = _tls_uplink(tmp_path)
    uplink._lost(ClosedBeforeConnack(7, EOF_ONLY), address)
    [entry] = uplink.errors
    assert entry["code"] == "CONNECT_FAILED" and "cannot reach the broker" in entry["message"]


def test_a_refused_client_certificate_stays_one_entry_when_the_first_alert_is_lost(tmp_path: Path) -> None:
    """The same race lost on the very first attempt (seen in a CI run of test_broker_auth): the first
    entry said "cannot reach the broker", the second named the certificate. The closed connection
    was that refusal: one entry, counted twice."""
    uplink, address = _tls_uplink(tmp_path)
    for socket_error in (None, REFUSED, EOF_ONLY, REFUSED):
        uplink._lost(ClosedBeforeConnack(7, socket_error), address)
    [entry] = uplink.errors
    assert entry["code"] == "TLS_FAILED" and entry["setting"] == "mqtt.cert_file" and entry["count"] == 4
    assert "since" in entry
