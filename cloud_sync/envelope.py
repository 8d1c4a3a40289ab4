"""What a spooled message looks like on the wire: payload kinds and the batch envelope.

aiomqtt publishes about 4,200 QoS 1 messages/s one at a time on a 2-core machine, so a backlog of
100k messages would take half a minute. The ``batch`` envelope carries many spooled messages for
the same topic in one MQTT message (one PUBACK), each with its stable id so the cloud can drop
the duplicates that at-least-once delivery implies. ``raw`` sends each payload unchanged, the id
travelling as the MQTT 5 user property ``nucleus-id``.

The envelope is JSON, so that cloud rule engines can read it::

    {"v": 1, "thing": "turbine-7", "messages": [
        {"id": "5f0c9a1e2b7d4c33:1041", "ts": 1732450000.123, "payload": {"level": 3}},
        {"id": "5f0c9a1e2b7d4c33:1042", "ts": 1732450000.125, "payload_b64": "AAEC"}]}

JSON payloads are embedded as JSON (no re-encoding: the spool stores the JSON text), text as a
JSON string, bytes as base64 in ``payload_b64``.

A message spooled as ``verbatim`` (Greengrass's PublishToIoTCore, or ``cloud.publish`` with
``raw: true``) always travels alone with its bytes unchanged, whatever the device's envelope: a
component written for Greengrass publishes what the cloud's rules already parse, and wrapping it
would silently change the data contract with the cloud side.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cloud_sync.errors import MessageRejected

ENVELOPE_VERSION = 1
CONTENT_TYPE_BATCH = "application/vnd.nucleus.batch+json"
ID_PROPERTY = "nucleus-id"

Kind = Literal["j", "t", "b", "v", "w"]
KIND_JSON: Kind = "j"
KIND_TEXT: Kind = "t"
KIND_BYTES: Kind = "b"
KIND_VERBATIM: Kind = "v"  # bytes published as they are, never inside an envelope
KIND_VERBATIM_PROPS: Kind = "w"  # the same, with MQTT 5 publish properties stored ahead of the bytes
VERBATIM_KINDS: frozenset[str] = frozenset({KIND_VERBATIM, KIND_VERBATIM_PROPS})
MAX_PROPERTIES_BYTES = 8 * 1024
"""The stored properties of one message at most (IoT Core allows 8 KB of user properties)."""
_HEAD = struct.Struct(">I")


def with_properties(payload: bytes, properties: dict[str, Any]) -> bytes:
    """A ``w`` record's spooled bytes: the properties (JSON, length first), then the payload.

    Kept in the payload column so that the spool's schema (and a spool written by an older
    daemon) stays as it is; only the uplink reads them back (:func:`verbatim_parts`).
    """
    head = json.dumps(properties, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _HEAD.pack(len(head)) + head + payload


def verbatim_parts(record: Record) -> tuple[dict[str, Any], bytes]:
    """(MQTT 5 properties, payload) of a record sent alone; no properties for other kinds."""
    if record.kind != KIND_VERBATIM_PROPS:
        return {}, record.payload
    (n,) = _HEAD.unpack_from(record.payload)
    head = json.loads(record.payload[_HEAD.size:_HEAD.size + n])
    return (head if isinstance(head, dict) else {}), record.payload[_HEAD.size + n:]


def encode_payload(value: Any) -> tuple[bytes, Kind]:
    """A publisher's value as (bytes, kind): bytes stay bytes, str is text, the rest is JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), KIND_BYTES
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass"), KIND_TEXT
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MessageRejected(f"payload is not bytes, text or JSON-encodable: {exc}",
                              reason="unencodable") from exc
    return text.encode("utf-8"), KIND_JSON


@dataclass(frozen=True, slots=True)
class Record:
    """One spooled message as the uplink sees it."""

    seq: int
    id: str
    topic: str
    payload: bytes
    kind: Kind
    qos: int
    retain: bool
    priority: int
    created: float

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic)


def _item(record: Record) -> bytes:
    head = b'{"id":"' + record.id.encode() + b'","ts":' + repr(round(record.created, 3)).encode()
    if record.kind == KIND_JSON:
        return head + b',"payload":' + record.payload + b"}"
    if record.kind == KIND_TEXT:
        text = json.dumps(record.payload.decode("utf-8", "replace"), ensure_ascii=False)
        return head + b',"payload":' + text.encode("utf-8") + b"}"
    return head + b',"payload_b64":"' + base64.b64encode(record.payload) + b'"}'


def item_size(record: Record) -> int:
    """An upper bound of the record's size inside an envelope (for batch limits)."""
    n = len(record.payload)
    if record.kind == KIND_BYTES:
        n = (n + 2) // 3 * 4
    elif record.kind == KIND_TEXT:
        n = n * 2 + 2
    return n + len(record.id) + 48


def batch(thing: str, records: Sequence[Record]) -> bytes:
    head = b'{"v":1,"thing":' + json.dumps(thing).encode() + b',"messages":['
    return head + b",".join(_item(r) for r in records) + b"]}"


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message as the cloud reads it back from an envelope (or a raw publish)."""

    id: str | None
    ts: float | None
    payload: Any


def parse(data: bytes) -> tuple[str | None, list[Delivered]]:
    """The cloud side of :func:`batch`: (thing, messages). Raises ValueError if it is not one."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("v") != ENVELOPE_VERSION or not isinstance(doc.get("messages"), list):
        raise ValueError("not a nucleus batch envelope (v=1)")
    out: list[Delivered] = []
    for m in doc["messages"]:
        payload = base64.b64decode(m["payload_b64"]) if "payload_b64" in m else m.get("payload")
        out.append(Delivered(m.get("id"), m.get("ts"), payload))
    thing = doc.get("thing")
    return (thing if isinstance(thing, str) else None), out


def ids(messages: Iterable[Delivered]) -> list[str]:
    return [m.id for m in messages if m.id is not None]
