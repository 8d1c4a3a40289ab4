"""The MQTT client side of the broker link: what needs aiomqtt and paho, apart from the link itself.

cloud_sync.uplink imports this when a broker is configured (and ``nucleus fleet`` always): a device
that keeps everything in its spool does not load the MQTT client.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync import envelope
from cloud_sync.envelope import Record
from cloud_sync.settings import SETTINGS_NAMES, BrokerAddress, LinkNames

# CONNACK codes meaning "your credentials are refused" (MQTT 3.1.1: 4, 5; MQTT 5: 134, 135, 138)
_AUTH_REFUSED = {4, 5, 134, 135, 138}
# X509 verification results that are about the broker's certificate itself, not about whom it is signed by
_X509_NOT_YET_VALID, _X509_EXPIRED, _X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH = 9, 10, 62, 64
_SSL_REASON = re.compile(r"\[SSL: (\w+)\] ([^(]*)")


class ClosedBeforeConnack(MqttCodeError):
    """The connection closed before the CONNACK; ``socket_error`` is what paho saw, if anything.

    With TLS 1.3 a broker refuses a client certificate only after the handshake, by an alert that
    paho reads (and logs) as a socket error; without it the attempt would say "Unspecified error".
    """

    def __init__(self, rc: Any, socket_error: str | None) -> None:
        super().__init__(rc, "the connection closed before the CONNACK")
        self.socket_error = socket_error

    def __str__(self) -> str:
        return f"the connection closed before the CONNACK: {self.socket_error or 'no reason given'}"


def fail_connect_on_close(client: aiomqtt.Client, logger: Any) -> None:
    """Fail the connect at once when the connection closes before the CONNACK, saying why.

    aiomqtt 2.5 ignores a disconnect that comes before the CONNACK and waits for its timeout, so a
    link that accepts TCP and closes it (a proxy or load balancer whose broker is down, a broker at
    its connection limit) cost ``connect_timeout_s`` (10 s) per attempt instead of the backoff.

    paho's own log lines go through ``logger`` (structured) instead of printing raw to stderr: the
    socket error before the CONNACK becomes part of the uplink's one error for the attempt.
    """
    paho_client = client._client
    paho_client.disable_logger()
    aiomqtt_on_disconnect = cast("Callable[..., None] | None", paho_client.on_disconnect)  # a VERSION2 callback
    socket_error: list[str] = []

    def on_log(c: paho.Client, userdata: Any, level: int, message: str) -> None:
        if level not in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            return
        if level == paho.MQTT_LOG_ERR and not client._connected.done():
            socket_error[:] = [message]
        else:
            logger.warning("uplink.mqtt_client", message=message)

    def on_disconnect(c: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        pending = client._connected
        if not pending.done():
            pending.set_exception(ClosedBeforeConnack(reason_code, socket_error[0] if socket_error else None))
        if aiomqtt_on_disconnect is not None:
            aiomqtt_on_disconnect(c, userdata, flags, reason_code, properties)

    paho_client.on_log = on_log
    paho_client.on_disconnect = on_disconnect


CONNECT_FAILURE_LOG = {"AUTH_REFUSED": ("error", "uplink.connect_refused"),
                        "CONNECT_REFUSED": ("error", "uplink.connect_refused"),
                        "TLS_FAILED": ("error", "uplink.tls_failed"),
                        "CONNECT_FAILED": ("warning", "uplink.connect_failed")}


def connect_failure(exc: BaseException, address: BrokerAddress, *, ca_file: Path | None, cert_file: Path | None,
                    username: str | None, names: LinkNames = SETTINGS_NAMES) -> tuple[str, str, dict[str, Any]]:
    """(code, message, fields) for a connection attempt that failed before the CONNACK.

    The code is AUTH_REFUSED, CONNECT_REFUSED, TLS_FAILED (with ``setting``) or CONNECT_FAILED. The
    client must have been set up by :func:`fail_connect_on_close`, which keeps the socket error that
    tells a refused client certificate apart. One owner for the daemon's link and ``nucleus fleet``,
    which name their settings through ``names``.
    """
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(exc, MqttConnectError) and code in _AUTH_REFUSED:
        who = (f"{names.username} {username!r} and its {names.password}" if username is not None
               else f"a connection without {names.username} and {names.password}")
        return "AUTH_REFUSED", f"the broker refused {who}: {exc}", {"rc": code}
    if isinstance(exc, MqttConnectError):
        return "CONNECT_REFUSED", f"the broker refused the connection: {exc}", {"rc": code}
    tls = _tls_failure(exc, address, ca_file, cert_file, names)
    if tls is not None:
        return "TLS_FAILED", tls[0], {"setting": tls[1]}
    hint = ""
    if not address.tls and isinstance(exc, ClosedBeforeConnack) and exc.socket_error is not None \
            and "reset by peer" in exc.socket_error:
        hint = f" (a TLS listener resets a plain connection: if it is one, {names.url} must be mqtts://)"
    if closed_after_handshake(exc, address):
        cert = f" {names.cert_file} {cert_file}" if cert_file is not None else ""
        hint = (" (the broker ended the TLS connection without giving a reason, as a TLS 1.3 broker can when "
                f"it refuses the client certificate{cert}: check that certificate and the broker's log)")
    return "CONNECT_FAILED", f"cannot reach the broker: {exc}{hint}", {}


def _tls_failure(exc: BaseException, address: BrokerAddress, ca_file: Path | None, cert_file: Path | None,
                 names: LinkNames) -> tuple[str, str] | None:
    """(message, setting) when a connect failed in TLS: the certificate check on either side.

    OpenSSL says "certificate verify failed" whether the CA file is wrong, the broker's
    certificate has expired or is for another host; and a broker refusing the device's own
    certificate shows as a closed connection. This says which, and which setting to look at.
    """
    if not address.tls:
        return None
    cause = exc.__context__  # aiomqtt raises MqttError(str(exc)) from None: the SSL error is the context
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message
        if cause.verify_code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            return (f"the broker's certificate is not valid for {address.host}, the host in {names.url} "
                    f"({detail})", names.url)
        if cause.verify_code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
            return f"the broker's certificate is out of its validity period ({detail})", names.url
        trusted = (f"a CA in {names.ca_file} {ca_file}" if ca_file is not None
                   else f"the system's CAs ({names.ca_file} is not set)")
        return f"the broker's certificate is not signed by {trusted} ({detail})", names.ca_file
    if isinstance(cause, ConnectionResetError):  # a plain listener resets a TLS ClientHello
        return (f"the broker closed the connection during the TLS handshake ({cause}): if port {address.port} "
                f"is a plain listener, {names.url} must be mqtt://", names.url)
    if isinstance(cause, ssl.SSLError):
        reason, text = cause.reason or "", str(cause)
    elif isinstance(exc, ClosedBeforeConnack) and exc.socket_error is not None \
            and (found := _SSL_REASON.search(exc.socket_error)):
        reason, text = found.group(1), found.group(2).strip()
    else:
        return None
    if "CERTIFICATE_REQUIRED" in reason or (cert_file is None and "HANDSHAKE_FAILURE" in reason):
        return (f"the broker requires a client certificate and none is configured: set {names.cert_file} "
                f"and {names.key_file} ({text})", names.cert_file)
    if "ALERT" in reason and cert_file is not None:
        return (f"the broker refused the client certificate {names.cert_file} {cert_file} ({text})",
                names.cert_file)
    return f"the TLS handshake with the broker failed ({text})", names.url


def closed_after_handshake(exc: BaseException, address: BrokerAddress) -> bool:
    """A TLS connection the broker closed before the CONNACK without a word: a plain close, or an
    unexpected EOF.

    With TLS 1.3 a broker refuses a client certificate after the handshake, by an alert and a close
    that race (the CONNECT it has not read can turn the close into a reset, which discards the
    alert): when the close wins, this is all the client sees of the refusal. Python reads an EOF
    without close_notify as a plain close (``suppress_ragged_eofs``); paho's write of the CONNECT
    reports it as the EOF error."""
    if not (address.tls and isinstance(exc, ClosedBeforeConnack)):
        return False
    return exc.socket_error is None or "EOF occurred in violation of protocol" in exc.socket_error


def publish_properties(record: Record, extra: dict[str, Any], now: float) -> Properties:
    """The MQTT 5 PUBLISH properties of a message sent alone: its id, and those its publisher gave.

    The message expiry counts from the publish, as on Greengrass: the time the message waited in
    the spool is taken off (the spool dropped it once it had all gone: ``ttl_s``).
    """
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [*(tuple(p) for p in extra.get("user_properties", ())), (envelope.ID_PROPERTY, record.id)]
    expiry = extra.get("message_expiry_s")
    if isinstance(expiry, int):
        props.MessageExpiryInterval = max(1, expiry - int(max(0.0, now - record.created)))
    if isinstance(extra.get("correlation_data"), str):
        props.CorrelationData = base64.b64decode(extra["correlation_data"])
    if isinstance(extra.get("response_topic"), str):
        props.ResponseTopic = extra["response_topic"]
    if extra.get("payload_format") == "utf8":
        props.PayloadFormatIndicator = 1
    if isinstance(extra.get("content_type"), str):
        props.ContentType = extra["content_type"]
    return props


def received_properties(props: Any) -> dict[str, Any]:
    """A cloud message's MQTT 5 properties in cloud.subscribe's names (``properties``); {} if none."""
    if props is None:
        return {}
    out: dict[str, Any] = {}
    user = getattr(props, "UserProperty", None)
    if user:
        out["user_properties"] = [[str(k), str(v)] for k, v in user]
    expiry = getattr(props, "MessageExpiryInterval", None)
    if isinstance(expiry, int):
        out["message_expiry_s"] = expiry
    corr = getattr(props, "CorrelationData", None)
    if isinstance(corr, bytes | bytearray):
        out["correlation_data"] = bytes(corr)
    for attr, key in (("ResponseTopic", "response_topic"), ("ContentType", "content_type")):
        value = getattr(props, attr, None)
        if isinstance(value, str):
            out[key] = value
    if getattr(props, "PayloadFormatIndicator", None) is not None:
        out["payload_format"] = "utf8" if props.PayloadFormatIndicator == 1 else "bytes"
    return out
