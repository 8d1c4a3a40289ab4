"""IPC authorization: Greengrass ``accessControl`` policies compiled to matchers, default deny.

A component grants itself permissions in its configuration, exactly as a Greengrass recipe does::

    accessControl:
      aws.greengrass.ipc.pubsub:
        "com.example.Sensor:pubsub:1":
          policyDescription: publish raw readings
          operations: ["aws.greengrass#PublishToTopic"]
          resources: ["sensors/+/raw"]

Resource matching follows the Java nucleus (``WildcardTrie``) so that existing recipes keep their
meaning: ``*`` is a glob over any characters (``/`` included) for every service; for the two
MQTT-flavoured services (local pub/sub and the IoT Core proxy) ``+`` matches one topic level and
a trailing ``/#`` any number of levels (``a/#`` also matches ``a``) when they are used as MQTT
wildcards (a whole level), otherwise they are plain characters; ``${c}`` escapes a character
(``${*}`` is a literal star). The resource checked for a subscription is the subscribed filter
itself, so ``sensors/#`` allows subscribing to ``sensors/+/raw`` but ``sensors/a/raw`` does not, and
a policy's ``+`` level admits a filter's ``+`` but not its ``#`` (``sensors/+`` does not allow
``sensors/#``; the Java nucleus's trie lets that one through).

The bus asks for every publish, so decisions are cached per principal and invalidated when that
principal's policies change; each per-principal cache is bounded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from nucleus.errors import ConfigurationError

log = structlog.get_logger(__name__)

OPERATION_PREFIX: Final = "aws.greengrass#"
ANY: Final = "*"

PUBSUB: Final = "aws.greengrass.ipc.pubsub"
MQTTPROXY: Final = "aws.greengrass.ipc.mqttproxy"
CONFIG: Final = "aws.greengrass.ipc.config"
CLI: Final = "aws.greengrass.Cli"
LIFECYCLE: Final = "aws.greengrass.ipc.lifecycle"
METRICS: Final = "aws.greengrass.ipc.componentmetric"

#: Services whose resources are MQTT topics (``+``/``#`` are wildcards there).
MQTT_STYLE_SERVICES: Final = frozenset({PUBSUB, MQTTPROXY})

#: Operations known per service, short names (without ``aws.greengrass#``). Used to warn about
#: typos in policies; an unknown service or operation is still accepted (it simply never matches
#: anything the nucleus asks about) because third-party services may define their own.
KNOWN_OPERATIONS: Final[Mapping[str, frozenset[str]]] = {
    PUBSUB: frozenset({"PublishToTopic", "SubscribeToTopic"}),
    MQTTPROXY: frozenset({"PublishToIoTCore", "SubscribeToIoTCore"}),
    CONFIG: frozenset({"GetConfiguration", "UpdateConfiguration", "SubscribeToConfigurationUpdate"}),
    CLI: frozenset(
        {
            "CreateLocalDeployment",
            "GetLocalDeploymentStatus",
            "ListLocalDeployments",
            "CancelLocalDeployment",
            "ListComponents",
            "GetComponentDetails",
            "RestartComponent",
            "StopComponent",
        }
    ),
    LIFECYCLE: frozenset({"PauseComponent", "ResumeComponent"}),
    METRICS: frozenset({"PutComponentMetric"}),
}

#: Operations that only ever act on the caller itself: no policy needed (as Greengrass).
ALWAYS_ALLOWED: Final = frozenset(
    {
        "UpdateState",
        "DeferComponentUpdate",
        "SubscribeToComponentUpdates",
        "SubscribeToValidateConfigurationUpdates",
        "SendConfigurationValidityReport",
    }
)
#: Operations whose resource is a component name: allowed without policy on the caller's own name.
SELF_TARGET: Final = frozenset({"GetConfiguration", "UpdateConfiguration", "SubscribeToConfigurationUpdate"})

_POLICY_FIELDS: Final = {"policydescription": "policyDescription", "operations": "operations",
                         "resources": "resources"}
_VARIABLE = re.compile(r"\{([^{}]+)\}")
_ESCAPE = re.compile(r"\$\{(.)\}")
DEFAULT_CACHE_SIZE: Final = 4096


def short_operation(operation: str) -> str:
    """``aws.greengrass#PublishToTopic`` and ``PublishToTopic`` name the same operation."""
    return operation[len(OPERATION_PREFIX):] if operation.startswith(OPERATION_PREFIX) else operation


@dataclass(frozen=True, slots=True)
class Policy:
    """One accessControl entry of one component (the principal is the component that declares it)."""

    policy_id: str
    service: str
    operations: frozenset[str]
    resources: tuple[str, ...]
    description: str = ""


def substitute_variables(text: str, variables: Mapping[str, str]) -> str:
    """Replace ``{iot:thingName}``-style variables that are known; leave the others as written.

    A value is substituted as literal text: a thing name holding ``*`` (or ``${…}``) would otherwise
    turn ``things/{iot:thingName}/#`` into a grant over every thing's topics."""
    if "{" not in text:
        return text

    def literal(m: re.Match[str]) -> str:
        value = variables.get(m.group(1))
        if value is None:
            return m.group(0)
        return "".join("${" + ch + "}" if ch in "*$" else ch for ch in value)

    return _VARIABLE.sub(literal, text)


