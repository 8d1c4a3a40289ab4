"""The fleet deployment document: what ``nucleus fleet deploy`` publishes and what a device accepts.

One versioned JSON document per deployment, published retained on the target's topic
(``nucleus/groups/<group>/deployments`` or ``nucleus/things/<thing>/deployments``), so a device
that was offline finds it when it reconnects. It carries the recipes themselves (text), so a
device needs nothing but the broker and the artifacts base URL.

This module is shared by both sides and imports nothing of ``nucleus``: the device only looks at
what it must check before anything changes (names, versions, artifact URIs and digests); the full
recipe validation happens in the deployment engine, which reports its errors on the status topic.

Checks that make a device refuse a document (status ``REJECTED``, nothing changes):

* not JSON (``NaN`` and ``Infinity`` are not), or not this schema, e.g. a ``timeout_s`` or
  ``settle_time_s`` over 7 days (``SCHEMA``);
* a target that is not this device or one of its groups, or that is not the topic's (``WRONG_TARGET``);
* a root component without a recipe for exactly that version in the document, or a
  configuration update for a component the deployment does not name (``UNKNOWN_COMPONENT``);
* a recipe that is not a mapping with a name and a version, or that is nested deeper than
  :data:`MAX_DEPTH` or holds more than :data:`MAX_VALUES` values once its YAML aliases are
  expanded (an "alias bomb" of a few hundred bytes is a billion values) (``RECIPE_INVALID``);
* a document nested deeper than :data:`MAX_DEPTH` (``SCHEMA``);
* an artifact without a digest, with an unsupported or weak (SHA-1) algorithm or a digest that is
  neither hex nor base64 of the right size (``BAD_DIGEST``);
* an artifact the device could not fetch: a ``file:`` URI, or an ``s3:``-style URI without an
  artifacts base URL (``ARTIFACT_UNREACHABLE``).

What an artifact may put on the device's disk (its size, what a ZIP unpacks to, the free space
kept) is not a question of the document: only the device knows its disk. The engine bounds it with
the device's ``deployments.*`` limits (nucleus.artifacts.Limits) while it fetches, and a breach is
``FAILED_NO_STATE_CHANGE`` naming the component, the URI and the setting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloud_sync.errors import SyncError
from ipc import config_tree

DOCUMENT_VERSION = 1
THING_TOPIC = "nucleus/things/{thing}/deployments"
GROUP_TOPIC = "nucleus/groups/{group}/deployments"
STATUS_TOPIC = "nucleus/things/{thing}/deployments/status"
MAX_ROLLOUT_WINDOW_S = 7 * 24 * 3600.0

_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # thing and group names: one MQTT topic level
_DIGEST_SIZES = {"SHA-1": 20, "SHA-224": 28, "SHA-256": 32, "SHA-384": 48, "SHA-512": 64}
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
# Refused from the fleet (a local `nucleus deploy` still verifies them): chosen-prefix collisions
# are practical, so an artifact's supplier can hand over a benign file whose SHA-1 a harmful twin
# shares. Greengrass's cloud computes SHA-256 digests itself.
_WEAK_DIGESTS = frozenset({"SHA-1"})
# Bounds on what a document from the broker may make the device build. Real documents and recipes
# nest less than 15 levels; a 128 KiB document holds at most ~64 000 values unless YAML aliases
# repeat them. Both are checked without recursion, before anything recursive sees the data.
MAX_DEPTH = 64
MAX_VALUES = 250_000


class DocumentRejected(SyncError):
    """A deployment document the device refuses; ``reason`` is the stable code (``SCHEMA``, ...)."""

    code = "DEPLOYMENT_REJECTED"


# --- the document ---------------------------------------------------------------------------------
class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["thing", "group"]
    name: str

    @field_validator("name")
    @classmethod
    def _one_topic_level(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        return value

    @property
    def key(self) -> str:
        """The deployment group on the device: Greengrass spells them ``thinggroup/G`` and ``thing/T``."""
        return f"thinggroup/{self.name}" if self.type == "group" else f"thing/{self.name}"

    @property
    def topic(self) -> str:
        return GROUP_TOPIC.format(group=self.name) if self.type == "group" else THING_TOPIC.format(thing=self.name)


class RecipeText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    format: Literal["yaml", "json"] = "yaml"
    source: str = Field("", description="where the operator read it (file name), for error messages")


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge: dict[str, Any] = Field(default_factory=dict)
    reset: list[str] = Field(default_factory=list)


def _json_argument(text: str) -> Any:
    """A CLI argument that is a JSON document, or ``@file.json`` naming one (ValueError saying which failed)."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {text[1:]}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc


