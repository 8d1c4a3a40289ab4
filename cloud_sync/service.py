"""CloudSync: what the daemon builds — the spool, the uplink, the forwarder, device status, and the
IPC operations through which components reach the cloud.

IPC operations (registered on the core, authorized like Greengrass's MQTT proxy):

* ``cloud.publish`` {topic, payload, qos=1, priority=0, ttl_s=None, retain=False, raw=False,
  properties=None} → {id}
  needs ``aws.greengrass.ipc.mqttproxy`` / ``aws.greengrass#PublishToIoTCore`` on the topic;
  returns once the message is durable in the spool (the id is what the cloud deduplicates on).
  ``properties`` (with ``raw`` only): MQTT 5 publish properties, see :data:`PROPERTY_NAMES`.
* ``cloud.subscribe`` {filter, queue_size=1024} → stream of {topic, payload, dropped, retain,
  properties?} needs ``aws.greengrass#SubscribeToIoTCore`` on the filter; ``properties`` only
  when the cloud message had MQTT 5 ones (the names of :data:`PROPERTY_NAMES`).
* ``sync.status`` {} → the spool, link and forwarder figures (``nucleus sync status``). No policy;
  a component gets the figures only (see :data:`OPERATOR_ONLY`).

Device status goes to ``status_topic`` (retained, not spooled: see Uplink.publish_latest) when
it changes and every ``heartbeat_s``.

Fleet deployments (cloud_sync.inbound) run once the daemon attaches its engine with
:meth:`CloudSync.attach_deployments` and forwards the engine's status changes to
:meth:`CloudSync.deployment_changed`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from cloud_sync.deployment_document import is_deployment_topic
from cloud_sync.envelope import (
    KIND_JSON,
    KIND_VERBATIM,
    KIND_VERBATIM_PROPS,
    MAX_PROPERTIES_BYTES,
    encode_payload,
    with_properties,
)
from cloud_sync.errors import MessageRejected, SpoolError, SpoolFullError
from cloud_sync.forwarder import Forwarder
from cloud_sync.inbound import FleetDeployments, Lookup, Submit
from cloud_sync.settings import SyncSettings
from cloud_sync.spool import NewMessage, Spool, SpoolLimits
from cloud_sync.uplink import ERRORS_KEPT, Uplink
from ipc.core import CallContext, IpcCore
from ipc.errors import InvalidArguments, LimitExceeded, ServiceError
from ipc.topics import validate_filter, validate_topic

log = structlog.get_logger("cloud_sync.service")

MQTTPROXY = "aws.greengrass.ipc.mqttproxy"
OP_PUBLISH_IOT = "aws.greengrass#PublishToIoTCore"
OP_SUBSCRIBE_IOT = "aws.greengrass#SubscribeToIoTCore"
MAX_PRIORITY = 255
MAX_TTL_S = 10 * 365 * 24 * 3600.0
READY_TIMEOUT_S = 30.0
#: cloud.publish ``properties`` (raw messages only): MQTT 5 publish properties, as Greengrass 2.10+
#: carries PublishToIoTCore's userProperties, messageExpiryIntervalSeconds, correlationData,
#: responseTopic, payloadFormat and contentType. Under MQTT 3.1.1 there is no place for them.
PROPERTY_NAMES = frozenset({"user_properties", "message_expiry_s", "correlation_data", "response_topic",
                            "payload_format", "content_type"})
#: sync.status parts only the nucleus CLI sees: every component's cloud filters, the broker's
#: address, the link's and the spool's error lines (they name topics, paths and the MQTT user), the
#: spool's path (the daemon's root) and the fleet deployments. A component, which needs no policy
#: for sync.status, gets the link state and the counters, enough to know whether its messages move.
OPERATOR_ONLY = {"link": ("broker", "subscriptions", "errors"), "spool": ("path", "error"),
                 "": ("errors", "deployments")}


class CloudSync:
    def __init__(self, settings: SyncSettings | Any, core: IpcCore, *, spool_path: Path, thing_name: str,
                 status_provider: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time, thing_groups: Sequence[str] = (),
                 deployment_state_path: Path | None = None) -> None:
        self.settings = settings if isinstance(settings, SyncSettings) else SyncSettings.from_section(settings)
        s = self.settings
        self._core = core
        self._thing = thing_name
        self._status_provider = status_provider
        self._clock = clock
        limits = SpoolLimits(s.spool_max_bytes, s.spool_max_messages, s.overflow, s.durability,
                             s.spool_reserve_bytes, s.spool_min_free_bytes)
        self.spool = Spool(spool_path, limits, clock=clock, on_quarantine=self._spool_quarantined)
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self.uplink = Uplink(s, self.spool, thing_name=thing_name, on_error=self._record_error)
        self.forwarder = Forwarder(core, self.spool, s.forward_rules, thing_name=thing_name)
        self.deployments = FleetDeployments(
            self.uplink, thing_name=thing_name, thing_groups=thing_groups,
            state_path=deployment_state_path or spool_path.with_name("fleet-deployments.json"),
            on_error=self._record_error, clock=clock)
        self._deployments_attached = False
        self.status_topic = s.status_topic.format(thing=thing_name)
        self._ready = asyncio.Event()
        self._open_error: SpoolError | None = None
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._status_kick = asyncio.Event()
        self._status_seq = itertools.count(1)
        self._started = False
        self.counters = {"published": 0, "refused_full": 0, "refused_disk_full": 0, "refused_invalid": 0}

    # --- IPC ------------------------------------------------------------------------------------------
    def register_operations(self) -> None:
        self._core.register("cloud.publish", self._op_publish)
        self._core.register_stream("cloud.subscribe", self._op_subscribe)
        self._core.register("sync.status", self._op_status)

    def attach_deployments(self, submit: Submit, lookup: Lookup | None = None) -> None:
        """Accept fleet deployments (unless ``deployments: false``): the daemon's engine entry points."""
        if self.settings.deployments:
            self.deployments.attach(submit, lookup)
            self._deployments_attached = True

    def deployment_changed(self, deployment_id: str, summary: dict[str, Any]) -> None:
        """The engine's listener: a deployment's status changed (fleet report, device status now)."""
        if self._deployments_attached:
            self.deployments.deployment_changed(deployment_id, summary)
        self._status_kick.set()

    async def wait_ready(self) -> None:
        """Until run() opened the spool (or failed to: then status() carries the error)."""
        await self._ready.wait()

    async def _spool_ready(self) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_S)
            except TimeoutError:
                raise ServiceError("the cloud spool is not open yet", {"path": str(self.spool.path)}) from None
        if self._open_error is not None:
            raise ServiceError(f"the cloud spool is unavailable: {self._open_error}", self._open_error.to_dict())

    def _reject(self, message: str, **details: Any) -> InvalidArguments:
        self.counters["refused_invalid"] += 1
        return InvalidArguments(f"cloud.publish: {message}", {"op": "cloud.publish", **details})

    def message_from_args(self, args: dict[str, Any]) -> NewMessage:
        """Validate cloud.publish arguments (InvalidArguments naming the argument)."""
        topic = validate_topic(args.get("topic"))
        qos = args.get("qos", 1)
        if qos is None:
            qos = 1
        if isinstance(qos, bool) or qos not in (0, 1):
            raise self._reject("qos must be 0 or 1", argument="qos", qos=repr(qos))
        priority = args.get("priority", 0)
        if priority is None:
            priority = 0
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise self._reject(f"priority must be an integer in [0, {MAX_PRIORITY}]", argument="priority")
        ttl = args.get("ttl_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)
                                or not 0 < ttl <= MAX_TTL_S):
            raise self._reject(f"ttl_s must be a number of seconds in (0, {MAX_TTL_S:.0f}] or null",
                               argument="ttl_s")
        retain = args.get("retain", False)
        if not isinstance(retain, bool):
            raise self._reject("retain must be a boolean", argument="retain")
        raw = args.get("raw", False)
        if not isinstance(raw, bool):
            raise self._reject("raw must be a boolean", argument="raw")
        try:
            payload, kind = encode_payload(args.get("payload"))
        except MessageRejected as exc:
            raise self._reject(exc.message, argument="payload") from exc
        if raw:  # sent alone and unchanged, whatever mqtt.envelope says (Greengrass's PublishToIoTCore)
            if kind == KIND_JSON:
                raise self._reject("a raw payload must be bytes or text (it is sent as it is)", argument="payload")
            kind = KIND_VERBATIM
        limit = self.settings.max_payload_bytes
        if len(payload) > limit:
            raise self._reject(f"payload of {len(payload)} B exceeds the limit of {limit} B",
                               argument="payload", size=len(payload), limit=limit, topic=topic)
        props = self._properties(args.get("properties"), raw=raw, payload=payload)
        if props:
            expiry = props.get("message_expiry_s")
            if expiry is not None:  # the spool drops it once the cloud would no longer want it
                ttl = min(float(expiry), float(ttl)) if ttl is not None else min(float(expiry), MAX_TTL_S)
            payload, kind = with_properties(payload, props), KIND_VERBATIM_PROPS
        return NewMessage(topic, payload, kind, qos=qos, retain=retain, priority=priority,
                          ttl_s=float(ttl) if ttl is not None else None)

    def _properties(self, value: Any, *, raw: bool, payload: bytes) -> dict[str, Any]:
        """cloud.publish ``properties``: the MQTT 5 publish properties of a raw message, normalized.

        Checked here, not at the broker: a property the broker refuses would end the link at every
        attempt to send the message, and it stays first in the spool.
        """
        if value is None or value == {}:
            return {}
        if not isinstance(value, dict):
            raise self._reject("properties must be an object", argument="properties")
        if not raw:
            raise self._reject("properties need raw: true (an envelope carries no per-message properties)",
                               argument="properties")
        unknown = sorted(set(value) - PROPERTY_NAMES)
        if unknown:
            raise self._reject(f"unknown properties {unknown} (known: {sorted(PROPERTY_NAMES)})",
                               argument="properties")
        out: dict[str, Any] = {}
        user = value.get("user_properties")
        if user is not None:
            pairs = [(u.get("key"), u.get("value")) if isinstance(u, dict) else tuple(u) if isinstance(u, list | tuple)
                     else (None, None) for u in (user if isinstance(user, list) else [None])]
            if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
                raise self._reject("properties.user_properties must be a list of [key, value] strings",
                                   argument="properties.user_properties")
            if pairs:
                out["user_properties"] = [list(p) for p in pairs]
        expiry = value.get("message_expiry_s")
        if expiry is not None:
            if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 < expiry <= 0xFFFFFFFF:
                raise self._reject("properties.message_expiry_s must be an integer of seconds in [1, 4294967295]",
                                   argument="properties.message_expiry_s")
            out["message_expiry_s"] = expiry
        corr = value.get("correlation_data")
        if corr is not None:
            if not isinstance(corr, bytes | bytearray | memoryview):
                raise self._reject("properties.correlation_data must be bytes", argument="properties.correlation_data")
            out["correlation_data"] = base64.b64encode(bytes(corr)).decode()
        for key in ("response_topic", "content_type"):
            text = value.get(key)
            if text is not None:
                if not isinstance(text, str) or not text:
                    raise self._reject(f"properties.{key} must be a non-empty string", argument=f"properties.{key}")
                out[key] = validate_topic(text) if key == "response_topic" else text
        fmt = value.get("payload_format")
        if fmt is not None:
            if fmt not in ("bytes", "utf8"):
                raise self._reject("properties.payload_format must be 'bytes' or 'utf8'",
                                   argument="properties.payload_format")
            if fmt == "utf8":
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise self._reject(f"payload_format utf8 but the payload is not UTF-8 ({exc.reason} at byte "
                                       f"{exc.start})", argument="properties.payload_format") from exc
                out["payload_format"] = fmt
        size = len(json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > MAX_PROPERTIES_BYTES:
            raise self._reject(f"properties of {size} B exceed the limit of {MAX_PROPERTIES_BYTES} B",
                               argument="properties")
        return out

    async def publish(self, message: NewMessage) -> str:
        """Spool one message (the nucleus's own path, no authorization); its id once durable."""
        await self._spool_ready()
        try:
            message_id = await self.spool.append(message)
        except SpoolFullError as exc:
            key = "refused_disk_full" if exc.reason == "disk_full" else "refused_full"
            self.counters[key] += 1
            if exc.reason == "disk_full":
                self._record_error({"ts": self._clock(), "code": "DISK_FULL", "message": exc.message,
                                    "path": exc.path})
            raise LimitExceeded(f"cloud.publish: {exc.message}",
                                {"reason": exc.reason, "topic": message.topic, "path": exc.path}) from exc
        except SpoolError as exc:
            self._record_error({"ts": self._clock(), "code": exc.code, "message": exc.message, "path": exc.path})
            raise ServiceError(f"cloud.publish: {exc.message}", exc.to_dict()) from exc
        self.counters["published"] += 1
        return message_id

    async def _op_publish(self, ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        topic = validate_topic(args.get("topic"))
        if is_deployment_topic(topic):
            # Whatever the policy says ("*" included): a document published there through this
            # device's link comes back as a fleet deployment, to this device or its whole group,
            # and runs what it names with the daemon's rights.
            raise self._reject(f"{topic} is a fleet deployment topic: only an operator publishes deployment "
                               "documents (nucleus fleet deploy), never a component", argument="topic", topic=topic)
        ctx.authorize(MQTTPROXY, OP_PUBLISH_IOT, topic)
        return {"id": await self.publish(self.message_from_args(args))}

    async def _op_subscribe(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        topic_filter = validate_filter(args.get("filter"))
        ctx.authorize(MQTTPROXY, OP_SUBSCRIBE_IOT, topic_filter)
        queue_size = args.get("queue_size", 1024)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or not 1 <= queue_size <= 100_000:
            raise InvalidArguments("cloud.subscribe: queue_size must be an integer in [1, 100000]",
                                   {"argument": "queue_size"})
        async with self.uplink.subscribe(topic_filter, queue_size=queue_size) as sub:
            async for msg, dropped in sub:
                item = {"topic": msg.topic, "payload": msg.payload, "dropped": dropped, "retain": msg.retain}
                if msg.properties:
                    item["properties"] = msg.properties
                yield item

    async def _op_status(self, ctx: CallContext, args: dict[str, Any]) -> dict[str, Any]:
        if self._ready.is_set() and self._open_error is None:
            await self.spool.refresh_stats()
        status = self.status()
        if ctx.principal.kind != "nucleus":
            for section, keys in OPERATOR_ONLY.items():
                part = status.get(section) if section else status
                if isinstance(part, dict):
                    for key in keys:
                        part.pop(key, None)
        return status

    # --- status -----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        spool: dict[str, Any]
        try:
            spool = self.spool.stats().as_dict()
        except SpoolError as exc:
            spool = {"error": str(exc if self._open_error is None else self._open_error)}
        return {
            "thing_name": self._thing,
            "status_topic": self.status_topic,
            "spool": {"path": str(self.spool.path), **spool,
                      "max_messages": self.settings.spool_max_messages,
                      "max_bytes": self.settings.spool_max_bytes, "overflow": self.settings.overflow},
            "link": self.uplink.status(),
            "publish": dict(self.counters),
            "forwarder": dict(self.forwarder.counters),
            "deployments": self.deployments.summary() if self._deployments_attached else None,
            "errors": list(self.errors),
        }

    def _spool_quarantined(self, moved: Path, why: str, kept: int) -> None:
        self._record_error({"ts": self._clock(), "code": "SPOOL_ERROR", "path": str(self.spool.path),
                            "message": f"the spool file {self.spool.path} was corrupt ({why}): moved to {moved} "
                                       f"and a new spool started with the {kept} messages that could still be read"})

    def _record_error(self, entry: dict[str, Any]) -> None:
        if entry.get("code") == "INBOUND_OVERSIZED" and self._deployments_attached:
            self.deployments.inbound_dropped(entry)
        if entry not in self.errors:
            self.errors.append(entry)
        self._status_kick.set()

    def status_changed(self) -> None:
        """Ask for a status report now (e.g. a deployment finished); otherwise it is polled."""
        self._status_kick.set()

    def device_status(self, reason: str) -> dict[str, Any]:
        device: dict[str, Any] = {}
        if self._status_provider is not None:
            try:
                device = self._status_provider()
            except Exception as exc:
                log.exception("sync.status_provider_failed")
                device = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            spool = self.spool.stats().as_dict()
        except SpoolError:
            spool = {}
        return {"thing": self._thing, "ts": self._clock(), "seq": next(self._status_seq), "reason": reason,
                "device": device,
                "fleet": self.deployments.summary() if self._deployments_attached else None,
                "sync": {"backlog": spool.get("messages"), "backlog_bytes": spool.get("bytes"),
                         "dropped_overflow": spool.get("dropped_overflow"),
                         "dropped_expired": spool.get("dropped_expired"),
                         "rejected_full": spool.get("rejected_full"),
                         "rejected_disk_full": spool.get("rejected_disk_full"),
                         "errors": list(self.errors)}}

    async def _report_status(self) -> None:
        s = self.settings
        last_key: str | None = None
        last_sent = 0.0
        while not self._stop.is_set():
            device = self._status_provider() if self._status_provider is not None else {}
            fleet = self.deployments.summary() if self._deployments_attached else None
            try:  # a backlog appearing, or drained after an outage, is news; its every message is not
                backlog_empty: bool | None = self.spool.stats().messages == 0
            except SpoolError:
                backlog_empty = None
            key = json.dumps([device, list(self.errors), fleet, backlog_empty], sort_keys=True, default=str)
            now = time.monotonic()
            reason = None
            if key != last_key:
                reason = "startup" if last_key is None else "change"
            elif now - last_sent >= s.heartbeat_s:
                reason = "heartbeat"
            if reason is not None:
                doc = self.device_status(reason)
                self.uplink.publish_latest(self.status_topic, json.dumps(doc, default=str).encode())
                log.info("sync.status_reported", reason=reason, topic=self.status_topic)
                last_key, last_sent = key, now
            self._status_kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_kick.wait(), s.status_check_s)

    # --- lifetime ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Open the spool, then run the uplink, the forwarder and the status reporter until close()."""
        self._started = True
        try:
            try:
                await self.spool.open()
            except SpoolError as exc:
                self._open_error = exc
                self._record_error({"ts": self._clock(), "code": exc.code, "message": exc.message, "path": exc.path})
                log.error("sync.spool_unavailable", error=exc.message, path=exc.path)  # noqa: TRY400
                self._ready.set()
                await self._stop.wait()
                return
            self._ready.set()
            tasks = [asyncio.create_task(self.uplink.run(), name="uplink"),
                     asyncio.create_task(self.forwarder.run(), name="forwarder"),
                     asyncio.create_task(self._report_status(), name="status")]
            if self._deployments_attached:
                tasks.append(asyncio.create_task(self.deployments.run(), name="fleet-deployments"))
            try:
                await self._stop.wait()
            finally:
                await self.uplink.close()
                for task in tasks[1:]:
                    task.cancel()
                try:
                    await asyncio.wait_for(asyncio.shield(tasks[0]), self.settings.flush_timeout_s + 5.0)
                except TimeoutError:
                    tasks[0].cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await self.spool.close()
        finally:
            self._done.set()

    async def close(self) -> None:
        """Stop: in-flight PUBACKs get flush_timeout_s, the spool is committed and closed."""
        self._stop.set()
        if self._started:
            await self._done.wait()
        else:
            await self.spool.close()