def parse_access_control(
    component: str, access_control: Any, *, variables: Mapping[str, str] | None = None
) -> list[Policy]:
    """The policies a component's ``accessControl`` value declares.

    ``None`` means no policies. A JSON string is accepted, as the Java nucleus accepts one (a
    deployment's MERGE can carry the whole map as a string). Field names inside a policy are
    case-insensitive, again as the Java nucleus reads them.
    """
    if access_control is None:
        return []
    variables = variables or {}
    if isinstance(access_control, str | bytes):
        try:
            access_control = json.loads(access_control)
        except ValueError as exc:
            raise ConfigurationError(
                f"accessControl is a string but not valid JSON: {exc}",
                component=component, field="accessControl",
            ) from exc
    if not isinstance(access_control, Mapping):
        raise ConfigurationError(
            f"accessControl must map service names to policies, got {type(access_control).__name__}",
            component=component, field="accessControl",
        )
    policies: list[Policy] = []
    for service, by_id in access_control.items():
        where = f"accessControl.{service}"
        if not isinstance(service, str) or not service:
            raise ConfigurationError("service name must be a non-empty string",
                                     component=component, field=where)
        if not isinstance(by_id, Mapping):
            raise ConfigurationError(
                f"must map policy ids to policies, got {type(by_id).__name__}",
                component=component, field=where,
            )
        for policy_id, body in by_id.items():
            policies.append(_parse_policy(component, service, policy_id, body, variables))
    return policies


def _parse_policy(
    component: str, service: str, policy_id: Any, body: Any, variables: Mapping[str, str]
) -> Policy:
    where = f"accessControl.{service}.{policy_id}"
    if not isinstance(policy_id, str) or not policy_id:
        raise ConfigurationError("policy id must be a non-empty string", component=component, field=where)
    if not isinstance(body, Mapping):
        raise ConfigurationError(
            f"policy must be an object with operations and resources, got {type(body).__name__}",
            component=component, field=where,
        )
    fields: dict[str, Any] = {}
    for key, value in body.items():
        canonical = _POLICY_FIELDS.get(str(key).lower())
        if canonical is None:
            raise ConfigurationError(
                f"unknown policy field {key!r} (expected policyDescription, operations, resources)",
                component=component, field=f"{where}.{key}",
            )
        fields[canonical] = value
    operations = _string_list(component, f"{where}.operations", fields.get("operations"))
    if not operations:
        raise ConfigurationError("operations must list at least one operation (or \"*\")",
                                 component=component, field=f"{where}.operations")
    raw_resources = fields.get("resources")
    resources = [] if raw_resources is None else _string_list(component, f"{where}.resources", raw_resources)
    description = fields.get("policyDescription") or ""
    if not isinstance(description, str):
        raise ConfigurationError("policyDescription must be a string",
                                 component=component, field=f"{where}.policyDescription")
    known = KNOWN_OPERATIONS.get(service)
    if known is None:
        log.warning("authz.unknown_service", component=component, service=service, policy_id=policy_id)
    else:
        for op in operations:
            if op != ANY and short_operation(op) not in known:
                log.warning("authz.unknown_operation", component=component, service=service,
                            policy_id=policy_id, operation=op)
    return Policy(
        policy_id=policy_id,
        service=service,
        operations=frozenset(ANY if op == ANY else short_operation(op) for op in operations),
        resources=tuple(substitute_variables(r, variables) for r in resources),
        description=description,
    )


def _string_list(component: str, where: str, value: Any) -> list[str]:
    if value is None:
        raise ConfigurationError("is required", component=component, field=where)
    if isinstance(value, str):
        raise ConfigurationError("must be a list of strings, not a single string",
                                 component=component, field=where)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError("must be a list of strings", component=component, field=where)
    return list(value)


# --- compiling resources -------------------------------------------------------------------------

def _literal(text: str) -> str:
    """Regex for plain text, honouring ``${c}`` escapes."""
    out: list[str] = []
    pos = 0
    for m in _ESCAPE.finditer(text):
        out.append(re.escape(text[pos:m.start()]))
        out.append(re.escape(m.group(1)))
        pos = m.end()
    out.append(re.escape(text[pos:]))
    return "".join(out)