def parse_config_updates(text: str) -> dict[str, dict[str, Any]]:
    """The Greengrass CLI's ``--update-config`` document: ``{"Name": {"MERGE": {...}, "RESET": [...]}}``.

    ``@file.json`` reads a file. Keys are case-insensitive; MERGE may be a JSON string (as the
    Greengrass CLI accepts). Raises ValueError naming the component and the problem.
    """
    data = _json_argument(text)
    if not isinstance(data, dict):
        raise ValueError("must map component names to {MERGE, RESET}")
    out: dict[str, dict[str, Any]] = {}
    for name, update in data.items():
        if not isinstance(update, dict):
            raise ValueError(f"{name} must be an object with MERGE/RESET")
        keys = {str(k).lower(): v for k, v in update.items()}
        unknown = sorted(str(k) for k in update if str(k).lower() not in ("merge", "reset"))  # as written
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}: an update is {{\"MERGE\": {{...}}, \"RESET\": "
                             f"[...]}}, e.g. {{\"{name}\": {{\"MERGE\": {{\"{unknown[0]}\": ...}}}}}}")
        merge = keys.get("merge") or {}
        if isinstance(merge, str):
            try:
                merge = json.loads(merge)
            except ValueError as exc:
                raise ValueError(f"{name}: MERGE is a string but not JSON: {exc}") from exc
        if not isinstance(merge, dict):
            raise ValueError(f"{name}: MERGE must be an object")
        reset = keys.get("reset") or []
        if not isinstance(reset, list) or not all(isinstance(r, str) for r in reset):
            raise ValueError(f"{name}: RESET must be a list of JSON pointers")
        for pointer in reset:
            if pointer and not pointer.startswith("/"):
                raise ValueError(f"{name}: RESET entry {pointer!r} is not a JSON pointer (\"\" or starting with "
                                 f"\"/\", e.g. \"/{pointer}\")")
        out[name] = {"merge": merge, "reset": list(reset)}
    return out


def combine_config_updates(texts: list[str] | None) -> dict[str, dict[str, Any]]:
    """Several ``--update-config`` documents (the option given more than once) as one.

    With a plain option the last one silently replaced the others, dropping, say, the detector's
    trusted keys from a first document. Each component may appear in one document only: two updates
    of one component would need an order nobody wrote down. Raises ValueError naming it.
    """
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for text in texts or []:
        for name, update in parse_config_updates(text).items():
            if name in out:
                raise ValueError(f"{name} is updated by two documents ({seen[name]} and {text[:60]}): put its "
                                 "MERGE and RESET in one")
            out[name], seen[name] = update, text[:60]
    return out


RUN_WITH_FIELDS = ("posixUser", "memory", "cpus", "systemResourceLimits")


MAX_MEMORY_KB = (2**63 - 1) // 1024  # bytes in a signed 64-bit word, as the kernel's limit files take them


def parse_run_with(texts: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """``--run-with`` options as Greengrass ``runWith`` objects per component.

    Each option is ``NAME:FIELD=VALUE`` with FIELD ``posixUser`` (``user`` or ``user:group``),
    ``memory`` (KB) or ``cpus`` (cores, 0.5 = half of one); ``NAME:posixUser=`` clears the user and
    ``NAME:systemResourceLimits=`` both limits (the component goes back to run_with_default). An empty
    ``memory`` or ``cpus`` is refused: ``systemResourceLimits`` replaces as a whole, so it could only
    mean "no limits at all", dropping the other limit and the device default with it.
    Or a JSON document ``{"NAME": {"posixUser": ..., "systemResourceLimits": {...}}}`` (``@file.json``).
    The value ranges are the device's to check; this only reads. Raises ValueError naming the option.
    """
    out: dict[str, dict[str, Any]] = {}
    for text in texts or []:
        if text.startswith(("{", "@")):
            data = _json_argument(text)
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError('must map component names to {"posixUser": ..., "systemResourceLimits": {...}}')
            for name, run_with in data.items():
                if name in out:
                    raise ValueError(f"{name}: runWith given twice")
                out[name] = dict(run_with)
            continue
        left, sep, value = text.partition("=")
        name, colon, field = left.rpartition(":")
        if not sep or not colon or not name or field not in RUN_WITH_FIELDS:
            raise ValueError(f"{text!r}: expected NAME:FIELD=VALUE with FIELD one of {', '.join(RUN_WITH_FIELDS)}")
        entry = out.setdefault(name, {})
        if field == "posixUser":
            _set_once(entry, "posixUser", value or None, text)
        elif field == "systemResourceLimits":
            if value:
                raise ValueError(f"{text!r}: only NAME:systemResourceLimits= (clear) is allowed; set memory and cpus")
            _set_once(entry, "systemResourceLimits", None, text)
        else:
            limits = entry.setdefault("systemResourceLimits", {})
            if limits is None:
                raise ValueError(f"{text!r}: {name}'s systemResourceLimits are also cleared by another --run-with")
            if field in limits:
                raise ValueError(f"{text!r}: {name}:{field} given twice")
            if not value:
                raise ValueError(f"{text!r}: {field} needs a value; systemResourceLimits replaces as a whole, so "
                                 f"give the limits to keep ({name}:memory=KB, {name}:cpus=N) or clear both with "
                                 f"{name}:systemResourceLimits= (back to run_with_default)")
            try:
                limits[field] = int(value) if field == "memory" else float(value)
            except ValueError:
                kind = "whole number of KB" if field == "memory" else "number"
                raise ValueError(f"{text!r}: {field} must be a {kind}") from None
    for name, run_with in out.items():  # what the request cannot carry (msgpack: 64-bit integers) is said here
        limits = run_with.get("systemResourceLimits")
        memory = limits.get("memory") if isinstance(limits, dict) else None
        if isinstance(memory, int) and not isinstance(memory, bool) and memory > MAX_MEMORY_KB:
            raise ValueError(f"{name}: memory {memory} KB is more than a cgroup can be limited to "
                             f"(at most {MAX_MEMORY_KB} KB)")
    return out


def _set_once(entry: dict[str, Any], key: str, value: Any, text: str) -> None:
    if key in entry:
        raise ValueError(f"{text!r}: {key} of this component given twice")
    entry[key] = value


class Rollout(BaseModel):
    """How the start of a deployment is spread over the fleet (see :func:`start_delay`).

    ``window_s`` directly, or ``max_per_minute`` with ``expected_devices`` (window =
    expected_devices / max_per_minute minutes). No coordination between devices: each picks a
    deterministic point in the window, so the rate is met on average, not as a hard cap.
    """

    model_config = ConfigDict(extra="forbid")

    window_s: float | None = Field(None, ge=0, le=MAX_ROLLOUT_WINDOW_S)
    max_per_minute: float | None = Field(None, gt=0)
    expected_devices: int | None = Field(None, ge=1)

    @property
    def effective_window_s(self) -> float:
        if self.window_s is not None:
            return self.window_s
        if self.max_per_minute is not None and self.expected_devices is not None:
            return min(MAX_ROLLOUT_WINDOW_S, self.expected_devices / self.max_per_minute * 60.0)
        return 0.0


class ResourceLimits(BaseModel):
    """Greengrass's ``systemResourceLimits``: memory in KB, cpus in cores (the device enforces them)."""

    model_config = ConfigDict(extra="forbid")

    memory: int | None = Field(None, gt=0, le=MAX_MEMORY_KB)  # more does not fit a cgroup file (or msgpack)
    cpus: float | None = Field(None, gt=0, allow_inf_nan=False)  # 1e999 in JSON is inf: no limit, and not JSON

    @field_validator("memory", "cpus", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic reads true as 1: a 1 KB limit nobody meant
            raise ValueError("must be a number, not true or false")
        return value


class RunWith(BaseModel):
    """Greengrass's ``runWith`` of one component; a field given as null clears what an earlier
    deployment set (the component goes back to the device's run_with_default)."""

    model_config = ConfigDict(extra="forbid")

    posixUser: str | None = None
    systemResourceLimits: ResourceLimits | None = None


_COMPONENT_KEYS = ("componentVersion", "runWith")


class DeploymentDocument(BaseModel):
    """Version 1 of the fleet deployment document (``v``); unknown keys are refused.

    ``components`` maps a root component to its version, or, as Greengrass's CreateDeployment does,
    to ``{"componentVersion": "1.0.0", "runWith": {"posixUser": ..., "systemResourceLimits": {...}}}``;
    the runWith objects are kept apart in ``run_with`` (and written back in Greengrass's shape).
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _greengrass_components(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
            return data
        versions: dict[str, Any] = {}
        run_with: dict[str, Any] = dict(data.get("run_with") or {})
        for name, spec in data["components"].items():
            if not isinstance(spec, dict):
                versions[name] = spec
                continue
            unknown = sorted(str(k) for k in spec if k not in _COMPONENT_KEYS)
            if unknown or "componentVersion" not in spec:
                what = f"unknown field(s) {', '.join(unknown)}" if unknown else "no componentVersion"
                raise ValueError(f"components.{name}: {what}: a component is a version or "
                                 '{"componentVersion": ..., "runWith": {"posixUser": ..., "systemResourceLimits": '
                                 '{"memory": KB, "cpus": N}}}')
            versions[name] = spec["componentVersion"]
            if "runWith" in spec:
                run_with[name] = spec["runWith"]
        return {**data, "components": versions, **({"run_with": run_with} if run_with else {})}

    v: Literal[1] = 1
    deployment_id: str
    target: Target
    sequence: int = Field(ge=0, description="per target; a higher one supersedes a lower one")
    created_at: float = Field(ge=0, description="Unix seconds, when the operator published it")
    components: dict[str, str] = Field(description="root components: name -> exact version")
    recipes: list[RecipeText] = Field(default_factory=list)
    artifacts_base_url: str | None = None
    config_updates: dict[str, ConfigUpdate] = Field(default_factory=dict)
    failure_policy: Literal["ROLLBACK", "DO_NOTHING"] = "ROLLBACK"
    timeout_s: float | None = Field(None, gt=0, le=MAX_ROLLOUT_WINDOW_S)
    settle_time_s: float | None = Field(None, ge=0, le=MAX_ROLLOUT_WINDOW_S)
    rollout: Rollout = Field(default_factory=Rollout)
    run_with: dict[str, RunWith] = Field(default_factory=dict, description="written inside components")

    @field_validator("deployment_id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID_RE.fullmatch(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        return value

    @field_validator("artifacts_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value

    def encode(self) -> bytes:
        if not self.run_with:
            return self.model_dump_json(exclude_none=True, exclude={"run_with"}).encode()
        data = json.loads(self.model_dump_json(exclude_none=True, exclude={"run_with"}))
        for name, run_with in self.run_with.items():  # nulls kept: they clear a field on the device
            data["components"][name] = {"componentVersion": self.components.get(name),
                                        "runWith": run_with.model_dump(mode="json", exclude_unset=True)}
        return json.dumps(data).encode()


def new_document(recipes: Sequence[RecipeText], *, target: Target, components: Mapping[str, str] | None = None,
                 sequence: int | None = None, deployment_id: str | None = None,
                 created_at: float | None = None, **fields: Any) -> DeploymentDocument:
    """A document for these recipes; the roots default to the highest version of every recipe name."""
    if components is None:
        roots: dict[str, tuple[tuple[Any, ...], str]] = {}
        for r in recipes:
            info = inspect_recipe(r)
            key = _version_key(info.version)
            if info.name not in roots or key > roots[info.name][0]:
                roots[info.name] = (key, info.version)
        components = {n: v for n, (_, v) in roots.items()}
    now = time.time() if created_at is None else created_at
    return DeploymentDocument(
        deployment_id=deployment_id or str(uuid.uuid4()), target=target,
        sequence=int(now * 1000) if sequence is None else sequence, created_at=now,
        components=dict(components), recipes=list(recipes), **fields)


def _version_key(version: str) -> tuple[Any, ...]:
    core = version.split("+", 1)[0]
    main, _, pre = core.partition("-")
    nums = tuple(int(p) if p.isdigit() else 0 for p in main.split("."))
    return (*nums, 0 if pre else 1, pre)


# --- what the device reads from a recipe -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ArtifactRef:
    uri: str
    digest: str | None
    algorithm: str
    where: str  # Manifests[i].Artifacts[j], for error messages


@dataclass(frozen=True, slots=True)
class RecipeInfo:
    name: str
    version: str
    artifacts: tuple[ArtifactRef, ...]
    document: dict[str, Any]


def _get(mapping: Mapping[str, Any], key: str) -> Any:
    """Recipe keys are case-insensitive (as in the Greengrass nucleus)."""
    low = key.lower()
    for k, v in mapping.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _key(mapping: Mapping[str, Any], key: str) -> str:
    low = key.lower()
    return next((k for k in mapping if isinstance(k, str) and k.lower() == low), key)


def check_shape(value: Any, *, what: str, reason: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH or with more than MAX_VALUES values
    (``config_tree.shape_problem``): what comes from the broker must not exhaust the stack, memory or
    the event loop of the device (``json.dumps`` of a 1 KiB alias bomb builds gigabytes)."""
    problem = config_tree.shape_problem(value, max_depth=MAX_DEPTH, max_values=MAX_VALUES)
    if problem is not None:
        raise DocumentRejected(f"{what} {problem}", reason=reason)


def inspect_recipe(recipe: RecipeText) -> RecipeInfo:
    where = recipe.source or "recipe"
    try:
        doc = json.loads(recipe.text) if recipe.format == "json" else yaml.safe_load(recipe.text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DocumentRejected(f"{where}: not valid {recipe.format.upper()}: {exc}", reason="RECIPE_INVALID") from exc
    except RecursionError as exc:
        raise DocumentRejected(f"{where}: nested deeper than {MAX_DEPTH} levels", reason="RECIPE_INVALID") from exc
    check_shape(doc, what=where, reason="RECIPE_INVALID")
    if not isinstance(doc, dict):
        raise DocumentRejected(f"{where}: a recipe must be a mapping", reason="RECIPE_INVALID")
    name, version = _get(doc, "ComponentName"), _get(doc, "ComponentVersion")
    if not isinstance(name, str) or not name or not isinstance(version, str | int | float) or not str(version):
        raise DocumentRejected(f"{where}: ComponentName and ComponentVersion are required", reason="RECIPE_INVALID")
    artifacts: list[ArtifactRef] = []
    manifests = _get(doc, "Manifests") or []
    if not isinstance(manifests, list):
        raise DocumentRejected(f"{where}: Manifests must be a list", reason="RECIPE_INVALID")
    for i, manifest in enumerate(manifests):
        items = _get(manifest, "Artifacts") if isinstance(manifest, dict) else None
        for j, art in enumerate(items or []):
            if not isinstance(art, dict):
                continue
            uri, digest = _get(art, "Uri"), _get(art, "Digest")
            algorithm = _get(art, "Algorithm") or "SHA-256"
            if not isinstance(uri, str):
                raise DocumentRejected(f"{where}: Manifests[{i}].Artifacts[{j}].Uri is required",
                                       reason="RECIPE_INVALID")
            if digest is not None and not isinstance(digest, str):
                raise DocumentRejected(f"{where}: Manifests[{i}].Artifacts[{j}].Digest must be a string "
                                       f"(quote it in YAML), not {type(digest).__name__}", reason="BAD_DIGEST")
            artifacts.append(ArtifactRef(uri, digest, str(algorithm), f"Manifests[{i}].Artifacts[{j}]"))
    return RecipeInfo(name, str(version), tuple(artifacts), doc)


def check_digest(ref: ArtifactRef, *, component: str) -> None:
    algorithm = ref.algorithm.strip().upper()
    if not algorithm.startswith("SHA-") and algorithm.startswith("SHA"):
        algorithm = "SHA-" + algorithm[3:]
    size = _DIGEST_SIZES.get(algorithm)
    prefix = f"{component}: {ref.where} ({ref.uri})"
    if algorithm in _WEAK_DIGESTS:
        raise DocumentRejected(f"{prefix}: digest algorithm {ref.algorithm!r} is not collision resistant: whoever "
                               "made the artifact could have made a second one with the same digest; use SHA-256",
                               reason="BAD_DIGEST")
    if size is None:
        raise DocumentRejected(f"{prefix}: unsupported digest algorithm {ref.algorithm!r}", reason="BAD_DIGEST")
    text = (ref.digest or "").strip()
    if not text:
        raise DocumentRejected(f"{prefix}: no Digest; a fleet artifact must be verifiable", reason="BAD_DIGEST")
    if len(text) == 2 * size and _HEX_RE.fullmatch(text):
        return
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != size:
        raise DocumentRejected(f"{prefix}: Digest {text!r} is neither {2 * size} hex digits nor base64 of "
                               f"a {size}-byte {algorithm} digest", reason="BAD_DIGEST")


def artifact_url(base: str, component: str, version: str, uri: str) -> str:
    """Where a device fetches an artifact: ``<base>/<component>/<version>/<file name>`` (the
    layout of ``nucleus deploy --artifacts DIR``, so a directory served over HTTP works as is)."""
    file_name = uri.rstrip("/").rsplit("/", 1)[-1]
    return "/".join((base.rstrip("/"), quote(component, safe=""), quote(version, safe=""), quote(file_name, safe="")))


# --- the device side ---------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(data: bytes) -> DeploymentDocument:
    try:
        # NaN and Infinity are Python's, not JSON's: an infinite settle_time_s kept the deployment
        # (and every fleet deployment after it) IN_PROGRESS for ever.
        raw = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DocumentRejected(f"not JSON: {exc}", reason="SCHEMA") from exc
    except RecursionError as exc:  # json's C parser gives up near 1000 levels: a ~2 KiB document
        raise DocumentRejected(f"nested deeper than {MAX_DEPTH} levels", reason="SCHEMA") from exc
    check_shape(raw, what="the document", reason="SCHEMA")
    try:
        return DeploymentDocument.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc']) or '(document)'}: {e['msg']}" for e in exc.errors()[:5]]
        raise DocumentRejected("not a v1 deployment document: " + "; ".join(parts), reason="SCHEMA") from exc


def is_deployment_topic(topic: str) -> bool:
    """A topic devices read deployment documents from (any thing or group name): reserved for operators."""
    parts = topic.split("/")
    return len(parts) == 4 and parts[0] == "nucleus" and parts[1] in ("things", "groups") and parts[3] == "deployments"


def target_of_topic(topic: str) -> Target | None:
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == "nucleus" and parts[3] == "deployments":
        kind = {"things": "thing", "groups": "group"}.get(parts[1])
        if kind is not None and _NAME_RE.fullmatch(parts[2]):
            return Target(type=kind, name=parts[2])
    return None


def check_target(doc: DeploymentDocument, *, topic: str, thing: str, groups: Sequence[str]) -> None:
    t = doc.target
    if t.topic != topic:
        raise DocumentRejected(f"the document targets {t.type} {t.name!r} but came on {topic!r}",
                               reason="WRONG_TARGET")
    if t.type == "thing" and t.name != thing:
        raise DocumentRejected(f"a deployment for thing {t.name!r}, this is {thing!r}", reason="WRONG_TARGET")
    if t.type == "group" and t.name not in groups:
        raise DocumentRejected(f"a deployment for group {t.name!r}, which this thing is not in", reason="WRONG_TARGET")


def to_request(doc: DeploymentDocument, *, remove: Sequence[str] = ()) -> dict[str, Any]:
    """The nucleus DeploymentRequest (as a dict) for a checked document; raises DocumentRejected.

    Artifact URIs that are not http(s) are rewritten to the artifacts base URL (see
    :func:`artifact_url`); the engine then fetches and verifies them by digest.
    """
    infos = [(r, inspect_recipe(r)) for r in doc.recipes]
    have = {(i.name, i.version) for _, i in infos}
    names = {i.name for _, i in infos}
    for name, version in doc.components.items():
        if (name, version) not in have:
            raise DocumentRejected(f"component {name} {version}: no recipe for it in the document",
                                   reason="UNKNOWN_COMPONENT", component=name)
    for name in doc.config_updates:
        if name not in doc.components and name not in names:
            raise DocumentRejected(f"configuration update for {name}, which the deployment does not name",
                                   reason="UNKNOWN_COMPONENT", component=name)
    for name in doc.run_with:
        if name not in doc.components:
            raise DocumentRejected(f"runWith for {name}, which is not a component of the deployment",
                                   reason="UNKNOWN_COMPONENT", component=name)
    recipes: list[dict[str, Any]] = []
    for src, info in infos:
        rewritten = False
        for ref in info.artifacts:
            check_digest(ref, component=info.name)
            scheme = urlsplit(ref.uri).scheme.lower()
            if scheme in ("http", "https"):
                continue
            if scheme == "file" or doc.artifacts_base_url is None:
                why = "a device never reads local files for a fleet deployment" if scheme == "file" \
                    else "the document has no artifacts_base_url"
                raise DocumentRejected(f"{info.name}: {ref.where}: cannot fetch {ref.uri!r}: {why}",
                                       reason="ARTIFACT_UNREACHABLE", component=info.name)
            _rewrite(info, ref, artifact_url(doc.artifacts_base_url, info.name, info.version, ref.uri))
            rewritten = True
        source = f"fleet:{doc.deployment_id}:{src.source or info.name}"
        if rewritten:
            recipes.append({"source": source, "format": "json",
                            "text": json.dumps(info.document, default=str, ensure_ascii=False)})
        else:
            recipes.append({"source": source, "format": src.format, "text": src.text})
    request: dict[str, Any] = {
        "deployment_id": doc.deployment_id,
        "group": doc.target.key,
        "recipes": recipes,
        "root_components": {n: f"={v}" for n, v in doc.components.items()},
        "remove": sorted(set(remove) - set(doc.components)),
        "config_updates": {n: u.model_dump() for n, u in doc.config_updates.items()},
        "failure_policy": doc.failure_policy,
    }
    if doc.run_with:
        request["run_with"] = {n: rw.model_dump(mode="json", exclude_unset=True) for n, rw in doc.run_with.items()}
    if doc.timeout_s is not None:
        request["timeout_s"] = doc.timeout_s
    if doc.settle_time_s is not None:
        request["settle_time_s"] = doc.settle_time_s
    return request


def _rewrite(info: RecipeInfo, ref: ArtifactRef, url: str) -> None:
    manifests = _get(info.document, "Manifests")
    i, j = (int(x) for x in re.findall(r"\d+", ref.where))
    art = _get(manifests[i], "Artifacts")[j]
    art[_key(art, "Uri")] = url


def start_delay(doc: DeploymentDocument, thing: str, now: float) -> float:
    """Seconds to wait before starting: a deterministic point in the rollout window.

    The point is ``window * u`` with ``u`` in [0, 1) from SHA-256 of (deployment id, thing name),
    measured from ``created_at``: the same device always picks the same slot (a restart does not
    move it), devices spread uniformly, and a device that comes online after its slot starts at
    once. Never longer than the window, whatever the clocks say.
    """
    window = doc.rollout.effective_window_s
    if window <= 0:
        return 0.0
    digest = hashlib.sha256(f"{doc.deployment_id}\0{thing}".encode()).digest()
    offset = int.from_bytes(digest[:8], "big") / 2**64 * window
    return min(window, max(0.0, doc.created_at + offset - now))
