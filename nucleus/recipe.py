"""Greengrass V2 component recipes: loading, validation and platform selection.

Recipes come from many authors and tools (the cloud console, GDK, hand-written YAML), so the
loader accepts what the Java nucleus accepts: keys in any letter case (``run``, ``INSTALL``,
``setEnv``, ``componentName``), ``URI`` and ``Uri``, a step as a string or as a mapping,
``RequiresPrivilege: "true"`` and ``Timeout: "900"`` as strings, null list items and null
steps, unknown keys (warned about, not fatal), the recipe-level ``Lifecycle`` reached through
``Selections`` (also written as a YAML list of one-key mappings, as Greengrass Lite docs do),
and an unquoted ``RecipeFormatVersion: 2020-01-25`` (YAML timestamps are kept as text).

What it refuses is what would make a deployment do something other than the author meant:
a component name or version outside the Greengrass limits, a version requirement that does
not parse, a step that is not a script, a timeout that is not a number. Every error is a
:class:`~nucleus.errors.RecipeError` naming the file, the field path in documented spelling
(``Manifests[0].Lifecycle.Run.Timeout``) and the reason.

The models are frozen slotted dataclasses built by a hand-written parser rather than pydantic
models: case-insensitive keys, tolerated shapes and field paths in the recipe's own spelling
are the whole job here, and they are clearer written out than bent into validators.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import structlog
import yaml

from ipc import config_tree
from nucleus.errors import RecipeError, VersionError
from nucleus.platforms import WILDCARDS, current_platform, platform_matches
from nucleus.versions import Requirement, Version

__all__ = [
    "STEP_NAMES",
    "Artifact",
    "Dependency",
    "DependencyType",
    "Lifecycle",
    "Manifest",
    "Permission",
    "PermissionType",
    "Recipe",
    "ResolvedManifest",
    "Step",
    "StepName",
    "find_recipes",
    "load_recipe",
    "parse_recipe",
]

log = structlog.get_logger(__name__)

DependencyType = Literal["HARD", "SOFT"]
PermissionType = Literal["NONE", "OWNER", "ALL"]
UnarchiveType = Literal["NONE", "ZIP"]
StepName = Literal["bootstrap", "install", "startup", "run", "shutdown", "recover", "uninstall"]
STEP_NAMES: tuple[StepName, ...] = get_args(StepName)

SUPPORTED_FORMAT_VERSIONS = frozenset({"2020-01-25"})
KNOWN_COMPONENT_TYPES = frozenset(
    {"aws.greengrass.generic", "aws.greengrass.lambda", "aws.greengrass.plugin", "aws.greengrass.nucleus"}
)
NAME_MAX = 128
VERSION_MAX = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9\-_.]+$")
# A recipe variable anywhere in a value: such values are typed only after interpolation.
_VARIABLE_RE = re.compile(r"\{(?:[A-Za-z0-9\-_.]+:)?(?:artifacts|configuration|work|kernel|iot):[^{}]*\}")
ALL_SELECTION = "all"

# Documented spelling of every key, by lower-case key.
_TOP_KEYS = {
    k.lower(): k
    for k in (
        "RecipeFormatVersion",
        "ComponentName",
        "ComponentVersion",
        "ComponentType",
        "ComponentDescription",
        "ComponentPublisher",
        "ComponentConfiguration",
        "ComponentDependencies",
        "Manifests",
        "Lifecycle",
    )
}
_MANIFEST_KEYS = {k.lower(): k for k in ("Platform", "Lifecycle", "Artifacts", "Selections", "Name")}
_ARTIFACT_KEYS = {k.lower(): k for k in ("Uri", "Digest", "Algorithm", "Unarchive", "Permission")}
_STEP_KEYS = {k.lower(): k for k in ("Script", "Timeout", "Setenv", "Skipif", "RequiresPrivilege")}
_STEP_DOC = {
    "bootstrap": "Bootstrap",
    "install": "Install",
    "startup": "Startup",
    "run": "Run",
    "shutdown": "Shutdown",
    "recover": "Recover",
    "uninstall": "Uninstall",
}
# Keys inside a recipe-level lifecycle that get their documented spelling (selector names do not).
_LIFECYCLE_CANON = {**_STEP_DOC, **_STEP_KEYS, "setenv": "Setenv"}


DIGEST_ALGORITHMS = ("SHA-1", "SHA-224", "SHA-256", "SHA-384", "SHA-512")


def canonical_algorithm(algorithm: str) -> str:
    """An artifact's ``Algorithm`` as one of DIGEST_ALGORITHMS (``sha256`` and ``SHA256`` are
    ``SHA-256``); ValueError for anything else."""
    key = algorithm.strip().upper()
    if not key.startswith("SHA-") and key.startswith("SHA"):
        key = "SHA-" + key[3:]
    if key not in DIGEST_ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r} (supported: {', '.join(DIGEST_ALGORITHMS)})")
    return key


def parse_skipif(skipif: str) -> tuple[str, str]:
    """Greengrass ``Skipif``: ``onpath <executable>`` or ``exists <file>`` -> (kind, argument); the
    argument may still hold recipe variables. ValueError for anything else."""
    kind, _, arg = skipif.strip().partition(" ")
    if kind.lower() not in ("onpath", "exists"):
        raise ValueError(f"{skipif!r}: expected 'onpath <executable>' or 'exists <file>'")
    if not arg.strip():
        raise ValueError(f"{skipif!r} needs an argument")
    return kind.lower(), arg.strip()


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dependency:
    requirement: Requirement
    type: DependencyType = "HARD"


@dataclass(frozen=True, slots=True)
class Permission:
    read: PermissionType = "OWNER"
    execute: PermissionType = "NONE"


@dataclass(frozen=True, slots=True)
class Artifact:
    uri: str
    digest: str | None = None
    algorithm: str = "SHA-256"
    unarchive: UnarchiveType = "NONE"
    permission: Permission = field(default_factory=Permission)

    @property
    def file_name(self) -> str:
        """Greengrass stores an artifact under the last segment of its URI."""
        tail = self.uri.rstrip("/").rsplit("/", 1)[-1]
        # "docker:repo/image:tag" and "s3:name" with no slash: drop the scheme.
        if "/" not in self.uri.rstrip("/") and ":" in tail:
            tail = tail.split(":", 1)[1]
        return tail


@dataclass(frozen=True, slots=True)
class Step:
    script: str
    timeout: float | str | None = None  # str only when it holds a recipe variable
    setenv: dict[str, str] = field(default_factory=dict)
    skipif: str | None = None
    requires_privilege: bool | str = False  # str only when it holds a recipe variable


@dataclass(frozen=True, slots=True)
class Lifecycle:
    setenv: dict[str, str] = field(default_factory=dict)
    steps: dict[StepName, Step] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.steps and not self.setenv


@dataclass(frozen=True, slots=True)
class Manifest:
    platform: dict[str, str] | None = None
    lifecycle: Lifecycle | None = None  # None = not given
    artifacts: list[Artifact] = field(default_factory=list)
    selections: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ResolvedManifest:
    lifecycle: Lifecycle
    artifacts: list[Artifact]
    platform: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class Recipe:
    format_version: str
    name: str
    version: Version
    type: str = "aws.greengrass.generic"
    description: str = ""
    publisher: str = ""
    default_configuration: dict[str, Any] = field(default_factory=dict)
    dependencies: dict[str, Dependency] = field(default_factory=dict)
    manifests: list[Manifest] = field(default_factory=list)
    lifecycle: dict[str, Any] = field(default_factory=dict)  # raw recipe-level lifecycle
    source: str | None = None

    def select(self, platform: Mapping[str, str]) -> ResolvedManifest | None:
        """The manifest this device runs, as the Java nucleus picks it.

        The first matching manifest wins. Its own non-empty ``Lifecycle`` is used as is;
        otherwise the recipe-level ``Lifecycle`` is filtered through the manifest's
        ``Selections`` (then the plain values of its ``Platform``, e.g. ``linux``, then
        ``all``). ``None`` means no manifest matches this device. A recipe without manifests
        runs its recipe-level lifecycle (empty if none: nothing to run).
        """
        if not self.manifests:
            lifecycle = self._global_lifecycle(None) if self.lifecycle else Lifecycle()
            return ResolvedManifest(lifecycle, [], None)
        for manifest in self.manifests:
            if platform_matches(manifest.platform, platform):
                return ResolvedManifest(self._manifest_lifecycle(manifest), manifest.artifacts,
                                        manifest.platform)
        return None

    @property
    def has_lifecycle(self) -> bool:
        """Whether the manifest for this device has any step to run."""
        resolved = self.select(current_platform())
        return resolved is not None and bool(resolved.lifecycle.steps)

    def _manifest_lifecycle(self, manifest: Manifest) -> Lifecycle:
        if manifest.lifecycle is not None and not manifest.lifecycle.is_empty:
            return manifest.lifecycle
        if self.lifecycle:
            return self._global_lifecycle(manifest)
        return manifest.lifecycle or Lifecycle()

    def _global_lifecycle(self, manifest: Manifest | None) -> Lifecycle:
        keywords = {ALL_SELECTION}
        for m in self.manifests:
            keywords.update(m.selections)
            keywords.update(_platform_selectors(m.platform))
        selectors: list[str] = []
        if manifest is not None:
            selectors = [*manifest.selections, *_platform_selectors(manifest.platform)]
        filtered = _filter_selections(self.lifecycle, keywords, selectors)
        if not isinstance(filtered, Mapping) or not filtered:
            log.warning("recipe.lifecycle_unselected", source=self.source, component=self.name,
                        selections=selectors)
            return Lifecycle()
        where = f"Lifecycle (recipe-level, selections {[*selectors, ALL_SELECTION]})"
        ctx = _Ctx(self.source)
        return _parse_lifecycle(ctx, filtered, where)

    def to_document(self) -> dict[str, Any]:
        """The recipe as a Greengrass-shaped dict in documented key spelling; it parses back
        to an equal :class:`Recipe` (the store writes recipes in this form)."""
        doc: dict[str, Any] = {
            "RecipeFormatVersion": self.format_version,
            "ComponentName": self.name,
            "ComponentVersion": str(self.version),
            "ComponentType": self.type,
            "ComponentDescription": self.description,
            "ComponentPublisher": self.publisher,
        }
        if self.default_configuration:
            doc["ComponentConfiguration"] = {"DefaultConfiguration": self.default_configuration}
        if self.dependencies:
            doc["ComponentDependencies"] = {
                name: {"VersionRequirement": str(dep.requirement), "DependencyType": dep.type}
                for name, dep in self.dependencies.items()
            }
        doc["Manifests"] = [_manifest_document(m) for m in self.manifests]
        if self.lifecycle:
            doc["Lifecycle"] = self.lifecycle
        return doc


def _platform_selectors(platform: Mapping[str, str] | None) -> list[str]:
    if not platform:
        return []
    out: list[str] = []
    for value in platform.values():
        text = value.strip()
        if text and text.lower() not in WILDCARDS and not (text.startswith("/") and text.endswith("/")):
            out.append(text)
    return out


def _filter_selections(source: Any, keywords: set[str], selectors: Sequence[str]) -> Any:
    """The Java nucleus's ``PlatformResolver.filterPlatform``: at any level, a mapping with a
    selection keyword among its keys is replaced by the value of the first selector present
    (else ``all``); other mappings are filtered key by key. ``None`` = filtered away."""
    if not isinstance(source, Mapping):
        return source
    if any(k in keywords for k in source):
        chosen = next((source[s] for s in selectors if source.get(s) is not None), None)
        if chosen is None:
            chosen = source.get(ALL_SELECTION)
        others = [k for k in source if k not in keywords]
        if others:
            log.warning("recipe.selection_mixed_keys", ignored=others)
        return None if chosen is None else _filter_selections(chosen, keywords, selectors)
    out: dict[str, Any] = {}
    for key, value in source.items():
        filtered = _filter_selections(value, keywords, selectors)
        if filtered is not None:
            out[key] = filtered
    return out


def _number_text(value: float | str | None) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _lifecycle_document(lc: Lifecycle) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if lc.setenv:
        doc["Setenv"] = dict(lc.setenv)
    for name, step in lc.steps.items():
        s: dict[str, Any] = {"Script": step.script}
        if step.timeout is not None:
            s["Timeout"] = _number_text(step.timeout)
        if step.setenv:
            s["Setenv"] = dict(step.setenv)
        if step.skipif is not None:
            s["Skipif"] = step.skipif
        if step.requires_privilege is not False:
            s["RequiresPrivilege"] = step.requires_privilege
        doc[_STEP_DOC[name]] = s
    return doc


def _manifest_document(m: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if m.name is not None:
        doc["Name"] = m.name
    if m.platform is not None:
        doc["Platform"] = dict(m.platform)
    if m.selections:
        doc["Selections"] = list(m.selections)
    if m.lifecycle is not None:
        doc["Lifecycle"] = _lifecycle_document(m.lifecycle)
    doc["Artifacts"] = [
        {
            "Uri": a.uri,
            **({"Digest": a.digest} if a.digest is not None else {}),
            "Algorithm": a.algorithm,
            "Unarchive": a.unarchive,
            "Permission": {"Read": a.permission.read, "Execute": a.permission.execute},
        }
        for a in m.artifacts
    ]
    return doc


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    source: str | None
    component: str | None = None

    def error(self, fld: str, reason: str) -> RecipeError:
        return RecipeError(reason, path=self.source, field=fld)

    def warn(self, event: str, fld: str, **kw: Any) -> None:
        log.warning(event, source=self.source, component=self.component, field=fld, **kw)


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _ci(ctx: _Ctx, value: Any, fld: str, known: Mapping[str, str] | None,
        what: str = "mapping") -> dict[str, tuple[str, Any]]:
    """A mapping keyed by lower-case key -> (key as written, value); unknown keys warned."""
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a {what}, got {_type_name(value)}")
    out: dict[str, tuple[str, Any]] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ctx.error(fld, f"key {key!r} must be a string")
        low = key.lower()
        if low in out:
            raise ctx.error(_join(fld, key),
                            f"duplicate key: {out[low][0]!r} and {key!r} differ only in case")
        if known is not None and low not in known:
            ctx.warn("recipe.key_unknown", _join(fld, key))
            continue
        out[low] = (key, item)
    return out


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _scalar_text(value: Any) -> str:
    """Text of a scalar as the Java nucleus renders it (booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.date):
        return value.isoformat()
    return str(value)


