"""The nucleus's own IPC operations: configuration, state, components, deployments, logs.

Every operation the CLI uses goes through here, over the same socket and the same
authorization as a component's calls, so ``nucleus deploy`` is just a privileged client.
Errors of the nucleus (recipe, resolution, configuration) are mapped to IPC error codes at
this one boundary, carrying the file, field and component in ``details``.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from ipc import config_tree
from ipc.core import CallContext, IpcCore
from ipc.errors import InvalidArguments, IpcError, ResourceNotFound, ServiceError, Unauthorized
from nucleus import authz
from nucleus.component_logs import follow, tail
from nucleus.config_store import ConfigStore
from nucleus.config_validation import ConfigValidators, Verdict
from nucleus.deployment import DeploymentEngine
from nucleus.errors import (
    ConfigurationError,
    DeploymentError,
    NucleusError,
    RecipeError,
    UnknownComponentError,
    VersionError,
)
from nucleus.identity import Identities
from nucleus.journal import Journal
from nucleus.orchestrator import Orchestrator
from nucleus.paths import Paths
from nucleus.states import State
from nucleus.update_policy import UpdateNotifier

log = structlog.get_logger("nucleus.control")

Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]


def _mapped(fn: Handler, database: Path) -> Handler:
    @functools.wraps(fn)
    async def wrapper(ctx: CallContext, args: dict[str, Any]) -> Any:
        try:
            return await fn(ctx, args)
        except IpcError:
            raise
        except sqlite3.OperationalError as exc:
            # SQLite says only "database or disk is full": say which file, and that nothing was changed.
            if "full" not in str(exc) and "I/O" not in str(exc):
                raise
            raise ServiceError(f"the nucleus could not record this request in {database}: {exc}; nothing was "
                               "changed (free space on that disk and try again)",
                               {"path": str(database), "reason": "disk_full" if "full" in str(exc) else "io_error"},
                               ) from exc
        except UnknownComponentError as exc:
            raise ResourceNotFound(str(exc), exc.to_dict()) from exc
        except (RecipeError, ConfigurationError, VersionError) as exc:
            raise InvalidArguments(str(exc), exc.to_dict()) from exc
        except NucleusError as exc:
            raise ServiceError(str(exc), exc.to_dict()) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArguments(f"bad arguments: {exc}") from exc

    return wrapper


def _str_arg(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArguments(f"argument {key!r} must be a non-empty string", {"argument": key})
    return value


def _key_path(args: Mapping[str, Any]) -> list[str]:
    value = args.get("key_path") or []
    if isinstance(value, str):
        value = [p for p in value.split("/") if p]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidArguments("key_path must be a list of strings")
    return value


class Metrics:
    """Last values of component metrics (PutComponentMetric), bounded per component."""

    def __init__(self, per_component: int = 256) -> None:
        self._values: dict[str, dict[str, dict[str, Any]]] = {}
        self._limit = per_component

    def put(self, component: str, metrics: list[Mapping[str, Any]]) -> None:
        table = self._values.setdefault(component, {})
        for m in metrics:
            name = m.get("name")
            value = m.get("value")
            if not isinstance(name, str) or not isinstance(value, int | float):
                raise InvalidArguments("each metric needs a string name and a numeric value")
            if name not in table and len(table) >= self._limit:
                raise InvalidArguments(f"more than {self._limit} distinct metrics for {component}")
            table[name] = {"value": value, "unit": m.get("unit", "None"), "ts": time.time()}

    def of(self, component: str) -> dict[str, dict[str, Any]]:
        return dict(self._values.get(component, {}))


class Control:
    def __init__(
        self,
        core: IpcCore,
        *,
        paths: Paths,
        journal: Journal,
        config: ConfigStore,
        orchestrator: Orchestrator,
        engine: DeploymentEngine,
        notifier: UpdateNotifier,
        identities: Identities,
        authorizer: authz.Authorizer,
        set_client_policies: Callable[[str, Any], None],
        remove_client_policies: Callable[[str], None],
        status: Callable[[], dict[str, Any]],
        validators: ConfigValidators,
    ) -> None:
        self._paths = paths
        self._validators = validators  # the engine's: what components report here, it waits for
        self._journal = journal
        self._config = config
        self._orch = orchestrator
        self._engine = engine
        self._notifier = notifier
        self._identities = identities
        self._authz = authorizer
        self._set_client_policies = set_client_policies
        self._remove_client_policies = remove_client_policies
        self._core = core
        self._status = status
        self.metrics = Metrics()
        ops: dict[str, Handler] = {
            "config.get": self.config_get,
            "config.update": self.config_update,
            "state.update": self.state_update,
            "lifecycle.defer_update": self.defer_update,
            "config.validation.report": self.config_validation_report,
            "components.list": self.components_list,
            "components.get": self.components_get,
            "components.restart": self.components_restart,
            "components.stop": self.components_stop,
            "deployments.create": self.deployments_create,
            "deployments.get": self.deployments_get,
            "deployments.list": self.deployments_list,
            "metrics.put": self.metrics_put,
            "clients.add": self.clients_add,
            "clients.list": self.clients_list,
            "clients.remove": self.clients_remove,
            "nucleus.status": self.nucleus_status,
        }
        for op, handler in ops.items():
            core.register(op, _mapped(handler, paths.database))
        core.register_stream("config.subscribe", self.config_subscribe)
        core.register_stream("lifecycle.subscribe_updates", self.subscribe_updates)
        core.register_stream("config.validation.subscribe", self.config_validation_subscribe)
        core.register_stream("deployments.watch", self.deployments_watch)
        core.register_stream("logs.tail", self.logs_tail)

    # --- configuration -----------------------------------------------------------------------
    def _target_component(self, ctx: CallContext, args: Mapping[str, Any], operation: str) -> str:
        target = args.get("component") or ctx.principal.name
        if not isinstance(target, str):
            raise InvalidArguments("component must be a string")
        ctx.authorize(authz.CONFIG, f"aws.greengrass#{operation}", target)
        if target not in self._config.components():
            if target == ctx.principal.name and ctx.principal.kind != "component":
                raise ResourceNotFound(f"{target} is a declared client, not a component: it has no configuration "
                                       "of its own (name a component with 'component')", {"component": target})
            raise ResourceNotFound(f"component {target} has no configuration", {"component": target})
        return target

    async def config_get(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        target = self._target_component(ctx, args, "GetConfiguration")
        return self._config.get(target, _key_path(args))

    async def config_update(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        # Own configuration needs no policy; another component's needs UpdateConfiguration on it.
        target = self._target_component(ctx, args, "UpdateConfiguration")
        key_path = _key_path(args)
        if not key_path:
            raise InvalidArguments("key_path must name at least one key")
        if config_tree.restricted_keys(key_path, None):
            raise InvalidArguments(f"{key_path[0]} may not be updated at run time: a component's policies come "
                                   "from its deployments (docs/configuration.md)", {"argument": "key_path"})
        changed = self._config.update(target, key_path, args.get("value"), timestamp=args.get("timestamp"))
        return {"changed": changed}

    async def config_subscribe(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        target = self._target_component(ctx, args, "SubscribeToConfigurationUpdate")
        async with self._config.watch(target, _key_path(args)) as changes:
            async for changed in changes:
                # Checked again at every change (a cached decision): a deployment that took the policy
                # away ends the watch with Unauthorized instead of leaving it reporting.
                ctx.authorize(authz.CONFIG, "aws.greengrass#SubscribeToConfigurationUpdate", target)
                yield {"component": target, "key_path": changed}

    # --- lifecycle -----------------------------------------------------------------------------
    async def state_update(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        state = _str_arg(args, "state").upper()
        if state not in ("RUNNING", "ERRORED"):
            raise InvalidArguments(f"state must be RUNNING or ERRORED, not {state}")
        if ctx.principal.kind != "component":
            raise InvalidArguments("only components report their state")
        message = args.get("message") or ""
        if not isinstance(message, str):
            raise InvalidArguments("message must be a string", {"argument": "message"})
        # One line of the component's own reason, kept short: it becomes the state's reason, which the
        # deployment's result, `nucleus list` and the rollback message carry.
        self._orch.report_state(ctx.principal.name, State(state), " ".join(message.split())[:300])
        return None

    # --- configuration validation (no policy: a component validates only its own configuration) -----
    async def config_validation_subscribe(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        if ctx.principal.kind != "component":
            raise InvalidArguments("only components validate their configuration")
        async for event in self._validators.subscribe(ctx.principal.name):
            yield event

    async def config_validation_report(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        deployment_id = _str_arg(args, "deployment_id")
        status = _str_arg(args, "status").upper()
        verdicts: dict[str, Verdict] = {"ACCEPTED": "ACCEPTED", "REJECTED": "REJECTED"}
        if status not in verdicts:
            raise InvalidArguments(f"status must be ACCEPTED or REJECTED, not {status}")
        if not self._validators.report(ctx.principal.name, deployment_id, verdicts[status],
                                       str(args.get("message") or "")):
            # Greengrass answers this case with InvalidArgumentsError too; silence would leave a client
            # that sent a wrong id believing it had answered while the deployment waits out its timeout.
            raise InvalidArguments(f"no validation of deployment {deployment_id} is waiting for "
                                   f"{ctx.principal.name}'s report: it timed out, was answered already, or was "
                                   "never sent", {"deployment_id": deployment_id})
        return None

    async def subscribe_updates(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        async for event in self._notifier.subscribe(ctx.principal.name):
            yield event

    async def defer_update(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        deployment_id = _str_arg(args, "deployment_id")
        recheck = float(args.get("recheck_after_s") or 0.0)
        if not self._notifier.defer(ctx.principal.name, deployment_id, recheck, str(args.get("message") or "")):
            raise InvalidArguments(f"no update of deployment {deployment_id} is waiting for an answer: it timed "
                                   "out or was never announced", {"deployment_id": deployment_id})
        return None

    # --- components ----------------------------------------------------------------------------
    def _require_component(self, name: str) -> None:
        if self._orch.get(name) is None:
            raise ResourceNotFound(f"no component named {name}", {"component": name})

    async def components_list(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        ctx.authorize(authz.CLI, "aws.greengrass#ListComponents", "*")
        return [self._orch.describe(n) for n in sorted(self._orch.names())]

    async def components_get(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        name = _str_arg(args, "name")
        ctx.authorize(authz.CLI, "aws.greengrass#GetComponentDetails", name)
        self._require_component(name)
        details = self._orch.describe(name)
        details["metrics"] = self.metrics.of(name)
        details["processes"] = self._orch.supervisor.processes(name)
        details["configuration"] = self._config.document(name) if name in self._config.components() else {}
        details["log_file"] = str(self._paths.component_log(name))
        return details

    async def components_restart(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        name = _str_arg(args, "name")
        ctx.authorize(authz.CLI, "aws.greengrass#RestartComponent", name)
        self._require_component(name)
        await self._orch.restart(name, force=bool(args.get("force")))
        return self._orch.describe(name)

    async def components_stop(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        name = _str_arg(args, "name")
        ctx.authorize(authz.CLI, "aws.greengrass#StopComponent", name)
        self._require_component(name)
        await self._orch.stop([name], reason=f"stopped by {ctx.principal.name}")
        return self._orch.describe(name)

    # --- deployments ---------------------------------------------------------------------------
    async def deployments_create(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        ctx.authorize(authz.CLI, "aws.greengrass#CreateLocalDeployment", "*")
        try:
            record = self._engine.submit(args)
        except DeploymentError as exc:
            raise InvalidArguments(str(exc), exc.to_dict()) from exc
        return {"id": record.id, "queue_position": self._engine.position(record.id)}

    async def deployments_get(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        ctx.authorize(authz.CLI, "aws.greengrass#GetLocalDeploymentStatus", "*")
        deployment_id = _str_arg(args, "id")
        record = self._journal.get(deployment_id)
        if record is None:
            raise ResourceNotFound(f"no deployment {deployment_id}")
        summary = record.summary()
        summary["events"] = self._journal.events(deployment_id)
        return summary

    async def deployments_list(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        ctx.authorize(authz.CLI, "aws.greengrass#ListLocalDeployments", "*")
        limit = int(args.get("limit") or 50)
        return [r.summary() for r in self._journal.recent(limit=limit)]

    async def deployments_watch(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        ctx.authorize(authz.CLI, "aws.greengrass#GetLocalDeploymentStatus", "*")
        deployment_id = _str_arg(args, "id")
        if self._journal.get(deployment_id) is None:
            raise ResourceNotFound(f"no deployment {deployment_id}")
        async for event in self._engine.watch(deployment_id):
            yield event

    # --- logs, metrics, clients, status ----------------------------------------------------------
    async def logs_tail(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        if ctx.principal.kind != "nucleus":
            raise Unauthorized("logs.tail is reserved to the nucleus CLI")
        name = _str_arg(args, "name")
        path = self._paths.nucleus_log if name == "nucleus" else self._paths.component_log(name)
        if not path.exists() and self._orch.get(name) is None:
            raise ResourceNotFound(f"no component named {name} and no log at {path}")
        asked = args.get("lines")
        lines = 50 if asked is None else int(asked)  # 0 is "none", as `tail -n 0`: `logs -n 0 -f` shows new lines only
        if lines < 0:
            raise InvalidArguments(f"lines must be 0 or more, got {lines}")
        if args.get("follow"):
            async for line in follow(path, lines=lines):
                yield line
            return
        for line in tail(path, lines) if path.exists() else []:
            yield line

    async def metrics_put(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        # No resource, as in Greengrass: a component puts only its own metrics. A policy without
        # `resources` (docs/configuration.md) allows it, and so does Greengrass's usual `["*"]`.
        ctx.authorize(authz.METRICS, "aws.greengrass#PutComponentMetric", "")
        metrics = args.get("metrics")
        if not isinstance(metrics, list):
            raise InvalidArguments("metrics must be a list of {name, unit, value}")
        self.metrics.put(ctx.principal.name, metrics)
        return None

    def _client_name(self, ctx: CallContext, args: dict[str, Any], operation: str) -> str:
        if ctx.principal.kind != "nucleus":
            raise Unauthorized(f"{operation} is reserved to the nucleus CLI")
        name = _str_arg(args, "name")
        if "/" in name or "\0" in name or name.startswith(".") or name != name.strip():
            # The name becomes clients/NAME.token and clients/NAME.policy.json.
            raise InvalidArguments(f"client name {name!r} must be one path segment: no '/', no leading '.', "
                                   "no surrounding spaces", {"argument": "name"})
        return name

    async def clients_add(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        name = self._client_name(ctx, args, "clients.add")
        keep_token = args.get("keep_token", False)
        if not isinstance(keep_token, bool):
            raise InvalidArguments("keep_token must be true or false", {"argument": "keep_token"})
        entry = self._orch.get(name)
        if entry is not None and entry.runner.spec.steps:
            # Policies are per name: a client called like a component would replace that component's
            # policies with its own, and could read and change its configuration without a policy.
            raise InvalidArguments(f"{name} is a deployed component; a declared client needs a name of its own",
                                   {"argument": "name", "component": name})
        policy = args.get("policy")
        try:
            self._set_client_policies(name, policy)
        except ConfigurationError as exc:
            raise InvalidArguments(str(exc), exc.to_dict()) from exc
        token_file = str(self._paths.client_token(name))
        if keep_token and name in self._identities.clients():
            # A new policy for the token the application already holds: its open sessions stay, and
            # each of their subscriptions and streams is checked against the new policy at once.
            return {"name": name, "token": None, "token_kept": True, "token_file": token_file}
        token = self._identities.add_client(name)
        return {"name": name, "token": token, "token_kept": False, "token_file": token_file}

    async def clients_list(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        if ctx.principal.kind != "nucleus":
            raise Unauthorized("clients.list is reserved to the nucleus CLI")
        sessions: dict[str, int] = {}
        for info in self._core.sessions():
            if info.principal.kind == "client":
                sessions[info.principal.name] = sessions.get(info.principal.name, 0) + 1
        return [{"name": name, "declared_by": "recipe" if self._orch.get(name) is not None else "cli",
                 "sessions": sessions.get(name, 0), "token_file": str(self._paths.client_token(name))}
                for name in self._identities.clients()]

    async def clients_remove(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        name = self._client_name(ctx, args, "clients.remove")
        if self._orch.get(name) is not None:
            raise InvalidArguments(f"client {name} is declared by a deployed recipe; a deployment that removes "
                                   f"the component {name} removes the client", {"argument": "name", "component": name})
        if name not in self._identities.clients():
            raise ResourceNotFound(f"no declared client named {name}", {"argument": "name"})
        self._identities.remove_client(name)  # its sessions end now
        self._remove_client_policies(name)
        return {"name": name, "removed": True}

    async def nucleus_status(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        return self._status()
