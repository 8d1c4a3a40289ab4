"""Recipe variables: ``{artifacts:path}``, ``{configuration:/a/b}``, ``{Other:work:path}`` ...

Greengrass replaces these in lifecycle scripts, environment values, ``Skipif``, ``Timeout``
and ``RequiresPrivilege`` just before a step runs, so a configuration change shows up at the
next start without a new recipe. A variable that cannot be resolved (a configuration key that
is not set, a component that is not a direct dependency) is left as written and reported:
the Java nucleus does the same, and a literal ``{configuration:/x}`` in a failing script is
easier to diagnose than an empty string.

Values that are not strings render as the Java nucleus renders them: mappings and lists as
compact JSON, booleans as ``true``/``false``, ``null`` as ``null``, numbers as written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from nucleus.recipe import Lifecycle, Step

__all__ = [
    "ComponentContext",
    "InterpolationContext",
    "find_variables",
    "interpolate",
    "interpolate_lifecycle",
    "json_pointer_get",
]

log = structlog.get_logger(__name__)

# {[Component:]namespace:key}; the component part is a Greengrass component name.
_VARIABLE_RE = re.compile(
    r"\{(?:(?P<component>[A-Za-z0-9\-_.]+):)?(?P<ns>artifacts|configuration|work|kernel|iot):(?P<key>[^{}]*)\}"
)


@dataclass(slots=True)
class ComponentContext:
    name: str
    configuration: Mapping[str, Any]
    artifacts_path: str
    decompressed_path: str
    work_path: str


@dataclass(slots=True)
class InterpolationContext:
    component: ComponentContext
    kernel_root: str
    thing_name: str
    dependencies: Mapping[str, ComponentContext] = field(default_factory=dict)  # direct ones only


def json_pointer_get(doc: Any, pointer: str) -> Any:
    """RFC 6901 lookup; a pointer without the leading ``/`` (``{configuration:password}``,
    seen in real recipes) is read as if it had one. Raises ``KeyError`` if absent."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        pointer = "/" + pointer
    node = doc
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            if token not in node:
                raise KeyError(pointer)
            node = node[token]
        elif isinstance(node, list):
            if not token.isdigit() or (len(token) > 1 and token[0] == "0") or int(token) >= len(node):
                raise KeyError(pointer)
            node = node[int(token)]
        else:
            raise KeyError(pointer)
    return node


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def _lookup(ns: str, key: str, comp: ComponentContext, ctx: InterpolationContext, own: bool) -> str | None:
    if ns == "configuration":
        try:
            return _render(json_pointer_get(comp.configuration, key))
        except KeyError:
            return None
    if ns == "artifacts":
        return {"path": comp.artifacts_path, "decompressedPath": comp.decompressed_path}.get(key)
    if ns == "work":
        return comp.work_path if key == "path" else None
    # kernel and iot belong to the device, not to a component: only the short form.
    if not own:
        return None
    if ns == "kernel":
        return ctx.kernel_root if key == "rootPath" else None
    if ns == "iot":
        return ctx.thing_name if key == "thingName" else None
    return None


def find_variables(text: str) -> list[str]:
    """Every recipe variable written in ``text``, as written (for validation and docs)."""
    return [m.group(0) for m in _VARIABLE_RE.finditer(text)]


def interpolate(text: str, ctx: InterpolationContext, *, warn: Callable[[str], None] | None = None) -> str:
    """``text`` with every resolvable recipe variable replaced (one pass: a value that
    itself looks like a variable is not expanded again)."""

    def report(variable: str) -> None:
        if warn is not None:
            warn(variable)
        else:
            log.warning("recipe.variable_unresolved", component=ctx.component.name, variable=variable)

    def substitute(m: re.Match[str]) -> str:
        other = m.group("component")
        if other is None:
            comp, own = ctx.component, True
        elif other == ctx.component.name:
            comp, own = ctx.component, False
        else:
            dep = ctx.dependencies.get(other)
            if dep is None:
                report(m.group(0))
                return m.group(0)
            comp, own = dep, False
        value = _lookup(m.group("ns"), m.group("key"), comp, ctx, own)
        if value is None:
            report(m.group(0))
            return m.group(0)
        return value

    return _VARIABLE_RE.sub(substitute, text)


def _maybe(text: str | None, ctx: InterpolationContext, warn: Callable[[str], None] | None) -> str | None:
    return None if text is None else interpolate(text, ctx, warn=warn)


def _timeout(value: float | str | None, ctx: InterpolationContext,
             warn: Callable[[str], None] | None) -> float | str | None:
    if not isinstance(value, str):
        return value
    text = interpolate(value, ctx, warn=warn)
    try:
        number = float(text.strip())
    except ValueError:
        return text  # still unresolved: the supervisor applies its default and says so
    return number if number > 0 else text


def _privilege(value: bool | str, ctx: InterpolationContext,
               warn: Callable[[str], None] | None) -> bool | str:
    if not isinstance(value, str):
        return value
    text = interpolate(value, ctx, warn=warn).strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _step(step: Step, ctx: InterpolationContext, warn: Callable[[str], None] | None) -> Step:
    return replace(
        step,
        script=interpolate(step.script, ctx, warn=warn),
        timeout=_timeout(step.timeout, ctx, warn),
        setenv={k: interpolate(v, ctx, warn=warn) for k, v in step.setenv.items()},
        skipif=_maybe(step.skipif, ctx, warn),
        requires_privilege=_privilege(step.requires_privilege, ctx, warn),
    )


def interpolate_lifecycle(lifecycle: Lifecycle, ctx: InterpolationContext, *,
                          warn: Callable[[str], None] | None = None) -> Lifecycle:
    """A copy of ``lifecycle`` with variables replaced in scripts, environment values,
    ``Skipif``, ``Timeout`` and ``RequiresPrivilege`` (the last two typed once resolved)."""
    return Lifecycle(
        setenv={k: interpolate(v, ctx, warn=warn) for k, v in lifecycle.setenv.items()},
        steps={name: _step(step, ctx, warn) for name, step in lifecycle.steps.items()},
    )