def _opt_str(ctx: _Ctx, value: Any, fld: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float, bool, _dt.date)):
        return _scalar_text(value)
    raise ctx.error(fld, f"must be a string, got {_type_name(value)}")


def _str_map(ctx: _Ctx, value: Any, fld: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a mapping of names to strings, got {_type_name(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        name = str(k)
        # What the kernel cannot put in an environment would only fail at the step's launch.
        if not name or "=" in name or "\0" in name:
            raise ctx.error(_join(fld, name), "is not a valid environment variable name (empty, or holds '=' or a NUL)")
        text = _opt_str(ctx, v, _join(fld, name))
        if text is not None and "\0" in text:
            raise ctx.error(_join(fld, name), "holds a NUL character, which no environment value can carry")
        out[name] = "" if text is None else text
    return out


def _get(m: Mapping[str, tuple[str, Any]], low: str) -> Any:
    entry = m.get(low)
    return None if entry is None else entry[1]


def _check_name(ctx: _Ctx, value: Any) -> str:
    fld = "ComponentName"
    if value is None:
        raise ctx.error(fld, "is required")
    if not isinstance(value, str):
        raise ctx.error(fld, f"must be a string, got {_type_name(value)}")
    if not value:
        raise ctx.error(fld, "must not be empty")
    if len(value) > NAME_MAX:
        raise ctx.error(fld, f"is {len(value)} characters long; Greengrass allows at most {NAME_MAX}")
    if not _NAME_RE.match(value):
        raise ctx.error(fld, f"{value!r} has characters outside [A-Za-z0-9-_.] "
                             "(Greengrass component name rule)")
    return value


def _check_version(ctx: _Ctx, value: Any) -> Version:
    fld = "ComponentVersion"
    if value is None:
        raise ctx.error(fld, "is required")
    if not isinstance(value, str):
        raise ctx.error(fld, f"must be a string (quote it), got {_type_name(value)} {value!r}")
    if len(value) > VERSION_MAX:
        raise ctx.error(fld, f"is {len(value)} characters long; Greengrass allows at most {VERSION_MAX}")
    try:
        return Version.parse(value)
    except VersionError as exc:
        raise ctx.error(fld, exc.message) from exc


def _parse_format_version(ctx: _Ctx, value: Any) -> str:
    fld = "RecipeFormatVersion"
    if value is None:
        raise ctx.error(fld, "is required")
    text = _opt_str(ctx, value, fld) or ""
    if text not in SUPPORTED_FORMAT_VERSIONS:
        ctx.warn("recipe.format_version_unknown", fld, value=text,
                 supported=sorted(SUPPORTED_FORMAT_VERSIONS))
    return text


def _parse_dependencies(ctx: _Ctx, value: Any) -> dict[str, Dependency]:
    fld = "ComponentDependencies"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a mapping of component names, got {_type_name(value)}")
    out: dict[str, Dependency] = {}
    for name, spec in value.items():
        dfld = _join(fld, str(name))
        if not isinstance(name, str) or not name:
            raise ctx.error(dfld, "dependency name must be a non-empty string")
        if spec is None:
            out[name] = Dependency(Requirement.any())
            continue
        m = _ci(ctx, spec, dfld,
                {"versionrequirement": "VersionRequirement", "dependencytype": "DependencyType"})
        raw_req = _get(m, "versionrequirement")
        rfld = _join(dfld, "VersionRequirement")
        if raw_req is not None and not isinstance(raw_req, str):
            if isinstance(raw_req, (int, float)) and not isinstance(raw_req, bool):
                raw_req = str(raw_req)
            else:
                raise ctx.error(rfld, f"must be a string, got {_type_name(raw_req)}")
        try:
            req = Requirement.parse(raw_req)
        except VersionError as exc:
            raise ctx.error(rfld, exc.message) from exc
        raw_type = _get(m, "dependencytype")
        dep_type: DependencyType = "HARD"
        if raw_type is not None:
            text = str(raw_type).strip().upper()
            if text not in ("HARD", "SOFT"):
                raise ctx.error(_join(dfld, "DependencyType"), f"must be HARD or SOFT, got {raw_type!r}")
            dep_type = cast(DependencyType, text)
        out[name] = Dependency(req, dep_type)
    return out


def _parse_timeout(ctx: _Ctx, value: Any, fld: str) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ctx.error(fld, "must be a number of seconds, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        if _VARIABLE_RE.search(value):
            return value
        try:
            number = float(value.strip())
        except ValueError:
            raise ctx.error(fld, f"must be a number of seconds, got {value!r}") from None
    else:
        raise ctx.error(fld, f"must be a number of seconds, got {_type_name(value)}")
    if not 0 < number < float("inf"):
        raise ctx.error(fld, f"must be a positive number of seconds, got {value!r}")
    return number


def _parse_privilege(ctx: _Ctx, value: Any, fld: str) -> bool | str:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if _VARIABLE_RE.search(value):
            return value
    raise ctx.error(fld, f"must be true or false, got {value!r}")


def _parse_step(ctx: _Ctx, value: Any, fld: str) -> Step | None:
    if value is None:
        ctx.warn("recipe.step_empty", fld)
        return None
    if isinstance(value, str):
        return Step(script=value)
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a script string or a mapping with Script, got {_type_name(value)}")
    m = _ci(ctx, value, fld, _STEP_KEYS)
    script = _get(m, "script")
    if script is None:
        if "script" in m:
            ctx.warn("recipe.step_empty", _join(fld, "Script"))
            return None
        raise ctx.error(_join(fld, "Script"), "is required in a step mapping")
    if not isinstance(script, str):
        raise ctx.error(_join(fld, "Script"), f"must be a string, got {_type_name(script)}")
    skipif = _get(m, "skipif")
    if skipif is not None and not isinstance(skipif, str):
        raise ctx.error(_join(fld, "Skipif"),
                        f"must be a string such as 'onpath git', got {_type_name(skipif)}")
    if skipif is not None:
        try:
            parse_skipif(skipif)
        except ValueError as exc:  # at run time the step would run anyway: refuse it now
            raise ctx.error(_join(fld, "Skipif"), str(exc)) from exc
    return Step(
        script=script,
        timeout=_parse_timeout(ctx, _get(m, "timeout"), _join(fld, "Timeout")),
        setenv=_str_map(ctx, _get(m, "setenv"), _join(fld, "Setenv")),
        skipif=skipif,
        requires_privilege=_parse_privilege(ctx, _get(m, "requiresprivilege"),
                                            _join(fld, "RequiresPrivilege")),
    )


def _parse_lifecycle(ctx: _Ctx, value: Any, fld: str) -> Lifecycle:
    known: dict[str, str] = {**_STEP_DOC, "setenv": "Setenv"}
    m = _ci(ctx, value, fld, known)
    steps: dict[StepName, Step] = {}
    for low in STEP_NAMES:
        if low in m:
            raw = m[low][1]
            step = _parse_step(ctx, raw, _join(fld, _STEP_DOC[low]))
            if step is not None:
                steps[low] = step
    return Lifecycle(setenv=_str_map(ctx, _get(m, "setenv"), _join(fld, "Setenv")), steps=steps)


def _parse_permission(ctx: _Ctx, value: Any, fld: str) -> Permission:
    if value is None:
        return Permission()
    m = _ci(ctx, value, fld, {"read": "Read", "execute": "Execute"})
    values: dict[str, PermissionType] = {}
    for low, doc in (("read", "Read"), ("execute", "Execute")):
        raw = _get(m, low)
        if raw is None:
            continue
        text = str(raw).strip().upper()
        if text not in ("NONE", "OWNER", "ALL"):
            raise ctx.error(_join(fld, doc), f"must be NONE, OWNER or ALL, got {raw!r}")
        values[low] = cast(PermissionType, text)
    return Permission(**values)


def _parse_artifacts(ctx: _Ctx, value: Any, fld: str) -> list[Artifact]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(fld, f"must be a list, got {_type_name(value)}")
    out: list[Artifact] = []
    for i, item in enumerate(value):
        afld = f"{fld}[{i}]"
        if item is None:
            ctx.warn("recipe.item_null", afld)
            continue
        m = _ci(ctx, item, afld, _ARTIFACT_KEYS)
        uri = _get(m, "uri")
        if uri is None:
            # The Java parser drops such an artifact too late to say why; we keep the recipe
            # loadable (the corpus has one) and say which artifact is ignored.
            ctx.warn("recipe.artifact_ignored", afld, reason="no Uri")
            continue
        if not isinstance(uri, str) or not uri.strip():
            raise ctx.error(_join(afld, "Uri"), f"must be a non-empty string, got {uri!r}")
        unarchive_raw = _get(m, "unarchive")
        unarchive = "NONE" if unarchive_raw is None else str(unarchive_raw).strip().upper()
        if unarchive not in ("NONE", "ZIP"):
            raise ctx.error(_join(afld, "Unarchive"), f"must be NONE or ZIP, got {unarchive_raw!r}")
        algorithm = _opt_str(ctx, _get(m, "algorithm"), _join(afld, "Algorithm")) or "SHA-256"
        try:
            canonical_algorithm(algorithm)
        except ValueError as exc:  # the deployment would fail on it: say so when the recipe is read
            raise ctx.error(_join(afld, "Algorithm"), str(exc)) from exc
        digest = _get(m, "digest")
        if isinstance(digest, (int, float)) and not isinstance(digest, bool):
            raise ctx.error(_join(afld, "Digest"), "must be a string: quote it (YAML reads an unquoted all-digit "
                            "digest as a number and drops its leading zeros)")
        out.append(
            Artifact(
                uri=uri.strip(),
                digest=_opt_str(ctx, digest, _join(afld, "Digest")),
                algorithm=algorithm,
                unarchive=cast(UnarchiveType, unarchive),
                permission=_parse_permission(ctx, _get(m, "permission"), _join(afld, "Permission")),
            )
        )
    return out


def _parse_platform(ctx: _Ctx, value: Any, fld: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a mapping of attributes, got {_type_name(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        text = _opt_str(ctx, v, _join(fld, str(k)))
        if text is not None:
            out[str(k)] = text
    return out


def _parse_selections(ctx: _Ctx, value: Any, fld: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ctx.error(fld, "must be a list of selection names")
    return list(value)


def _parse_manifests(ctx: _Ctx, value: Any) -> list[Manifest]:
    fld = "Manifests"
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.error(fld, f"must be a list, got {_type_name(value)}")
    out: list[Manifest] = []
    for i, item in enumerate(value):
        mfld = f"{fld}[{i}]"
        if item is None:
            ctx.warn("recipe.item_null", mfld)
            continue
        m = _ci(ctx, item, mfld, _MANIFEST_KEYS)
        lc_raw = _get(m, "lifecycle")
        name = _get(m, "name")
        out.append(
            Manifest(
                platform=_parse_platform(ctx, _get(m, "platform"), _join(mfld, "Platform")),
                lifecycle=None if lc_raw is None else _parse_lifecycle(ctx, lc_raw, _join(mfld, "Lifecycle")),
                artifacts=_parse_artifacts(ctx, _get(m, "artifacts"), _join(mfld, "Artifacts")),
                selections=_parse_selections(ctx, _get(m, "selections"), _join(mfld, "Selections")),
                name=None if name is None else _scalar_text(name),
            )
        )
    return out


def _canonical_lifecycle(value: Any) -> Any:
    """Documented spelling for step and step-field keys at any depth; selection names and
    environment variable names are left as written."""
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        skey = str(key)
        canon = _LIFECYCLE_CANON.get(skey.lower(), skey)
        out[canon] = item if canon == "Setenv" else _canonical_lifecycle(item)
    return out


def _parse_global_lifecycle(ctx: _Ctx, value: Any) -> dict[str, Any]:
    fld = "Lifecycle"
    if value is None:
        return {}
    if isinstance(value, list):
        # Greengrass Lite docs write the selection map as a list of one-key mappings.
        merged: dict[str, Any] = {}
        for i, item in enumerate(value):
            if item is None:
                continue
            if not isinstance(item, Mapping):
                raise ctx.error(f"{fld}[{i}]", f"must be a mapping, got {_type_name(item)}")
            merged.update({str(k): v for k, v in item.items()})
        value = merged
    if not isinstance(value, Mapping):
        raise ctx.error(fld, f"must be a mapping, got {_type_name(value)}")
    result = _canonical_lifecycle(value)
    assert isinstance(result, dict)
    return result


def _build(ctx: _Ctx, doc: Any) -> Recipe:
    if not isinstance(doc, Mapping):
        raise ctx.error("(document)", f"a recipe must be a mapping, got {_type_name(doc)}")
    top = _ci(ctx, doc, "", _TOP_KEYS)
    name = _check_name(ctx, _get(top, "componentname"))
    ctx.component = name
    version = _check_version(ctx, _get(top, "componentversion"))
    fmt_version = _parse_format_version(ctx, _get(top, "recipeformatversion"))
    ctype = _opt_str(ctx, _get(top, "componenttype"), "ComponentType") or "aws.greengrass.generic"
    if ctype not in KNOWN_COMPONENT_TYPES:
        ctx.warn("recipe.component_type_unknown", "ComponentType", value=ctype)
    config_raw = _get(top, "componentconfiguration")
    default_config: dict[str, Any] = {}
    if config_raw is not None:
        cm = _ci(ctx, config_raw, "ComponentConfiguration", {"defaultconfiguration": "DefaultConfiguration"})
        dc = _get(cm, "defaultconfiguration")
        if dc is not None:
            if not isinstance(dc, Mapping):
                raise ctx.error("ComponentConfiguration.DefaultConfiguration",
                                f"must be a mapping, got {_type_name(dc)}")
            default_config = _plain(dc)
    recipe = Recipe(
        format_version=fmt_version,
        name=name,
        version=version,
        type=ctype,
        description=_opt_str(ctx, _get(top, "componentdescription"), "ComponentDescription") or "",
        publisher=_opt_str(ctx, _get(top, "componentpublisher"), "ComponentPublisher") or "",
        default_configuration=default_config,
        dependencies=_parse_dependencies(ctx, _get(top, "componentdependencies")),
        manifests=_parse_manifests(ctx, _get(top, "manifests")),
        lifecycle=_parse_global_lifecycle(ctx, _get(top, "lifecycle")),
        source=ctx.source,
    )
    # Resolve the recipe-level lifecycle for every manifest now, so a malformed step fails
    # the load (before a deployment touches anything) rather than the start of the component.
    if recipe.lifecycle:
        if not recipe.manifests:
            recipe._global_lifecycle(None)
        for manifest in recipe.manifests:
            if manifest.lifecycle is None or manifest.lifecycle.is_empty:
                recipe._global_lifecycle(manifest)
    return recipe


def _plain(value: Any) -> Any:
    """Configuration as JSON-compatible data (YAML dates and the like become text)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader without the YAML 1.1 timestamp rule: ``RecipeFormatVersion: 2020-01-25``
    and date-looking configuration values stay text, as they do for the Java nucleus."""


_RecipeYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _decode(ctx: _Ctx, data: str | bytes) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ctx.error("(document)", f"not UTF-8 text: {exc}") from exc


def _load_text(ctx: _Ctx, text: str, fmt: Literal["yaml", "json"] | None) -> Any:
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "yaml"
        if fmt == "json":
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                fmt = "yaml"  # YAML flow syntax also reads JSON with trailing commas
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ctx.error("(document)", f"JSON syntax error at line {exc.lineno}, column {exc.colno}: "
                                          f"{exc.msg}") from exc
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ctx.error("(document)", f"YAML syntax error{where}: {problem}") from exc


MAX_DEPTH = 64  # real recipes nest less than 15 levels
MAX_VALUES = 250_000  # values once YAML aliases are expanded; real recipes hold a few hundred


def parse_recipe(
    data: str | bytes | Mapping[str, Any],
    *,
    source: str | None = None,
    fmt: Literal["yaml", "json"] | None = None,
) -> Recipe:
    """A recipe from text (YAML or JSON; guessed when ``fmt`` is None) or an already-loaded
    mapping. ``source`` names the file in errors and logs."""
    ctx = _Ctx(source)
    if isinstance(data, Mapping):
        doc: Any = data
    else:
        try:
            doc = _load_text(ctx, _decode(ctx, data), fmt)
        except RecursionError as exc:
            raise ctx.error("(document)", f"is nested deeper than {MAX_DEPTH} levels") from exc
    # Before anything walks it: a YAML "alias bomb" of a few hundred bytes is a billion values to
    # the builder, and a recipe also reaches the daemon from IPC (CreateLocalDeployment).
    problem = config_tree.shape_problem(doc, max_depth=MAX_DEPTH, max_values=MAX_VALUES)
    if problem is not None:
        raise ctx.error("(document)", problem)
    return _build(ctx, doc)


_FORMATS: dict[str, Literal["yaml", "json"]] = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise RecipeError(f"unknown recipe file type {p.suffix!r} (expected .yaml, .yml or .json)",
                          path=p, field="(document)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read: {exc.strerror or exc}", path=p, field="(document)") from exc
    return parse_recipe(data, source=str(p), fmt=fmt)


def find_recipes(path: Path) -> list[Path]:
    """Recipe files at ``path``: the file itself, or the ``*.yaml``/``*.yml``/``*.json`` files
    of a directory and of its ``recipes/`` subfolder (sorted, not recursive)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise RecipeError("no such file or directory", path=p, field="(document)")
    found: list[Path] = []
    for folder in (p, p / "recipes"):
        if folder.is_dir():
            found.extend(sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _FORMATS))
    return found