def resource_regex(resource: str, *, mqtt: bool) -> str:
    """Translate one policy resource into a regular expression (to be full-matched).

    The text between globs (``*``) is a chunk; the regex is ``chunk0 (?>.*?chunk1) ... .*chunkN``.
    Each middle chunk is matched at its first occurrence and that choice is final (an atomic group):
    taking the earliest occurrence never loses a match, because the rest only needs to start after it
    (and a chunk has a single way to match from a given start, its ``+`` levels running to the next
    ``/``). The plain translation (``.*`` per glob) lets the regex engine retry every split of the
    topic: with ``a*b*c*d`` a 16 KB topic took 100 s of the daemon's event loop to deny, and any
    principal holding such a policy could send one.
    """
    if resource == ANY or (mqtt and resource == "#"):
        return ".*"
    chunks: list[list[str]] = [[]]

    def add_text(text: str) -> None:
        for j, piece in enumerate(_split_glob(text)):
            if j:
                chunks.append([])
            chunks[-1].append(_literal(piece))

    if not mqtt:
        add_text(resource)
    else:
        levels = resource.split("/")
        for i, level in enumerate(levels):
            last = i == len(levels) - 1
            if i > 0:
                chunks[-1].append("/")
            if level == "+":
                # One level of a topic, or a "+" of a subscribed filter, never its "#": "sensors/+"
                # must not let a component subscribe to "sensors/#" and receive every level below.
                # ("#" is in no valid topic, and in a valid filter only as a whole last level.)
                chunks[-1].append("[^/#]*")
            elif level == "#" and last:
                # "a/#" matches "a", "a/" and "a/x/y": the separator belongs to the wildcard.
                chunks[-1][-1] = "(?:/.*)?"
                break
            else:
                add_text(level)
    if len(chunks) == 1:
        return "".join(chunks[0])
    middle = "".join(f"(?>.*?{''.join(c)})" for c in chunks[1:-1])
    return "".join(chunks[0]) + middle + ".*" + "".join(chunks[-1])


def _split_glob(text: str) -> list[str]:
    """Split at unescaped ``*`` (``${*}`` is a literal star)."""
    pieces: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        m = _ESCAPE.match(text, i)
        if m:
            current.append(m.group(0))
            i = m.end()
            continue
        if text[i] == "*":
            pieces.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    pieces.append("".join(current))
    return pieces


@dataclass(slots=True)
class _Compiled:
    """One principal's policies for one service, ready to match."""

    any_operation: re.Pattern[str] | None = None
    by_operation: dict[str, re.Pattern[str]] = field(default_factory=dict)


def _compile(policies: Sequence[Policy]) -> dict[str, _Compiled]:
    grouped: dict[str, dict[str, list[str]]] = {}
    for p in policies:
        mqtt = p.service in MQTT_STYLE_SERVICES
        # A policy without resources covers only operations that carry no resource (empty string),
        # as a null resource list does in the Java nucleus.
        patterns = [resource_regex(r, mqtt=mqtt) for r in p.resources] or [""]
        ops = grouped.setdefault(p.service, {})
        for op in p.operations:
            ops.setdefault(op, []).extend(patterns)
    compiled: dict[str, _Compiled] = {}
    for service, ops in grouped.items():
        c = _Compiled()
        for op, patterns in ops.items():
            rx = re.compile("|".join(f"(?:{pat})" for pat in dict.fromkeys(patterns)), re.DOTALL)
            if op == ANY:
                c.any_operation = rx
            else:
                c.by_operation[op] = rx
        compiled[service] = c
    return compiled


class Authorizer:
    """Default-deny decisions for the IPC bus (satisfies ``ipc.core.Authorizer``).

    Principals are objects with ``.name`` and ``.kind``; kind ``"nucleus"`` (the daemon's own
    control channel, the local CLI) is always allowed.
    """

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._policies: dict[str, tuple[Policy, ...]] = {}
        self._compiled: dict[str, dict[str, _Compiled]] = {}
        self._cache: dict[str, dict[tuple[str, str, str], bool]] = {}
        self._cache_size = max(1, cache_size)

    def set_policies(self, component: str, policies: Sequence[Policy]) -> None:
        self._policies[component] = tuple(policies)
        self._compiled[component] = _compile(policies)
        self._cache.pop(component, None)
        log.debug("authz.policies_set", component=component, policies=len(policies))

    def remove(self, component: str) -> None:
        self._policies.pop(component, None)
        self._compiled.pop(component, None)
        self._cache.pop(component, None)

    def policies(self, component: str) -> tuple[Policy, ...]:
        return self._policies.get(component, ())

    def is_authorized(self, principal: Any, service: str, operation: str, resource: str) -> bool:
        if principal.kind == "nucleus":
            return True
        name: str = principal.name
        key = (service, operation, resource)
        cache = self._cache.get(name)
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                return hit
        else:
            cache = self._cache[name] = {}
        decision = self._decide(name, service, short_operation(operation), resource)
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # FIFO eviction: cheap, and good enough for a hot set
        cache[key] = decision
        return decision

    def _decide(self, name: str, service: str, op: str, resource: str) -> bool:
        if op in ALWAYS_ALLOWED:
            return True
        if op in SELF_TARGET and resource == name:
            return True
        compiled = self._compiled.get(name, {}).get(service)
        if compiled is None:
            return False
        rx = compiled.by_operation.get(op)
        if rx is not None and rx.fullmatch(resource):
            return True
        return compiled.any_operation is not None and compiled.any_operation.fullmatch(resource) is not None
