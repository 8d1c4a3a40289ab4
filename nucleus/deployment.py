"""Deployments: one at a time, every stage written ahead, rolled back when they fail.

A deployment moves through the stages of :class:`nucleus.journal.Stage`. Until APPLYING
nothing running is touched, so a failure there is FAILED_NO_STATE_CHANGE. From APPLYING on,
the journal holds a snapshot of the previous active set and every component's
configuration; the committed active set changes only in the transaction that finishes the
deployment. That gives crash safety for free: after ``kill -9`` the daemon restores the
snapshot and starts the committed (old) set, unless the deployment was waiting for a
bootstrap-requested restart, in which case it resumes with the new set.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nucleus import run_with as runwith
from nucleus.config_store import ConfigStore, apply_update
from nucleus.config_validation import ConfigValidators
from nucleus.errors import ConfigurationError, DeploymentError, NucleusError, UnknownComponentError, VersionError
from nucleus.journal import ActiveSet, DeploymentRecord, DeploymentStatus, Journal, Stage
from nucleus.orchestrator import Orchestrator, truthy
from nucleus.recipe import Recipe, parse_recipe
from nucleus.resolver import dependency_order, resolve
from nucleus.settings import Settings
from nucleus.states import State
from nucleus.store import ComponentStore
from nucleus.update_policy import UpdateNotifier
from nucleus.versions import Version

log = structlog.get_logger("nucleus.deployment")

LOCAL_GROUP = "LOCAL_DEPLOYMENT"
RESTART_NUCLEUS = 100
REQUEST_REBOOT = 101


class RecipeSource(BaseModel):
    """A recipe as the client read it: text plus the file it came from, for error messages."""

    model_config = ConfigDict(extra="forbid")
    source: str
    text: str
    format: Literal["yaml", "json"] | None = None


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reset: list[str] = Field(default_factory=list)
    merge: dict[str, Any] = Field(default_factory=dict)


class DeploymentRequest(BaseModel):
    """What ``nucleus deploy`` (or a fleet document) asks for."""

    model_config = ConfigDict(extra="forbid")

    group: str = LOCAL_GROUP
    recipes: list[RecipeSource] = Field(default_factory=list)
    root_components: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)
    artifact_dirs: list[str] = Field(default_factory=list)
    config_updates: dict[str, ConfigUpdate] = Field(default_factory=dict)
    # Greengrass's per-component runWith; kept by later deployments until one changes it (run_with.py)
    run_with: dict[str, runwith.ComponentRunWith] = Field(default_factory=dict)
    failure_policy: Literal["ROLLBACK", "DO_NOTHING"] = "ROLLBACK"
    timeout_s: float | None = Field(None, gt=0)
    settle_time_s: float | None = Field(None, ge=0)
    update_policy: Literal["NOTIFY_COMPONENTS", "SKIP_NOTIFY_COMPONENTS"] = "NOTIFY_COMPONENTS"
    update_policy_timeout_s: float = Field(60.0, ge=0)
    deployment_id: str | None = None


@dataclass(slots=True)
class _Plan:
    """What a deployment will do, computed before anything running is touched."""

    target: ActiveSet
    changed: list[str]  # new, new version, or a configuration change that alters the lifecycle
    removed: list[str]
    restart: list[str]  # untouched themselves, but HARD-depend on something changed or removed
    recipes: dict[str, Recipe]
    configs: dict[str, dict[str, Any]]  # the new configuration documents to write
    # roots this deployment removed that stay because other components still depend on them
    kept: dict[str, list[str]] = field(default_factory=dict)

    def journal_form(self) -> dict[str, Any]:
        return {"active": self.target.to_json(), "changed": self.changed, "removed": self.removed,
                "restart": self.restart}


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RestartRequested(Exception):
    pass


ProgressListener = Callable[[str, dict[str, Any]], None]


# Greengrass's default configurationValidationPolicy.timeoutInSeconds; silence counts as accepting.
CONFIG_VALIDATION_TIMEOUT_S = 20.0


class DeploymentEngine:
    def __init__(  # noqa: PLR0917 - the composition root passes its parts in order
        self,
        settings: Settings,
        journal: Journal,
        store: ComponentStore,
        config: ConfigStore,
        orchestrator: Orchestrator,
        notifier: UpdateNotifier,
        *,
        platform: Mapping[str, str],
        apply_policies: Callable[[str, Mapping[str, Any] | None], None],
        request_restart: Callable[[], None] | None = None,
        declare_client: Callable[[str], bool] | None = None,
        undeclare_client: Callable[[str], None] | None = None,
        validators: ConfigValidators | None = None,
    ) -> None:
        self._settings = settings
        self._validators = validators
        self._journal = journal
        self._store = store
        self._config = config
        self._orch = orchestrator
        self._notifier = notifier
        self._platform = dict(platform)
        self._apply_policies = apply_policies
        self._request_restart = request_restart
        self._declare_client = declare_client
        self._undeclare_client = undeclare_client
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._current: str | None = None
        # stored recipes the current deployment replaced under the same version: {name@version: document}
        self._replaced: dict[str, dict[str, Any]] = {}
        # their artifact folders, set aside before the new ones were fetched: [(live, backup)]
        self._set_aside: list[tuple[str, str]] = []
        self._listeners: list[ProgressListener] = []

    # --- public API -----------------------------------------------------------------------
    def add_listener(self, listener: ProgressListener) -> None:
        """Called with (deployment_id, summary) on every status change (cloud status reports)."""
        self._listeners.append(listener)

    @property
    def current(self) -> str | None:
        return self._current

    def submit(self, request: Mapping[str, Any]) -> DeploymentRecord:
        """Validate the request's shape and queue it; the recipes are parsed when it runs."""
        try:
            req = DeploymentRequest.model_validate(request)
        except ValidationError as exc:
            raise DeploymentError(f"invalid deployment request: {_pydantic_reason(exc)}") from exc
        # Parse recipes now too, so that the CLI gets file/field errors before queueing.
        for src in req.recipes:
            parse_recipe(src.text, source=src.source, fmt=src.format)
        # runWith this device cannot honour (an unknown user, limits without cgroups): refused now, queued
        # never; checked again when it runs, with what earlier deployments set.
        for name, update in req.run_with.items():
            runwith.check(name, runwith.merged(None, update), self._settings, self._orch.cgroups)
        deployment_id = req.deployment_id or str(uuid.uuid4())
        if self._journal.get(deployment_id) is not None:
            raise DeploymentError(f"deployment {deployment_id} already exists")
        record = self._journal.enqueue(deployment_id, req.group, req.model_dump(mode="json"))
        self._journal.add_event(deployment_id, "queued")
        log.info("deployment.queued", deployment_id=deployment_id, group=req.group)
        self._wake.set()
        return record

    def position(self, deployment_id: str) -> int:
        """0 = running now; n = n deployments ahead of it."""
        if self._current == deployment_id:
            return 0
        ids = [r.id for r in self._journal.queued()]
        ahead = ids.index(deployment_id) if deployment_id in ids else 0
        return ahead + (1 if self._current else 0)

    async def watch(self, deployment_id: str) -> AsyncIterator[dict[str, Any]]:
        """Progress events of one deployment, then its final summary."""
        if self._journal.get(deployment_id) is None:
            raise UnknownComponentError(f"no deployment {deployment_id}")
        seq = 0
        while True:
            for event in await asyncio.to_thread(self._journal.events, deployment_id, seq):
                seq = event["seq"]
                yield {"event": "progress", **event}
            record = self._journal.get(deployment_id)
            assert record is not None
            if record.status.finished:
                yield {"event": "finished", **record.summary()}
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=1.0)

    # --- the worker -----------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """After a (possibly unclean) start: settle interrupted deployments, start the set.

        Returns the ids of deployments to resume (bootstrap-requested restarts).
        """
        resume: list[str] = []
        for record in self._journal.in_progress():
            if record.stage is Stage.AWAITING_RESTART:
                resume.append(record.id)
                continue
            if record.previous is None:
                # Interrupted before anything was touched: run it again from the queue.
                self._journal.update(record.id, stage=Stage.QUEUED, status=DeploymentStatus.QUEUED)
                self._journal.add_event(record.id, "nucleus restarted before changes; re-queued")
                continue
            self._restore_recipes(record.previous.get("recipes", {}))
            _restore_artifacts(record.previous.get("artifacts", []))
            self._config.restore(record.previous.get("configs", {}))
            reason = f"nucleus restarted during stage {record.stage}; previous components restored"
            self._journal.finish(record.id, DeploymentStatus.FAILED_ROLLBACK_COMPLETE, reason=reason)
            self._journal.add_event(record.id, reason)
            log.warning("deployment.recovered", deployment_id=record.id, stage=str(record.stage))
        active = self._journal.active()
        if resume:
            resumed = self._journal.get(resume[0])
            assert resumed is not None and resumed.target is not None
            active = ActiveSet.from_json(resumed.target["active"])
        recipes = self._recipes_for(active, skip_unreadable=True)
        for name, recipe in recipes.items():
            self._apply_policies(name, self._config_or_none(name) or recipe.default_configuration)
        self._orch.set_run_with(active.run_with)
        # One component that cannot be made ready (a Timeout whose configuration reads "abc", left
        # deployed by a failed deployment without rollback) stopped the engine, and so `nucleus run`,
        # at every start. It is left out, with what it needs HARD, and said; the rest starts.
        left_out: dict[str, str] = {}
        for name in dependency_order(recipes):
            missing = [d for d, spec in recipes[name].dependencies.items()
                       if spec.type == "HARD" and (d in left_out or d not in recipes)]
            why = f"{name}: its HARD dependency {missing[0]} was not started" if missing else ""
            if not missing:
                try:
                    self._orch.load({name: recipes[name]})
                except NucleusError as exc:
                    why = str(exc)
            if why:
                left_out[name] = why
                log.error("component.not_started", component=name, error=why)
        await self._orch.install_and_start([n for n in recipes if n not in left_out])
        return resume

    async def run(self) -> None:
        """Process the queue forever, one deployment at a time."""
        resume = await self.recover()
        for deployment_id in resume:
            await self._execute(deployment_id, resumed=True)
        while True:
            queued = self._journal.queued()
            if not queued:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._execute(queued[0].id)

    # --- one deployment -------------------------------------------------------------------
    def _progress(self, deployment_id: str, message: str, component: str | None = None) -> None:
        self._journal.add_event(deployment_id, message, component)
        log.info("deployment.progress", deployment_id=deployment_id, component=component, message=message)
        asyncio.get_running_loop().create_task(self._notify_watchers())

    async def _notify_watchers(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _emit(self, deployment_id: str) -> None:
        record = self._journal.get(deployment_id)
        if record is None:
            return
        for listener in self._listeners:
            try:
                listener(deployment_id, record.summary())
            except Exception:
                log.exception("deployment.listener_failed", deployment_id=deployment_id)

    def _config_or_none(self, name: str) -> dict[str, Any] | None:
        return self._config.document(name) if name in self._config.components() else None

    def _recipes_for(self, active: ActiveSet, *, skip_unreadable: bool = False) -> dict[str, Recipe]:
        recipes: dict[str, Recipe] = {}
        for name, version in active.components.items():
            versions = {str(v): v for v in self._store.versions(name)}
            if version not in versions:
                log.error("deployment.recipe_missing", component=name, version=version)
                continue
            try:
                recipes[name] = self._store.recipe(name, versions[version])
            except NucleusError as exc:  # a damaged stored recipe at start: this component, not the whole engine
                if not skip_unreadable:
                    raise
                log.error("deployment.recipe_unreadable", component=name, version=version,  # noqa: TRY400
                          error=str(exc))  # the file and what is wrong with it say it all; no traceback
        return recipes

    async def _execute(self, deployment_id: str, *, resumed: bool = False) -> None:
        record = self._journal.get(deployment_id)
        if record is None:
            return
        self._current = deployment_id
        req = DeploymentRequest.model_validate(record.request)
        timeout = req.timeout_s or self._settings.deployments.default_timeout_s
        deadline = time.monotonic() + timeout
        self._journal.update(deployment_id, status=DeploymentStatus.IN_PROGRESS)
        self._emit(deployment_id)
        log.info("deployment.started", deployment_id=deployment_id, group=req.group, resumed=resumed)
        try:
            async with asyncio.timeout(timeout + 5.0):
                await self._apply(record, req, deadline, resumed=resumed)
        except _RestartRequested:
            return
        except TimeoutError:
            await self._fail(deployment_id, req, f"deployment timed out after {timeout:g}s")
        except Exception as exc:
            log.exception("deployment.crashed", deployment_id=deployment_id)
            await self._fail(deployment_id, req, f"internal error: {exc}")
        finally:
            self._current = None
            self._emit(deployment_id)
            await self._notify_watchers()
        # A failed deployment's versions (fetched, never kept) go as a success's old ones do: a device
        # that is sent failing versions and never a good one filled its disk with their artifacts.
        done = self._journal.get(deployment_id)
        if done is not None and done.status in _CLEANED_AFTER_FAILURE:
            await self._cleanup(self._journal.active())

    async def _apply(
        self, record: DeploymentRecord, req: DeploymentRequest, deadline: float, *, resumed: bool
    ) -> None:
        did = record.id
        previous = self._journal.active()
        if resumed:
            assert record.target is not None
            target = ActiveSet.from_json(record.target["active"])
            changed = list(record.target["changed"])
            restart = list(record.target.get("restart", []))
            self._progress(did, "nucleus restarted as bootstrap requested; continuing")
            await self._start_and_settle(did, req, target, changed, restart=restart, deadline=deadline)
            return

        # RESOLVING ------------------------------------------------------------------------
        self._replaced = {}
        self._set_aside = []
        self._journal.update(did, stage=Stage.RESOLVING)
        try:
            plan = self._resolve(req, previous)
        except NucleusError as exc:
            self._finish_no_change(did, str(exc))
            return

        # PREPARING: fetch + verify artifacts; nothing running is touched -----------------
        target, changed, removed, recipes = plan.target, plan.changed, plan.removed, plan.recipes
        self._journal.update(did, stage=Stage.PREPARING)
        for name in changed:
            recipe = recipes[name]
            manifest = recipe.select(self._platform)
            if manifest is None:
                self._finish_no_change(did, _no_manifest(recipe, self._platform))
                return
            if (previous.components.get(name) == str(recipe.version) and self._orch.get(name) is not None
                    and f"{name}@{recipe.version}" not in self._replaced
                    and self._store.has_artifacts(recipe, self._platform)):
                # Same version, same recipe: it restarts for a new configuration (its own, or a
                # dependency's); its artifacts are in place. Fetching them again failed a plain
                # --update-config for an artifact that came from an --artifacts directory.
                continue
            if manifest.artifacts:
                self._progress(did, f"fetching {len(manifest.artifacts)} artifact(s)", name)
            try:
                if f"{name}@{recipe.version}" in self._replaced:
                    self._set_aside_artifacts(name, str(recipe.version))
                await self._store.prepare(
                    recipe, manifest.artifacts, artifact_dirs=[Path(d) for d in req.artifact_dirs]
                )
            except NucleusError as exc:
                self._finish_no_change(did, str(exc))
                return
        for name, users in plan.kept.items():
            self._progress(did, f"{name} is no longer a root component of group {req.group} but stays: "
                           f"needed by {', '.join(users)}")
        if not changed and not removed and not req.config_updates and target.run_with == previous.run_with:
            self._journal.finish(
                did, DeploymentStatus.SUCCEEDED, reason="nothing to change", active=target,
                components=self._component_report(target, []),
            )
            self._progress(did, "nothing to change")
            return

        # VALIDATING: running components that subscribed check their new configuration first ----
        if self._validators is not None:
            proposals = {n: doc for n, doc in plan.configs.items()
                         if n not in changed and self._orch.state(n) in (State.RUNNING, State.STARTING)
                         and doc != self._config_or_none(n)}
            if proposals.keys() & self._validators.subscribed():
                self._progress(did, f"validating the new configuration of {', '.join(sorted(proposals))}")
                answers = await self._validators.ask(did, proposals, timeout_s=CONFIG_VALIDATION_TIMEOUT_S)
                refused = {n: why for n, (verdict, why) in sorted(answers.items()) if verdict == "REJECTED"}
                if refused:
                    self._finish_no_change(did, "; ".join(f"{n} rejected its new configuration: {why or 'no reason'}"
                                                          for n, why in refused.items()))
                    return

        # NOTIFYING ------------------------------------------------------------------------
        affected = [n for n in [*changed, *removed] if self._orch.state(n) in (State.RUNNING, State.STARTING)]
        if req.update_policy == "NOTIFY_COMPONENTS" and affected:
            self._journal.update(did, stage=Stage.NOTIFYING)
            await self._notifier.ask(
                did, affected, timeout_s=req.update_policy_timeout_s, deadline=deadline,
                progress=lambda m: self._progress(did, m),
            )

        # APPLYING: write ahead the snapshot, then touch things --------------------------
        snapshot = {"active": previous.to_json(), "configs": self._config.snapshot(), "recipes": dict(self._replaced),
                    "artifacts": list(self._set_aside)}
        self._journal.update(
            did,
            stage=Stage.APPLYING,
            previous=snapshot,
            target=plan.journal_form(),
        )
        try:
            stop = [n for n in [*removed, *changed] if self._orch.get(n) is not None]
            if stop:
                also = f" (and HARD dependents {', '.join(plan.restart)})" if plan.restart else ""
                self._progress(did, f"stopping {', '.join(stop)}{also}")
                await self._orch.remove(stop, reason=f"deployment {did}")
            # only now: what stops, stops as it ran (its Shutdown as the old user, in the old limits)
            self._orch.set_run_with(target.run_with)
            for name in removed:
                self._config.remove(name)
                self._apply_policies(name, None)
                if self._undeclare_client is not None:
                    self._undeclare_client(name)
            for name, doc in plan.configs.items():
                self._config.set_document(name, doc)
                self._apply_policies(name, doc)
            await self._bootstrap(did, recipes, changed)
        except _Failed as exc:
            await self._fail(did, req, exc.reason)
            return
        await self._start_and_settle(did, req, target, changed, restart=plan.restart, deadline=deadline)

    def _resolve(self, req: DeploymentRequest, previous: ActiveSet) -> _Plan:
        # Which version to try first for each component: the highest this deployment brings (its
        # files, --recipe-dir, a fleet document's recipes: what the operator sent), else the one
        # deployed now. Never whatever else lies in the store, such as a version an earlier,
        # rolled-back deployment left there (see nucleus.resolver).
        prefer: dict[str, Version] = {}
        for name, version in previous.components.items():
            with contextlib.suppress(VersionError):
                prefer[name] = Version.parse(version)
        offered: dict[str, Version] = {}
        for src in req.recipes:
            recipe = parse_recipe(src.text, source=src.source, fmt=src.format)
            offered[recipe.name] = max(recipe.version, offered.get(recipe.name, recipe.version))
            key = f"{recipe.name}@{recipe.version}"
            if recipe.version in self._store.versions(recipe.name) and key not in self._replaced:
                old = self._store.recipe(recipe.name, recipe.version).to_document()
                if old != recipe.to_document():  # the same version, edited: a failure must put it back
                    self._replaced[key] = old
            self._store.add_recipe(recipe)
        groups = {g: dict(roots) for g, roots in previous.groups.items()}
        roots = groups.setdefault(req.group, {})
        roots.update(req.root_components)
        for name in req.remove:
            if name not in roots:
                where = [g for g, r in groups.items() if name in r]
                users = self._users_of(name, previous)
                hint = (f" (it belongs to group {where[0]})" if where
                        else f" (it runs as a dependency of {', '.join(users)})" if users else "")
                raise UnknownComponentError(
                    f"cannot remove {name}: not a root component of group {req.group}{hint}", component=name
                )
            del roots[name]
        groups = {g: r for g, r in groups.items() if r}
        resolution = resolve(groups, self._store, prefer={**prefer, **offered})
        components = {n: str(r.version) for n, r in resolution.components.items()}
        for name, what in ([(n, "configuration update") for n in req.config_updates]
                           + [(n, "runWith") for n in req.run_with]):
            if name not in components:
                # Most often a typo: name what is there, and the nearest name if one is close.
                close = difflib.get_close_matches(name, list(components), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UnknownComponentError(
                    f"{what} for {name}, which is neither deployed nor in this deployment ({hint}"
                    f"the components after it would be: {', '.join(sorted(components)) or 'none'})",
                    component=name,
                )
        # runWith sticks to a component (removed components lose it); this deployment's fields replace
        stored = {n: rw for n, rw in previous.run_with.items() if n in components}
        for name, update in req.run_with.items():
            stored[name] = runwith.merged(stored.get(name), update)
        stored = {n: rw for n, rw in stored.items() if rw}
        for name in components:
            runwith.check(name, stored.get(name), self._settings, self._orch.cgroups)
        target = ActiveSet(groups=groups, components=components, run_with=stored)
        recipes = dict(resolution.components)
        changed = [
            n for n in resolution.order
            if previous.components.get(n) != target.components[n] or self._orch.get(n) is None
            or self._orch.recipes()[n].to_document() != recipes[n].to_document()
            # another user or other limits: its processes start again under them
            or previous.run_with.get(n) != target.run_with.get(n)
        ]
        removed = [n for n in previous.components if n not in target.components]
        configs = {name: self._new_config(req, recipes[name]) for name in {*changed, *req.config_updates}}
        # A configuration change that alters the resolved lifecycle (a script using
        # {configuration:/x}, or {Dep:configuration:/x} / {Dep:artifacts:path} of a dependency this
        # deployment reconfigures or replaces) needs a restart to take effect, as in Greengrass.
        planned = {n: (target.components[n], doc) for n, doc in configs.items()}
        for name in resolution.order:
            entry = self._orch.get(name)
            if name in changed or entry is None or not ({name, *recipes[name].dependencies} & planned.keys()):
                continue
            if self._orch.lifecycle_of(recipes[name], configs.get(name), planned=planned) != entry.lifecycle:
                changed.append(name)
        # A BROKEN component this deployment names (a root component of the request, or one whose
        # configuration it updates) starts afresh, as a Greengrass deployment takes a component out of
        # BROKEN: the deployment is the operator's fix, and settling then says whether it worked.
        # Left alone, a configuration-only deployment said SUCCEEDED over a component still BROKEN.
        for name in resolution.order:
            if name not in changed and (name in req.root_components or name in req.config_updates) \
                    and self._orch.state(name) is State.BROKEN:
                changed.append(name)
        restart = sorted(
            n for n in self._orch.hard_dependents_closure([*changed, *removed])
            if n in target.components and n not in changed
        )
        kept = {n: [*(f"{u} {recipes[u].version}" for u in resolution.order if n in recipes[u].dependencies),
                    *(f"group {g}" for g, r in sorted(groups.items()) if n in r)]
                for n in req.remove if n in target.components}
        return _Plan(target, changed, removed, restart, recipes, configs, kept)

    def _users_of(self, name: str, active: ActiveSet) -> list[str]:
        """Deployed components whose recipes depend on ``name``, as "A 1.0.0"."""
        recipes = self._recipes_for(active)
        return [f"{u} {r.version}" for u, r in sorted(recipes.items()) if name in r.dependencies]

    def _new_config(self, req: DeploymentRequest, recipe: Recipe) -> dict[str, Any]:
        defaults = recipe.default_configuration
        current = self._config_or_none(recipe.name)
        # A new version keeps what was customised and gains the new defaults' keys.
        base = apply_update(defaults, defaults, merge=current) if current is not None else dict(defaults)
        update = req.config_updates.get(recipe.name)
        if update is not None:
            try:
                base = apply_update(base, defaults, reset=update.reset, merge=update.merge)
            except ConfigurationError as exc:  # which component's update, not just which entry
                raise ConfigurationError(exc.message, component=recipe.name, field=exc.field) from exc
        return base

    async def _bootstrap(self, did: str, recipes: Mapping[str, Recipe], changed: list[str]) -> None:
        restart = False
        for name in changed:
            recipe = recipes[name]
            manifest = recipe.select(self._platform)
            if manifest is None or "bootstrap" not in manifest.lifecycle.steps:
                continue  # not resolved here: a dependency deployed alongside has no entry yet (false warnings)
            step = self._orch.lifecycle_of(recipe).steps.get("bootstrap")
            if step is None or not step.script.strip():
                continue
            self._orch.load({name: recipe})
            built = self._orch.step_env(name)
            assert built is not None
            spec, _ = built
            self._progress(did, "running bootstrap", name)
            oom_before = self._orch.oom_kills(name)
            clog = self._orch.get(name).log  # type: ignore[union-attr]
            timeout = float(step.timeout) if isinstance(step.timeout, int | float) else 120.0
            clog.write("step bootstrap starting", stream="nucleus", step="bootstrap")  # as the other steps say
            result = await self._orch.supervisor.run_step(
                name, "bootstrap", step.script,
                {**spec.env, **{k: str(v) for k, v in step.setenv.items()}},
                spec.work_dir, timeout, log_sink=clog, requires_privilege=truthy(step.requires_privilege),
            )
            code = result.exit_code
            clog.write(f"step bootstrap timed out after {timeout:g} s" if result.timed_out
                       else f"step bootstrap exited with code {code}", stream="nucleus", step="bootstrap")
            if result.timed_out:
                raise _Failed(f"{name}: bootstrap timed out")
            if code == RESTART_NUCLEUS:
                restart = True
            elif code == REQUEST_REBOOT:
                if self._settings.deployments.allow_reboot:
                    restart = True
                    self._progress(did, "bootstrap requested a reboot (allowed by settings)", name)
                else:
                    self._progress(
                        did, "bootstrap requested a reboot; not executed (deployments.allow_reboot is false)", name
                    )
            elif code != 0:
                why = self._orch.memory_limit_hit(name, oom_before, code)  # its systemResourceLimits, named
                raise _Failed(f"{name}: bootstrap exited with {code}{f' ({why})' if why else ''}")
        if restart:
            self._journal.update(did, stage=Stage.AWAITING_RESTART)
            self._progress(did, "bootstrap requested a nucleus restart")
            if self._request_restart is not None:
                self._request_restart()
                raise _RestartRequested()

    async def _start_and_settle(
        self, did: str, req: DeploymentRequest, target: ActiveSet, changed: list[str], *, restart: list[str],
        deadline: float,
    ) -> None:
        self._journal.update(did, stage=Stage.STARTING)
        recipes = self._recipes_for(target)
        self._orch.set_run_with(target.run_with)
        try:
            self._orch.load({n: recipes[n] for n in changed})
        except NucleusError as exc:
            await self._fail(did, req, str(exc))
            return
        if changed:
            self._progress(did, f"starting {', '.join(changed)}")
        if restart:
            self._progress(did, f"restarting HARD dependents {', '.join(restart)}")
        start = asyncio.create_task(self._orch.install_and_start([*changed, *restart]))
        self._journal.update(did, stage=Stage.SETTLING)
        settle = req.settle_time_s if req.settle_time_s is not None else self._settings.deployments.settle_time_s
        ok, reason = await self._orch.wait_settled([*changed, *restart], settle_s=settle, deadline=deadline)
        if not start.done():
            start.cancel()
        try:
            await start
        except (asyncio.CancelledError, Exception) as exc:  # start failures show up as states
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("deployment.start_error", deployment_id=did, error=str(exc))
        if not ok:
            await self._fail(did, req, reason)
            return
        report = self._component_report(target, changed)
        for name in changed:
            # A recipe with no lifecycle declares a local application: it gets a client token
            # (stored owner-only under clients/; never in the journal) and its accessControl.
            entry = self._orch.get(name)
            if entry is not None and not entry.runner.spec.steps and self._declare_client is not None:
                report[name]["client_token_created"] = self._declare_client(name)
                report[name]["client"] = True
        self._journal.finish(did, DeploymentStatus.SUCCEEDED, active=target, components=report)
        self._progress(did, "succeeded")
        self._notifier.post_update(did, changed)
        for _live, backup in self._set_aside:
            _remove_tree(Path(backup))
        self._set_aside = []
        await self._cleanup(target)

    async def _cleanup(self, target: ActiveSet) -> None:
        keep = {(n, v) for n, v in target.components.items()}
        # Keep the versions a rollback of recent deployments needs.
        # Only deployments that changed the set count: a rolled-back one's "previous" is what runs now.
        recent = [r for r in self._journal.recent(limit=20) if r.previous and r.status in _CHANGED_THE_SET]
        for record in recent[: self._settings.deployments.keep_versions]:
            prev = ActiveSet.from_json(record.previous["active"]) if record.previous else ActiveSet()
            keep.update(prev.components.items())
        try:
            removed = await asyncio.to_thread(self._store.remove_unused, keep)
        except OSError as exc:
            log.warning("store.cleanup_failed", error=str(exc))
            return
        if removed:
            log.info("store.removed_unused", components=[f"{n}@{v}" for n, v in removed])

    def _component_report(self, target: ActiveSet, changed: list[str]) -> dict[str, dict[str, Any]]:
        """Per component: version, state, whether this deployment changed it."""
        return {
            n: {"version": v, "state": str(self._orch.state(n) or "NEW"), "changed": n in changed}
            for n, v in target.components.items()
        }

    def _restore_recipes(self, replaced: Mapping[str, Any]) -> None:
        """Put back the stored recipes a failed deployment replaced under the same version, so what
        runs (and what a restart or a rollback loads) is the recipe that was deployed before."""
        for key, document in replaced.items():
            try:
                self._store.add_recipe(parse_recipe(json.dumps(document), source=f"(restored {key})", fmt="json"))
            except NucleusError as exc:
                log.error("deployment.recipe_not_restored", recipe=key, error=str(exc))  # noqa: TRY400

    def _set_aside_artifacts(self, name: str, version: str) -> None:
        """Move the artifact folders of a deployed version aside before an edited recipe of the same
        version fetches its own into the same place, so that a failure can put them back: without
        this, a rollback restored the old recipe over the new artifacts and the old component ran
        the new (failing) code."""
        for live in (self._store.artifacts_path(name, version), self._store.decompressed_path(name, version)):
            if not live.exists():
                continue
            backup = live.with_name(f".{live.name}.rollback")
            _remove_tree(backup)
            live.rename(backup)
            self._set_aside.append((str(live), str(backup)))

    def _finish_no_change(self, did: str, reason: str) -> None:
        self._restore_recipes(self._replaced)
        self._replaced = {}
        _restore_artifacts(self._set_aside)
        self._set_aside = []
        self._journal.finish(did, DeploymentStatus.FAILED_NO_STATE_CHANGE, reason=reason)
        self._progress(did, f"failed, nothing changed: {reason}")
        log.warning("deployment.failed", deployment_id=did, status="FAILED_NO_STATE_CHANGE", reason=reason)

    async def _fail(self, did: str, req: DeploymentRequest, reason: str) -> None:
        record = self._journal.get(did)
        assert record is not None
        if record.previous is None:
            self._finish_no_change(did, reason)
            return
        target = ActiveSet.from_json(record.target["active"]) if record.target else ActiveSet()
        if req.failure_policy == "DO_NOTHING":
            self._journal.finish(
                did, DeploymentStatus.FAILED_ROLLBACK_NOT_REQUESTED, reason=reason, active=target,
                components=self._component_report(target, list(record.target["changed"]) if record.target else []),
            )
            self._progress(did, f"failed (rollback not requested): {reason}")
            return
        self._journal.update(did, stage=Stage.ROLLING_BACK, reason=reason)
        self._progress(did, f"failed: {reason}; rolling back")
        log.warning("deployment.rolling_back", deployment_id=did, reason=reason)
        previous = ActiveSet.from_json(record.previous["active"])
        changed = list(record.target["changed"]) if record.target else []
        removed = list(record.target["removed"]) if record.target else []
        collateral = list(record.target.get("restart", [])) if record.target else []
        try:
            undo = [n for n in changed if self._orch.get(n) is not None]
            await self._orch.remove(undo, reason=f"rollback of {did}")
            self._restore_recipes(record.previous.get("recipes", {}))
            _restore_artifacts(record.previous.get("artifacts", []))
            self._set_aside = []
            self._config.restore(record.previous.get("configs", {}))
            for name in changed:
                if name not in previous.components:
                    self._apply_policies(name, None)
            recipes = self._recipes_for(previous)
            self._orch.set_run_with(previous.run_with)
            back = [n for n in recipes if n in changed or n in removed or n in collateral]
            for name in back:
                self._apply_policies(name, self._config_or_none(name))
            self._orch.load({n: recipes[n] for n in back})
            start = asyncio.create_task(self._orch.install_and_start(back))
            ok, why = await self._orch.wait_settled(
                back, settle_s=0.0, deadline=time.monotonic() + self._settings.deployments.default_timeout_s
            )
            await asyncio.gather(start, return_exceptions=True)
        except Exception as exc:
            ok, why = False, str(exc)
        if ok:
            status = DeploymentStatus.FAILED_ROLLBACK_COMPLETE
            self._progress(did, f"rolled back: {reason}")
        else:
            status = DeploymentStatus.FAILED_ROLLBACK_FAILED
            reason = f"{reason}; rollback failed: {why}"
            self._progress(did, f"rollback failed: {why}")
        self._journal.finish(did, status, reason=reason, active=previous,
                             components=self._component_report(previous, []))
        log.warning("deployment.failed", deployment_id=did, status=str(status), reason=reason)


_CLEANED_AFTER_FAILURE = frozenset({DeploymentStatus.FAILED_NO_STATE_CHANGE, DeploymentStatus.FAILED_ROLLBACK_COMPLETE,
                                    DeploymentStatus.FAILED_ROLLBACK_NOT_REQUESTED})
_CHANGED_THE_SET = frozenset({DeploymentStatus.SUCCEEDED, DeploymentStatus.FAILED_ROLLBACK_NOT_REQUESTED})


def _remove_tree(path: Path) -> None:
    """rmtree that copes with the read-only folders and files artifacts are stored as."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return

    def on_error(func: Callable[[str], object], failed: str, _exc: object) -> None:
        Path(failed).parent.chmod(0o755)
        func(failed)

    shutil.rmtree(path, onerror=on_error)


def _restore_artifacts(moved: list[Any]) -> None:
    """Put artifact folders set aside by ``_set_aside_artifacts`` back in place of the new ones."""
    for live, backup in moved:
        if not Path(backup).exists():
            continue  # already restored (a crash after the rename) or removed after success
        try:
            _remove_tree(Path(live))
            Path(backup).rename(live)
        except OSError as exc:
            log.error("deployment.artifacts_not_restored", folder=live, error=str(exc))  # noqa: TRY400


def _no_manifest(recipe: Recipe, platform: Mapping[str, str]) -> str:
    """Why a recipe cannot run here: this device's platform next to what each manifest asks for."""
    device = ", ".join(f"{k}={v}" for k, v in sorted(platform.items()))
    wanted = "; ".join(
        ", ".join(f"{k}={v}" for k, v in (m.platform or {}).items()) or "any" for m in recipe.manifests
    )
    return (f"{recipe.name} {recipe.version}: no manifest matches this platform ({device}); "
            f"the recipe's manifests are for: {wanted or 'none'}")


def _pydantic_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
