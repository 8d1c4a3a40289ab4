"""Greengrass IPC operations mapped onto the core's operations, in awsiotsdk's shapes.

Every operation the server answers is described here: its request, response and stream shape
names (those of ``awsiot/greengrasscoreipc/model.py``), how the camelCase request becomes the
arguments of a core operation (``config.get``, ``deployments.create``, ...), and how the result or
stream item becomes the response or event body. Authorization stays in the core and the nucleus's
handlers, so an awsiotsdk component is held to exactly the policies a native client is.

Two operations bypass the generic path: PublishToTopic and SubscribeToTopic touch the bus
directly from the server (no task, no core call per message); the payload conversions they use
live here (:func:`publish_data`, :func:`subscription_event`) so the mapping is in one place.

Payloads between the two protocols: a ``binaryMessage`` is the bus payload ``bytes``, a
``jsonMessage`` is the JSON value; going out, a bytes payload becomes ``binaryMessage``, anything
JSON can carry becomes ``jsonMessage``, and anything else (a numpy array from a native client) is
delivered as a ``binaryMessage`` holding the msgpack data unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

from ipc import codec, config_tree
from ipc.core import IpcCore, Session
from ipc.errors import (
    Conflict,
    InvalidArguments,
    IpcError,
    LimitExceeded,
    ResourceNotFound,
    Unauthenticated,
    Unauthorized,
)
from ipc.topics import validate_filter, validate_topic

PREFIX: Final = "aws.greengrass#"

# accessControl service names (the same strings nucleus.authz uses; ipc must not import nucleus)
SVC_CONFIG: Final = "aws.greengrass.ipc.config"
SVC_CLI: Final = "aws.greengrass.Cli"
SVC_MQTTPROXY: Final = "aws.greengrass.ipc.mqttproxy"

STREAM_MANAGER: Final = "aws.greengrass.StreamManager"
"""The only component the Java nucleus lets call ValidateAuthorizationToken."""

# modeled errors
UNAUTHORIZED_ERROR: Final = PREFIX + "UnauthorizedError"
INVALID_ARGUMENTS_ERROR: Final = PREFIX + "InvalidArgumentsError"
RESOURCE_NOT_FOUND_ERROR: Final = PREFIX + "ResourceNotFoundError"
SERVICE_ERROR: Final = PREFIX + "ServiceError"
CONFLICT_ERROR: Final = PREFIX + "ConflictError"
INVALID_TOKEN_ERROR: Final = PREFIX + "InvalidTokenError"

PUBLISH_TO_TOPIC: Final = PREFIX + "PublishToTopic"
PUBLISH_TO_TOPIC_RESPONSE: Final = PREFIX + "PublishToTopicResponse"
SUBSCRIBE_TO_TOPIC: Final = PREFIX + "SubscribeToTopic"
SUBSCRIBE_TO_TOPIC_RESPONSE: Final = PREFIX + "SubscribeToTopicResponse"
SUBSCRIPTION_RESPONSE_MESSAGE: Final = PREFIX + "SubscriptionResponseMessage"
RECEIVE_ALL: Final = "RECEIVE_ALL_MESSAGES"
RECEIVE_FROM_OTHERS: Final = "RECEIVE_MESSAGES_FROM_OTHERS"


class ModeledError(IpcError):
    """An error to send as a specific modeled shape (one the core's codes do not name)."""

    def __init__(self, shape: str, message: str, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__("SERVICE_ERROR", message, fields)
        self.shape = shape


def error_shape(exc: IpcError) -> tuple[str, str, dict[str, Any]]:
    """(modeled error shape, message, extra fields) for a core error.

    The four shapes of issue 6 carry every core code: denials are UnauthorizedError, bad input
    and per-session limits InvalidArgumentsError, unknown things ResourceNotFoundError (with
    ``resourceType``/``resourceName`` when the details name them), the rest ServiceError.
    """
    if isinstance(exc, ModeledError):
        return exc.shape, exc.message, dict(exc.details)
    if isinstance(exc, Unauthorized | Unauthenticated):
        return UNAUTHORIZED_ERROR, exc.message, {}
    if isinstance(exc, InvalidArguments | LimitExceeded):
        return INVALID_ARGUMENTS_ERROR, exc.message, {}
    if isinstance(exc, ResourceNotFound):
        fields: dict[str, Any] = {}
        for key, kind in (("component", "component"), ("deployment_id", "LocalDeployment"), ("topic", "topic")):
            value = exc.details.get(key)
            if isinstance(value, str):
                fields = {"resourceType": kind, "resourceName": value}
                break
        return RESOURCE_NOT_FOUND_ERROR, exc.message, fields
    if isinstance(exc, Conflict):
        return CONFLICT_ERROR, exc.message, {}
    return SERVICE_ERROR, exc.message, {}


def unsupported(operation: str) -> ModeledError:
    return ModeledError(SERVICE_ERROR, f"operation {operation} is not supported by nucleus",
                        {"context": {"operation": operation}})


# --- JSON -------------------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(body: Any) -> bytes:
    """A response body as JSON bytes; values JSON cannot carry are made printable, never fatal."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=_json_default,
                      allow_nan=True).encode("utf-8")


def _str(req: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = req.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArguments(f"{key} must be a non-empty string", {"argument": key})
    return value


def _key_path(req: Mapping[str, Any]) -> list[str]:
    value = req.get("keyPath")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise InvalidArguments("keyPath must be a list of non-empty strings", {"argument": "keyPath"})
    return value


def _b64(req: Mapping[str, Any], key: str) -> bytes:
    value = req.get(key)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise InvalidArguments(f"{key} must be a base64 string", {"argument": key})
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArguments(f"{key} is not valid base64: {exc}", {"argument": key}) from exc


# --- publish / subscribe ----------------------------------------------------------------------------

def publish_data(req: Mapping[str, Any]) -> tuple[str, bytes]:
    """(topic, bus data) of a PublishToTopicRequest: exactly one of jsonMessage / binaryMessage."""
    topic = validate_topic(req.get("topic"))
    msg = req.get("publishMessage")
    if not isinstance(msg, dict):
        raise InvalidArguments("publishMessage must be an object", {"argument": "publishMessage"})
    json_msg = msg.get("jsonMessage")
    bin_msg = msg.get("binaryMessage")
    if (json_msg is None) == (bin_msg is None):
        raise InvalidArguments("publishMessage needs exactly one of jsonMessage and binaryMessage",
                               {"argument": "publishMessage"})
    if bin_msg is not None:
        if not isinstance(bin_msg, dict):
            raise InvalidArguments("binaryMessage must be an object", {"argument": "binaryMessage"})
        return topic, codec.encode(_b64(bin_msg, "message"))
    if not isinstance(json_msg, dict):
        raise InvalidArguments("jsonMessage must be an object", {"argument": "jsonMessage"})
    return topic, codec.encode(json_msg.get("message"))


def subscribe_request(req: Mapping[str, Any]) -> tuple[str, bool]:
    """(filter, from_others) of a SubscribeToTopicRequest."""
    topic_filter = validate_filter(req.get("topic"))
    mode = req.get("receiveMode")
    if mode is None or mode == RECEIVE_ALL:
        return topic_filter, False
    if mode == RECEIVE_FROM_OTHERS:
        return topic_filter, True
    raise InvalidArguments(f"receiveMode must be {RECEIVE_ALL} or {RECEIVE_FROM_OTHERS}",
                           {"argument": "receiveMode"})


def _ext_as_unencodable(code: int, data: bytes) -> Any:
    raise TypeError("extension type")  # e.g. a numpy array: not JSON, goes out as binaryMessage


def subscription_event(topic: str, data: bytes) -> bytes:
    """The SubscriptionResponseMessage body for one bus message, as JSON bytes.

    Decoded without numpy (an extension type falls back to the raw data), so the daemon never
    imports it for a Greengrass subscriber either.
    """
    context = {"topic": topic}
    raw = codec.encoded_bytes(data)
    if raw is not None:
        return dumps({"binaryMessage": {"message": base64.b64encode(raw).decode(), "context": context}})
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_as_unencodable)
        text = json.dumps({"jsonMessage": {"message": value, "context": context}},
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, msgpack.UnpackException, RecursionError):
        return dumps({"binaryMessage": {"message": base64.b64encode(data).decode(), "context": context}})
    return text.encode("utf-8")


# --- generic operations ---------------------------------------------------------------------------------

Unary = Callable[[IpcCore, Session, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A stream operation ready to run: the response is sent, then each core item as an event."""

    op: str
    args: dict[str, Any]
    event: Callable[[Any], Any]
    response: dict[str, Any] = field(default_factory=dict)


Prepare = Callable[[IpcCore, Session, dict[str, Any]], Awaitable[StreamPlan]]


@dataclass(frozen=True, slots=True)
class UnaryOperation:
    response_shape: str
    handler: Unary


@dataclass(frozen=True, slots=True)
class StreamOperation:
    response_shape: str
    stream_shape: str
    prepare: Prepare


def _wrap_leaf(key_path: list[str], value: Any) -> Any:
    """The Java nucleus answers a leaf as ``{last key: value}`` and an object as itself."""
    if key_path and not isinstance(value, dict):
        return {key_path[-1]: value}
    return value


async def _get_configuration(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    component = _str(req, "componentName", required=False) or s.principal.name
    key_path = _key_path(req)
    try:
        value = await core.call(s, "config.get", {"component": component, "key_path": key_path})
    except InvalidArguments as exc:
        if "no configuration value" in exc.message:  # the Java nucleus says "Key not found"
            raise ResourceNotFound(f"Key not found: {exc.message}", {"component": component}) from exc
        raise
    return {"componentName": component, "value": _wrap_leaf(key_path, value)}


def _check_restricted(key_path: list[str], value: Mapping[str, Any]) -> None:
    """Refuse an update of ``accessControl`` (``config_tree.RESTRICTED_KEYS``), at its key path or
    inside a merge at the root, before any part of the merge is written. The Java nucleus refuses
    with this InvalidArgumentsError text."""
    if config_tree.restricted_keys(key_path, value):
        raise InvalidArguments("Config update is not allowed for following fields "
                               f"[{', '.join(config_tree.RESTRICTED_KEYS)}]: a component's accessControl "
                               "comes from its deployments, not from UpdateConfiguration",
                               {"argument": "keyPath" if key_path else "valueToMerge"})


async def _update_configuration(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    key_path = _key_path(req)
    value = req.get("valueToMerge")
    if not isinstance(value, dict):
        raise InvalidArguments("valueToMerge must be an object", {"argument": "valueToMerge"})
    _check_restricted(key_path, value)
    ts = req.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        raise InvalidArguments("timestamp must be a number of seconds since the epoch", {"argument": "timestamp"})
    # The core merges at a non-empty key path; a merge at the root is one merge per top-level key.
    updates = [(key_path, value)] if key_path else [([k], v) for k, v in value.items()]
    for path, v in updates:
        await core.call(s, "config.update", {"key_path": path, "value": v, "timestamp": ts})
    return {}


async def _subscribe_configuration(core: IpcCore, s: Session, req: dict[str, Any]) -> StreamPlan:
    component = _str(req, "componentName", required=False) or s.principal.name
    key_path = _key_path(req)
    s.ctx.authorize(SVC_CONFIG, PREFIX + "SubscribeToConfigurationUpdate", component)
    core.is_stream("config.subscribe")

    def event(item: Any) -> Any:
        return {"configurationUpdateEvent": {"componentName": item.get("component", component),
                                             "keyPath": item.get("key_path", key_path)}}

    return StreamPlan("config.subscribe", {"component": component, "key_path": key_path}, event)


async def _update_state(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    await core.call(s, "state.update", {"state": _str(req, "state")})
    return {}


async def _subscribe_component_updates(core: IpcCore, s: Session, req: dict[str, Any]) -> StreamPlan:
    core.is_stream("lifecycle.subscribe_updates")

    def event(item: Any) -> Any:
        did = item.get("deployment_id")
        if item.get("kind") == "pre_update":
            return {"preUpdateEvent": {"deploymentId": did, "isGgcRestarting": False}}
        return {"postUpdateEvent": {"deploymentId": did}}

    return StreamPlan("lifecycle.subscribe_updates", {}, event)


async def _defer_component_update(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    recheck = req.get("recheckAfterMs") or 0
    if isinstance(recheck, bool) or not isinstance(recheck, int | float) or recheck < 0:
        raise InvalidArguments("recheckAfterMs must be a non-negative number", {"argument": "recheckAfterMs"})
    await core.call(s, "lifecycle.defer_update", {
        "deployment_id": _str(req, "deploymentId"), "recheck_after_s": recheck / 1000.0,
        "message": req.get("message") if isinstance(req.get("message"), str) else ""})
    return {}


async def _subscribe_validate_configuration(core: IpcCore, s: Session, req: dict[str, Any]) -> StreamPlan:
    core.is_stream("config.validation.subscribe")

    def event(item: Any) -> Any:
        return {"validateConfigurationUpdateEvent": {"configuration": item.get("configuration") or {},
                                                     "deploymentId": item.get("deployment_id")}}

    return StreamPlan("config.validation.subscribe", {}, event)


async def _send_configuration_validity_report(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    report = req.get("configurationValidityReport")
    if not isinstance(report, dict):
        raise InvalidArguments("configurationValidityReport must be an object",
                               {"argument": "configurationValidityReport"})
    message = report.get("message")
    await core.call(s, "config.validation.report", {
        "deployment_id": _str(report, "deploymentId"), "status": _str(report, "status"),
        "message": message if isinstance(message, str) else ""})
    return {}


def _component_details(d: Mapping[str, Any], *, configuration: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"componentName": d.get("name"), "version": d.get("version"), "state": d.get("state")}
    if configuration:
        out["configuration"] = d.get("configuration") or {}
    return out


async def _get_component_details(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    d = await core.call(s, "components.get", {"name": _str(req, "componentName")})
    return {"componentDetails": _component_details(d, configuration=True)}


async def _list_components(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    items = await core.call(s, "components.list", {})
    return {"components": [_component_details(d, configuration=False) for d in items]}


async def _restart_component(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    await core.call(s, "components.restart", {"name": _str(req, "componentName")})
    return {"restartStatus": "SUCCEEDED", "message": ""}


async def _stop_component(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    await core.call(s, "components.stop", {"name": _str(req, "componentName")})
    return {"stopStatus": "SUCCEEDED", "message": ""}


def _read_recipes(directory: str) -> list[dict[str, Any]]:
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArguments(f"recipeDirectoryPath {directory} is not a directory",
                               {"argument": "recipeDirectoryPath"})
    out: list[dict[str, Any]] = []
    for path in sorted(root.iterdir()):
        suffix = path.suffix.lower()
        if path.is_file() and suffix in (".json", ".yaml", ".yml"):
            out.append({"source": str(path), "text": path.read_text(),
                        "format": "json" if suffix == ".json" else "yaml"})
    return out


def _per_component(req: Mapping[str, Any], argument: str) -> dict[str, dict[str, Any]]:
    """A CreateLocalDeployment map ``{component name: {...}}`` (InvalidArguments naming it otherwise)."""
    value = req.get(argument)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArguments(f"{argument} must be an object", {"argument": argument})
    for name, entry in value.items():
        if not isinstance(entry, dict):
            raise InvalidArguments(f"{argument}.{name} must be an object", {"argument": argument})
    return value


def _config_updates(req: Mapping[str, Any]) -> dict[str, Any]:
    """componentToConfiguration ``{name: {"MERGE": {...}, "RESET": [...]}}`` (greengrass-cli's form)."""
    out: dict[str, Any] = {}
    for name, update in _per_component(req, "componentToConfiguration").items():
        keys = {str(k).lower(): v for k, v in update.items()}
        out[name] = {"merge": keys.get("merge") or {}, "reset": keys.get("reset") or []}
    return out


def _run_with(req: Mapping[str, Any]) -> dict[str, Any]:
    """componentToRunWithInfo ``{name: {posixUser, windowsUser, systemResourceLimits}}``; the native
    deployment validates the rest and names the field. ``windowsUser`` is dropped: like Greengrass on
    Linux, nucleus has no use for it, and a component written for both platforms may set it."""
    return {name: {k: v for k, v in info.items() if k != "windowsUser"}
            for name, info in _per_component(req, "componentToRunWithInfo").items()}


async def _create_local_deployment(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    # Authorize before the daemon reads any directory on the caller's behalf.
    s.ctx.authorize(SVC_CLI, PREFIX + "CreateLocalDeployment", "*")
    args: dict[str, Any] = {}
    group = _str(req, "groupName", required=False)
    if group:
        args["group"] = group
    roots = req.get("rootComponentVersionsToAdd")
    if roots is not None:
        args["root_components"] = roots
    remove = req.get("rootComponentsToRemove")
    if remove is not None:
        args["remove"] = remove
    recipe_dir = _str(req, "recipeDirectoryPath", required=False)
    if recipe_dir:
        args["recipes"] = await asyncio.to_thread(_read_recipes, recipe_dir)
    artifacts = _str(req, "artifactsDirectoryPath", required=False)
    if artifacts:
        args["artifact_dirs"] = [artifacts]
    updates = _config_updates(req)
    if updates:
        args["config_updates"] = updates
    run_with = _run_with(req)
    if run_with:
        args["run_with"] = run_with
    policy = req.get("failureHandlingPolicy")
    if policy is not None:
        args["failure_policy"] = policy
    result = await core.call(s, "deployments.create", args)
    return {"deploymentId": result["id"] if isinstance(result, dict) else str(result)}


_DETAILED: Final = {
    "SUCCEEDED": "SUCCESSFUL",
    "FAILED_NO_STATE_CHANGE": "FAILED_NO_STATE_CHANGE",
    "FAILED_ROLLBACK_COMPLETE": "FAILED_ROLLBACK_COMPLETE",
    "FAILED_ROLLBACK_NOT_REQUESTED": "FAILED_ROLLBACK_NOT_REQUESTED",
    "FAILED_ROLLBACK_FAILED": "FAILED_ROLLBACK_COMPLETE",
}


CREATED_ON_FORMAT: Final = "%d-%m-%Y %H:%M:%S UTC"
"""The Greengrass CLI's ``createdOn``: ``dd-MM-uuuu HH:mm:ss z`` in UTC, e.g. ``25-11-2026 06:09:44 UTC``."""


def created_on(created_at: Any) -> str:
    """``createdOn`` as Greengrass writes it, from the journal's seconds since the epoch.

    A component that parses the Greengrass form must not meet ``1795586984.27``; a value that is not
    a number (an older journal) is passed on as text rather than failing the listing.
    """
    if isinstance(created_at, bool) or not isinstance(created_at, int | float) or not math.isfinite(created_at):
        return "" if created_at is None else str(created_at)
    return time.strftime(CREATED_ON_FORMAT, time.gmtime(created_at))


def local_deployment(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A LocalDeployment shape from a journal summary (FAILED_* statuses collapse to FAILED)."""
    status = str(summary.get("status"))
    out: dict[str, Any] = {
        "deploymentId": summary.get("id"),
        "status": "FAILED" if status.startswith("FAILED") else status,
        "createdOn": created_on(summary.get("created_at")),
    }
    detailed = _DETAILED.get(status)
    if detailed is not None:
        details: dict[str, Any] = {"detailedDeploymentStatus": detailed}
        if summary.get("reason"):
            details["deploymentFailureCause"] = str(summary["reason"])
        out["deploymentStatusDetails"] = details
    return out


async def _get_local_deployment_status(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    deployment_id = _str(req, "deploymentId")
    try:
        summary = await core.call(s, "deployments.get", {"id": deployment_id})
    except ResourceNotFound as exc:
        if "deployment_id" in exc.details:
            raise
        # name it, as the Greengrass CLI does (resourceType LocalDeployment, resourceName the id)
        raise ResourceNotFound(exc.message, {**exc.details, "deployment_id": deployment_id}) from exc
    return {"deployment": local_deployment(summary)}


async def _list_local_deployments(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    items = await core.call(s, "deployments.list", {})
    return {"localDeployments": [local_deployment(d) for d in items]}


async def _put_component_metric(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    metrics = req.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise InvalidArguments("metrics must be a list of {name, unit, value}", {"argument": "metrics"})
    await core.call(s, "metrics.put", {"metrics": [
        {"name": m.get("name"), "unit": m.get("unit") or "None", "value": m.get("value")} for m in metrics]})
    return {}


async def _validate_authorization_token(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    if s.principal.kind != "nucleus" and s.principal.name != STREAM_MANAGER:
        raise Unauthorized(f"{s.principal.name} is not authorized to perform "
                           f"{PREFIX}ValidateAuthorizationToken")
    token = _str(req, "token")
    assert token is not None
    try:
        core.authenticator.authenticate(token, None)
    except Unauthenticated as exc:
        raise ModeledError(INVALID_TOKEN_ERROR, f"invalid token: {exc.message}") from exc
    return {"isValid": True}


_QOS: Final = {"0": 0, "1": 1, "AT_MOST_ONCE": 0, "AT_LEAST_ONCE": 1}


def _qos(req: Mapping[str, Any]) -> int:
    value = req.get("qos")
    if value is None:
        return 1
    qos = _QOS.get(str(value))
    if qos is None:
        raise InvalidArguments("qos must be '0' or '1'", {"argument": "qos"})
    return qos


_PAYLOAD_FORMATS: Final = {"0": "bytes", "1": "utf8", "BYTES": "bytes", "UTF8": "utf8"}
"""awsiotsdk's PayloadFormat enum is "0" (BYTES) / "1" (UTF8) on the wire; the names are accepted too."""


def _mqtt5_properties(req: Mapping[str, Any]) -> dict[str, Any]:
    """PublishToIoTCore's MQTT 5 fields (Greengrass 2.10+) as cloud.publish ``properties``."""
    props: dict[str, Any] = {}
    user = req.get("userProperties")
    if user is not None:
        if not isinstance(user, list) or not all(isinstance(u, dict) for u in user):
            raise InvalidArguments("userProperties must be a list of {key, value}", {"argument": "userProperties"})
        props["user_properties"] = [[u.get("key"), u.get("value")] for u in user]
    if req.get("messageExpiryIntervalSeconds") is not None:
        props["message_expiry_s"] = req["messageExpiryIntervalSeconds"]
    if req.get("correlationData") is not None:
        props["correlation_data"] = _b64(req, "correlationData")
    for field_name, key in (("responseTopic", "response_topic"), ("contentType", "content_type")):
        if req.get(field_name) is not None:
            props[key] = req[field_name]
    fmt = req.get("payloadFormat")
    if fmt is not None:
        if str(fmt) not in _PAYLOAD_FORMATS:
            raise InvalidArguments("payloadFormat must be '0' (BYTES) or '1' (UTF8)", {"argument": "payloadFormat"})
        props["payload_format"] = _PAYLOAD_FORMATS[str(fmt)]
    return props


async def _publish_to_iot_core(core: IpcCore, s: Session, req: dict[str, Any]) -> Any:
    retain = req.get("retain", False)
    args: dict[str, Any] = {"topic": _str(req, "topicName"), "payload": _b64(req, "payload"), "qos": _qos(req),
                            "retain": bool(retain), "raw": True}
    props = _mqtt5_properties(req)
    if props:
        args["properties"] = props
    await core.call(s, "cloud.publish", args)
    return {}


def _iot_core_message(item: Mapping[str, Any], payload: bytes) -> dict[str, Any]:
    """An MQTTMessage shape: the cloud message and, as Greengrass 2.10+ gives them, its MQTT 5 properties."""
    message: dict[str, Any] = {"topicName": item.get("topic"), "payload": base64.b64encode(payload).decode(),
                               "retain": bool(item.get("retain", False))}
    props = item.get("properties")
    if isinstance(props, dict):
        if props.get("user_properties"):
            message["userProperties"] = [{"key": k, "value": v} for k, v in props["user_properties"]]
        if props.get("message_expiry_s") is not None:
            message["messageExpiryIntervalSeconds"] = props["message_expiry_s"]
        if isinstance(props.get("correlation_data"), bytes | bytearray):
            message["correlationData"] = base64.b64encode(bytes(props["correlation_data"])).decode()
        for key, field_name in (("response_topic", "responseTopic"), ("content_type", "contentType")):
            if props.get(key) is not None:
                message[field_name] = props[key]
        if props.get("payload_format") in ("bytes", "utf8"):
            message["payloadFormat"] = "1" if props["payload_format"] == "utf8" else "0"
    return message


async def _subscribe_to_iot_core(core: IpcCore, s: Session, req: dict[str, Any]) -> StreamPlan:
    topic_filter = validate_filter(req.get("topicName"))
    _qos(req)
    s.ctx.authorize(SVC_MQTTPROXY, PREFIX + "SubscribeToIoTCore", topic_filter)
    core.is_stream("cloud.subscribe")

    def event(item: Any) -> Any:
        payload = item.get("payload")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif not isinstance(payload, bytes | bytearray):
            payload = dumps(payload)
        return {"message": _iot_core_message(item, bytes(payload))}

    return StreamPlan("cloud.subscribe", {"filter": topic_filter}, event)


def _unary(name: str, handler: Unary) -> tuple[str, UnaryOperation]:
    return PREFIX + name, UnaryOperation(PREFIX + name + "Response", handler)


def _stream(name: str, stream_shape: str, prepare: Prepare) -> tuple[str, StreamOperation]:
    return PREFIX + name, StreamOperation(PREFIX + name + "Response", PREFIX + stream_shape, prepare)


UNARY: Final[Mapping[str, UnaryOperation]] = dict([
    _unary("GetConfiguration", _get_configuration),
    _unary("UpdateConfiguration", _update_configuration),
    _unary("UpdateState", _update_state),
    _unary("DeferComponentUpdate", _defer_component_update),
    _unary("SendConfigurationValidityReport", _send_configuration_validity_report),
    _unary("GetComponentDetails", _get_component_details),
    _unary("ListComponents", _list_components),
    _unary("RestartComponent", _restart_component),
    _unary("StopComponent", _stop_component),
    _unary("CreateLocalDeployment", _create_local_deployment),
    _unary("GetLocalDeploymentStatus", _get_local_deployment_status),
    _unary("ListLocalDeployments", _list_local_deployments),
    _unary("PutComponentMetric", _put_component_metric),
    _unary("ValidateAuthorizationToken", _validate_authorization_token),
    _unary("PublishToIoTCore", _publish_to_iot_core),
])
"""One-shot operations: the response carries TERMINATE_STREAM."""

STREAMS: Final[Mapping[str, StreamOperation]] = dict([
    _stream("SubscribeToConfigurationUpdate", "ConfigurationUpdateEvents", _subscribe_configuration),
    _stream("SubscribeToComponentUpdates", "ComponentUpdatePolicyEvents", _subscribe_component_updates),
    _stream("SubscribeToValidateConfigurationUpdates", "ValidateConfigurationUpdateEvents",
            _subscribe_validate_configuration),
    _stream("SubscribeToIoTCore", "IoTCoreMessage", _subscribe_to_iot_core),
])
"""Subscriptions: a response, then events until either side terminates the stream."""

SUPPORTED: Final = frozenset({PUBLISH_TO_TOPIC, SUBSCRIBE_TO_TOPIC, *UNARY, *STREAMS})

