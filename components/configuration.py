"""The one rule by which every built-in component reads its configuration (the recipe's
``ComponentConfiguration`` as the nucleus merged it): SensorIngest, ProtectiveAction, AnomalyDetector.

Keys are checked, not skimmed: an unknown key is an error naming the component and the key. A
misspelt key (``topContributor`` for ``topContributors``) would otherwise leave the default in place
while the deployment said SUCCEEDED, and nobody would notice. The exception is what belongs to the
nucleus, not to the component, but lives in the same document: ``accessControl`` (the component's IPC
policies, read by ``nucleus/authz.py``), which recipes carry next to the component's own keys.

The same parser serves the start (an error ends the component, which ``ipc.run_component`` logs as
``component.failed`` and reports ERRORED) and the validation of a deployment's proposed configuration
(``Client.configuration_changes``: the deployment fails naming the component and the reason).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

if TYPE_CHECKING:
    from ipc import Client

log = structlog.get_logger("components.configuration")

NUCLEUS_KEYS = frozenset({"accessControl"})


def component_name(built_in: str) -> str:
    """The name this process runs under (the nucleus sets ``NUCLEUS_COMPONENT_NAME``), else the
    built-in's: a copy of a recipe under another name (one ingest per asset) must name itself, not the
    built-in, in a refused configuration."""
    return os.environ.get("NUCLEUS_COMPONENT_NAME") or built_in
"""Top-level keys of a component's configuration that the nucleus reads and the component ignores."""

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """The configuration does not validate; names the component and each field at fault."""

    def __init__(self, component: str, errors: list[str]) -> None:
        super().__init__(f"{component}: invalid configuration: " + "; ".join(errors))
        self.component = component
        self.errors = errors


def parse_config(model: type[M], raw: Any, component: str) -> M:
    """``raw`` (None: nothing configured) as ``model``, whose ``extra="forbid"`` refuses unknown keys."""
    if raw is None:
        raw = {}
    doc = {k: v for k, v in raw.items() if k not in NUCLEUS_KEYS} if isinstance(raw, dict) else raw
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(component, [_describe(e, doc) for e in exc.errors()]) from exc


def config_changes(client: Client, load: Callable[[Any], M], event: str) -> AsyncIterator[M]:
    """Each valid new configuration, parsed by ``load``; the same parser answers the nucleus's validation
    of a proposed configuration, so what a deployment is told and what is applied cannot differ. One that
    does not parse anyway (written outside a deployment) is logged as ``event`` and the running one kept."""

    def rejected(exc: Exception) -> None:
        log.warning(event, component=getattr(exc, "component", None), error=str(exc),
                    errors=getattr(exc, "errors", None))

    return client.configuration_changes(load, errors=(ConfigError,), rejected=rejected)


def _describe(error: ErrorDetails, doc: Any) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "<root>"
    if error["type"] != "extra_forbidden" or not loc:
        # A validator's own ValueError reads "Value error, <its message>": the message is the point.
        msg = error["msg"].removeprefix("Value error, ") if error["type"] == "value_error" else error["msg"]
        return f"{where}: {msg}"
    # snake_case is accepted too, so a snake_case key beside its camelCase twin (the recipe's default) is
    # not unknown: it is the same key twice, and saying "unknown" would send the reader looking for a typo.
    key, parent = str(loc[-1]), doc
    for part in loc[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            parent = None
            break
    twin = to_camel(key)
    if twin != key and isinstance(parent, dict) and twin in parent:
        return f"{where}: the same key as {twin}, given twice (snake_case and camelCase)"
    # Configuration outlives versions (a new version keeps the device's keys), so after a downgrade the
    # older version meets keys only the newer one knew: say how to drop it, not only that it is wrong.
    pointer = "/" + "/".join(str(p) for p in loc)
    return f"{where}: unknown key (misspelt, or left by another version: RESET {pointer} removes it)"
