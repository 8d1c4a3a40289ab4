"""Runs the set of components: builds each one's runner, orders starts and stops by
dependencies, and restarts HARD dependents when a dependency restarts.

The lifecycle of one component belongs to :class:`nucleus.runner.ComponentRunner`; this
module owns only what spans components. Starts are concurrent: each component waits only
for its own HARD dependencies to be RUNNING or FINISHED, so ten independent components come
up in parallel. Stops go in reverse dependency order, one level at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nucleus import run_with as run_with_mod
from nucleus.artifacts import share_with_group
from nucleus.cgroups import Cgroups, cpus_note
from nucleus.clock import Clock, SystemClock
from nucleus.component_logs import ComponentLog
from nucleus.config_store import ConfigStore
from nucleus.errors import LifecycleError, NucleusError, RecipeError
from nucleus.identity import Identities
from nucleus.interpolation import ComponentContext, InterpolationContext, interpolate_lifecycle
from nucleus.lifecycle import DEFAULT_TIMEOUTS
from nucleus.paths import Paths
from nucleus.recipe import Lifecycle, Recipe
from nucleus.resolver import dependency_order
from nucleus.runner import ComponentRunner, ComponentSpec, StepSpec
from nucleus.settings import Settings
from nucleus.states import State
from nucleus.store import ComponentStore
from nucleus.supervisor import Placement, Supervisor
from nucleus.users import ComponentUser, give_work_folder, user_name

log = structlog.get_logger("nucleus.orchestrator")

RUNNER_STEPS = ("install", "startup", "run", "shutdown", "recover")
SETTLED = frozenset({State.RUNNING, State.FINISHED})
STARTABLE_DEP_STATES = frozenset({State.RUNNING, State.FINISHED, State.BROKEN})

# Environment a component must not inherit from the nucleus process.
_PRIVATE_ENV = ("NUCLEUS_IPC_TOKEN", "SVCUID")


@dataclass(slots=True)
class Entry:
    recipe: Recipe
    runner: ComponentRunner
    lifecycle: Lifecycle
    log: ComponentLog
    sessions: deque[int] = field(default_factory=lambda: deque(maxlen=128))


def truthy(value: object) -> bool:
    """A recipe's ``RequiresPrivilege`` after interpolation (a bool, or text such as "true")."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"true", "yes", "1"}


def _timeout(value: float | str | None, step: str, component: str) -> float | None:
    if value is None or value == "":
        return DEFAULT_TIMEOUTS.get(step)
    try:
        seconds = float(value)
    except (TypeError, ValueError) as exc:
        raise RecipeError(
            f"Timeout {value!r} is not a number", component=component, field=f"Lifecycle.{step}.Timeout"
        ) from exc
    return seconds if seconds > 0 else DEFAULT_TIMEOUTS.get(step)


class Orchestrator:
    def __init__(
        self,
        settings: Settings,
        store: ComponentStore,
        config: ConfigStore,
        identities: Identities,
        *,
        platform: Mapping[str, str],
        clock: Clock | None = None,
        on_state: Callable[[str, State, State, str], None] | None = None,
        on_spawn: Callable[[str, int, int], None] | None = None,
        on_exit: Callable[[str, int, int], None] | None = None,
        on_removed: Callable[[str], Awaitable[None]] | None = None,
        python_bin: Path | None = None,
        component_user: ComponentUser | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        self._settings = settings
        self._component_user = component_user  # run_with_default: who steps run as (a root daemon)
        self.cgroups = cgroups or Cgroups()
        # per component, what deployments set in runWith (nucleus.run_with); see set_run_with
        self._run_with: dict[str, dict[str, Any]] = {}
        self._users: dict[str, ComponentUser | None] = {}
        self._oom_total: dict[str, int] = {}  # processes the kernel killed at a memory limit, per component
        self._python_bin = python_bin  # components' own Python (nucleus.component_python), first on PATH
        self._paths: Paths = settings.paths
        self._store = store
        self._config = config
        self._identities = identities
        self._platform = dict(platform)
        self._clock = clock or SystemClock()
        self._on_state_listener = on_state
        self._on_spawn_listener = on_spawn
        self._on_removed = on_removed
        self._entries: dict[str, Entry] = {}
        self._supervisor = Supervisor(stop_grace_s=settings.stop_grace_s, on_spawn=self._spawned, on_exit=on_exit,
                                      run_as=component_user, placement=self.placement)
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping_on_purpose: set[str] = set()
        identities.set_pid_lookup(self.sessions_of)

    # --- queries ---------------------------------------------------------------------------
    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def recipes(self) -> dict[str, Recipe]:
        return {n: e.recipe for n, e in self._entries.items()}

    def state(self, name: str) -> State | None:
        entry = self._entries.get(name)
        return entry.runner.state if entry else None

    def sessions_of(self, name: str) -> list[int]:
        entry = self._entries.get(name)
        if entry is None:
            return []
        return [*entry.sessions, *entry.runner.pids]

    def describe(self, name: str) -> dict[str, Any]:
        entry = self._entries[name]
        r = entry.runner
        return {
            "name": name,
            "version": str(entry.recipe.version),
            "state": str(r.state),
            "since": r.since,
            "pids": r.pids,
            "last_error": r.last_error,
            "error_count": r.error_count,
            "dependencies": {
                d: {"requirement": str(dep.requirement), "type": dep.type}
                for d, dep in entry.recipe.dependencies.items()
            },
            "type": entry.recipe.type,
            "artifacts_path": str(self._store.artifacts_path(name, str(entry.recipe.version))),
            "decompressed_path": str(self._store.decompressed_path(name, str(entry.recipe.version))),
            "work_path": str(self._paths.work(name)),
            "run_with": self._effective_run_with(name),
        }

    def _effective_run_with(self, name: str) -> dict[str, Any]:
        """What the component runs with now, and where it came from (``nucleus status NAME``)."""
        stored = self._run_with.get(name, {})
        try:
            user = self.user_of(name)
        except NucleusError as exc:
            who = f"? ({exc.message})"
        else:
            who = str(user) if user is not None else user_name(os.geteuid())
        limits = run_with_mod.limits_of(stored, self._settings)
        oom = {"oom_kills": self.report_oom_kills(name)} if limits.memory_kb is not None else {}
        note = cpus_note(limits.cpus)  # cpus above the core count, or below the smallest quota
        return {
            "posixUser": who, "posixUser_from": "deployment" if stored.get("posixUser") else "run_with_default",
            "systemResourceLimits": {k: v for k, v in (("memory", limits.memory_kb), ("cpus", limits.cpus))
                                     if v is not None},
            "systemResourceLimits_from": "deployment" if "systemResourceLimits" in stored else "run_with_default",
            "cgroups": [str(g) for g in self.cgroups.groups(name, limits)] if limits else [],
            **oom,
            **({"note": note} if note else {}),
        }

    # --- runWith ----------------------------------------------------------------------------
    def set_run_with(self, run_with: Mapping[str, Mapping[str, Any]]) -> None:
        """What deployments set in runWith, per component (the journal's active set keeps it). Read
        when a runner is built (work folder owner) and at every step launch (user, cgroups)."""
        self._run_with = {n: dict(v) for n, v in run_with.items()}
        self._users = {}

    def run_with_of(self, name: str) -> dict[str, Any]:
        return dict(self._run_with.get(name, {}))

    def user_of(self, name: str) -> ComponentUser | None:
        """Who the component's unprivileged steps run as (None: the daemon's user)."""
        if name not in self._users:
            stored = self._run_with.get(name)
            self._users[name] = run_with_mod.user_of(name, stored, self._settings) \
                if (stored or {}).get("posixUser") else self._component_user
        return self._users[name]

    def placement(self, name: str) -> Placement:
        """The supervisor's question at every launch: the step's user, and the cgroups it joins
        (made, or made again with new limits, here: nothing touches cgroups without limits)."""
        user = self.user_of(name)
        limits = run_with_mod.limits_of(self._run_with.get(name), self._settings)
        if not limits:
            if self.cgroups.limits_of(name) is not None:  # limits cleared since the group was made
                self._drop_cgroups([name])
            return user, []
        problem = self.cgroups.problem(limits)
        if problem is not None:
            raise LifecycleError(f"its system resource limits ({limits.describe()}) cannot be enforced: {problem}",
                                 component=name, field=run_with_mod.LIMITS)
        return user, self.cgroups.apply(name, limits)

    def memory_limit_hit(self, name: str, kills_before: int, code: int | None = None) -> str | None:
        """Why the component's step failed with ``code``, if the kernel OOM-killed in its group since
        ``kills_before`` (:meth:`oom_kills`): its memory limit, named. Killed itself (SIGKILL: -9, or
        137 from a shell whose command was) the step died of it; with another code it failed after
        the kernel killed one of its processes, which may or may not be why."""
        limits = self.cgroups.limits_of(name)
        if limits is None or limits.memory_kb is None:
            return None
        killed = self.cgroups.oom_kills(name) - kills_before
        if killed <= 0:
            return None
        if code is None or code in (-9, 128 + 9):
            return f"killed by the kernel: memory limit of {limits.memory_kb} KB reached (runWith.systemResourceLimits)"
        return (f"after the kernel killed {killed} of its processes at its memory limit of {limits.memory_kb} KB "
                "(runWith.systemResourceLimits)")

    def oom_kills(self, name: str) -> int:
        return self.cgroups.oom_kills(name) if self.cgroups.limits_of(name) is not None else 0

    def _drop_cgroups(self, names: Iterable[str]) -> None:
        for name in names:
            if self.cgroups.limits_of(name) is not None:  # only groups this daemon made
                self.report_oom_kills(name)  # before the kernel's count goes with the group
                self.cgroups.remove(name)

    def report_oom_kills(self, name: str) -> int:
        """Say so when the kernel killed processes in the component's memory group since the last
        look: a step's own death is also told by its exit (its reason), but a child the step forked
        dies without its parent noticing; this is the only word of it. The component's total."""
        killed = self.cgroups.new_oom_kills(name)
        if killed:
            total = self._oom_total[name] = self._oom_total.get(name, 0) + killed
            limits = self.cgroups.limits_of(name)
            limit_kb = limits.memory_kb if limits is not None else None
            text = (f"the kernel killed {killed} process{'es' if killed > 1 else ''} of this component: memory "
                    f"limit of {limit_kb} KB reached (runWith.systemResourceLimits); {total} so far")
            entry = self._entries.get(name)
            if entry is not None:
                entry.log.write(text, stream="nucleus", step="memory")
            log.warning("component.oom_killed", component=name, killed=killed, total=total, memory_limit_kb=limit_kb)
        return self._oom_total.get(name, 0)

    async def watch_oom_kills(self, interval_s: float = 1.0) -> None:
        """Look at every limited component's OOM count each ``interval_s`` (runs until cancelled)."""
        while True:
            await asyncio.sleep(interval_s)
            for name in list(self._entries):
                if self.cgroups.limits_of(name) is not None:
                    self.report_oom_kills(name)

    # --- building runners -------------------------------------------------------------------
    def _spawned(self, component: str, pid: int, pgid: int) -> None:
        entry = self._entries.get(component)
        if entry is not None:
            entry.sessions.append(pgid)
            entry.sessions.append(pid)
        if self._on_spawn_listener is not None:
            self._on_spawn_listener(component, pid, pgid)

    def interpolation_context(
        self, recipe: Recipe, configuration: Mapping[str, Any] | None = None, *,
        planned: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    ) -> InterpolationContext:
        """``planned`` ({name: (version, configuration)}) stands in for what a deployment is about to
        write, so that a dependent's ``{Dep:configuration:/x}`` is previewed with Dep's new values."""
        planned = planned or {}

        def ctx_of(name: str, version: str) -> ComponentContext:
            if name == recipe.name and configuration is not None:
                own: Mapping[str, Any] = configuration
            elif name in planned:
                version, own = planned[name]
            else:
                own = self._config.document(name) if self._config.has(name) else {}
            return ComponentContext(
                name=name,
                configuration=own,
                artifacts_path=str(self._store.artifacts_path(name, version)),
                decompressed_path=str(self._store.decompressed_path(name, version)),
                work_path=str(self._paths.work(name)),
            )

        deps: dict[str, ComponentContext] = {}
        for dep in recipe.dependencies:
            entry = self._entries.get(dep)
            if dep in planned:
                deps[dep] = ctx_of(dep, planned[dep][0])
            elif entry is not None:
                deps[dep] = ctx_of(dep, str(entry.recipe.version))
        return InterpolationContext(
            component=ctx_of(recipe.name, str(recipe.version)),
            kernel_root=str(self._paths.root),
            thing_name=self._settings.thing_name,
            dependencies=deps,
        )

    def lifecycle_of(
        self, recipe: Recipe, configuration: Mapping[str, Any] | None = None, *,
        planned: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
    ) -> Lifecycle:
        """The manifest's lifecycle for this platform, variables resolved (with ``configuration``
        standing in for the component's own, and ``planned`` for other components', to preview a
        deployment)."""
        manifest = recipe.select(self._platform)
        if manifest is None:
            raise RecipeError(
                f"no manifest matches this platform {self._platform}",
                component=recipe.name,
                path=recipe.source,
                field="Manifests",
            )
        component = recipe.name

        def warn(variable: str) -> None:
            log.warning("recipe.variable_unresolved", component=component, variable=variable)

        ctx = self.interpolation_context(recipe, configuration, planned=planned)
        return interpolate_lifecycle(manifest.lifecycle, ctx, warn=warn)

    def base_env(self, recipe: Recipe, lifecycle: Lifecycle) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        # Components written in Python find the nucleus SDK (`import ipc`) through the Python first on
        # PATH: their own environment, which sees the daemon's packages (nucleus.component_python), or
        # else the interpreter the daemon runs on.
        bindirs = [str(d) for d in (self._python_bin, Path(sys.executable).parent) if d is not None]
        env["PATH"] = os.pathsep.join([*bindirs, env.get("PATH", "/usr/bin:/bin")])
        env.update(
            {
                "SVCUID": self._identities.component_token(recipe.name),
                "NUCLEUS_IPC_SOCKET": str(self._paths.ipc_socket),
                "AWS_IOT_THING_NAME": self._settings.thing_name,
                "NUCLEUS_COMPONENT_NAME": recipe.name,
                "NUCLEUS_COMPONENT_VERSION": str(recipe.version),
                "NUCLEUS_ROOT": str(self._paths.root),
                "GG_ROOT_CA_PATH": "",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self._settings.ipc.greengrass_socket:
            # Only when the socket exists: without these variables awsiotsdk fails naming the missing
            # variable, with them it fails with AWS_ERROR_FILE_INVALID_PATH, which says nothing.
            env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"] = str(self._paths.gg_socket)
            env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH"] = str(self._paths.gg_socket)
        env.update({k: str(v) for k, v in lifecycle.setenv.items()})
        return env

    def build_spec(self, recipe: Recipe, lifecycle: Lifecycle) -> ComponentSpec:
        steps: dict[str, StepSpec] = {}
        for step_name in RUNNER_STEPS:
            step = lifecycle.steps.get(step_name)  # type: ignore[call-overload]
            if step is None or not step.script.strip():
                continue
            steps[step_name] = StepSpec(
                script=step.script,
                timeout_s=_timeout(step.timeout, step_name, recipe.name),
                setenv={k: str(v) for k, v in step.setenv.items()},
                skipif=step.skipif,
                requires_privilege=truthy(step.requires_privilege),
            )
        work = self._paths.work(recipe.name)
        work.mkdir(parents=True, exist_ok=True)
        try:
            user = self.user_of(recipe.name)
        except NucleusError as exc:  # its user went away since it was deployed: every launch fails, saying why
            log.error("component.user_unavailable", component=recipe.name, error=str(exc))  # noqa: TRY400
            user = None
        if user is not None:  # its work folder is its own, its artifacts read-only
            give_work_folder(work, user)
            for tree in (self._store.artifacts_path(recipe.name, recipe.version),
                         self._store.decompressed_path(recipe.name, recipe.version)):
                share_with_group(tree, user.gid)
        return ComponentSpec(
            name=recipe.name,
            version=str(recipe.version),
            steps=steps,
            env=self.base_env(recipe, lifecycle),
            work_dir=work,
        )

    def _make_runner(self, recipe: Recipe) -> Entry:
        lifecycle = self.lifecycle_of(recipe)
        spec = self.build_spec(recipe, lifecycle)
        clog = ComponentLog(
            self._paths.component_log(recipe.name),
            max_bytes=self._settings.logs.max_bytes_per_file,
            backup_count=self._settings.logs.backup_count,
        )
        runner = ComponentRunner(
            spec,
            self._supervisor,
            clog,
            self._settings.restart,
            clock=self._clock,
            on_state=self._state_changed,
            exit_cause=self._exit_cause,
        )
        return Entry(recipe=recipe, runner=runner, lifecycle=lifecycle, log=clog)

    def _exit_cause(self, name: str) -> Callable[[int], str | None]:
        """Called before a step starts: its returned callable says, once the step died, whether the
        memory limit killed it."""
        before = self.oom_kills(name)
        return lambda code: self.memory_limit_hit(name, before, code)

    def step_env(self, name: str) -> tuple[ComponentSpec, Lifecycle] | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        return entry.runner.spec, entry.lifecycle

    # --- state changes ----------------------------------------------------------------------
    def _state_changed(self, component: str, old: State, new: State, reason: str) -> None:
        if self._on_state_listener is not None:
            self._on_state_listener(component, old, new, reason)
        # The error that exhausts the budget goes RUNNING -> BROKEN directly: dependents must go
        # down then too, not keep running on top of a dependency that will not come back.
        if new in (State.ERRORED, State.BROKEN) and old in SETTLED and component not in self._stopping_on_purpose:
            self._spawn(self._restart_dependents(component, broken=new is State.BROKEN))
        self._spawn(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def hard_dependents_closure(self, names: Iterable[str]) -> set[str]:
        """Everything that (transitively) HARD-depends on any of ``names``, excluding them."""
        wanted = set(names)
        found: set[str] = set()
        pending = list(wanted)
        while pending:
            for dep in self.hard_dependents(pending.pop()):
                if dep not in wanted and dep not in found:
                    found.add(dep)
                    pending.append(dep)
        return found

    def hard_dependents(self, name: str) -> list[str]:
        return [
            n
            for n, e in self._entries.items()
            if name in e.recipe.dependencies and e.recipe.dependencies[name].type == "HARD"
        ]

    async def _restart_dependents(self, name: str, *, broken: bool = False) -> None:
        """A HARD dependency went down: take its dependents down and bring them back after it
        (not while it is BROKEN: `nucleus restart NAME --force` of it starts them again)."""
        dependents = [d for d in self.hard_dependents(name) if self.state(d) in SETTLED | {State.STARTING}]
        if not dependents:
            return
        log.info("component.dependents_restarting", component=name, dependents=dependents, broken=broken)
        why = f"HARD dependency {name} is BROKEN" if broken else f"HARD dependency {name} restarting"
        await self.stop(dependents, reason=why)
        if broken:
            return
        entry = self._entries.get(name)
        if entry is None:
            return
        with_timeout = self._settings.deployments.default_timeout_s
        try:
            reached = await entry.runner.wait_for(STARTABLE_DEP_STATES, timeout=with_timeout)
        except TimeoutError:
            return
        if reached is State.BROKEN:
            return
        await self.start(dependents)

    # --- operations -----------------------------------------------------------------------
    def load(self, recipes: Mapping[str, Recipe]) -> None:
        """Create runners (NEW) for components that have none or whose version changed."""
        for name in dependency_order(recipes):
            recipe = recipes[name]
            current = self._entries.get(name)
            if current is not None and current.recipe.version == recipe.version and (
                current.recipe.to_document() == recipe.to_document()
            ):
                continue
            if current is not None and current.runner.state not in (State.NEW, State.FINISHED, State.BROKEN,
                                                                     State.INSTALLED, State.ERRORED):
                raise LifecycleError("replace a running component: stop it first", component=name)
            self._entries[name] = self._make_runner(recipe)

    async def install_and_start(self, names: Iterable[str]) -> None:
        """Install every component concurrently, then start each once its HARD deps are up."""
        names = [n for n in names if n in self._entries]

        async def one(name: str) -> None:
            entry = self._entries[name]
            self._stopping_on_purpose.discard(name)
            if entry.runner.state in (State.NEW, State.ERRORED, State.FINISHED, State.BROKEN):
                await entry.runner.install()
            if entry.runner.state is not State.INSTALLED:
                return
            for dep, spec in entry.recipe.dependencies.items():
                dep_entry = self._entries.get(dep)
                if spec.type != "HARD" or dep_entry is None:
                    continue
                reached = await dep_entry.runner.wait_for(
                    STARTABLE_DEP_STATES, timeout=self._settings.deployments.default_timeout_s
                )
                if reached is State.BROKEN:
                    log.warning("component.dependency_broken", component=name, dependency=dep)
                    return
            await entry.runner.start()

        async with asyncio.TaskGroup() as tg:
            for name in names:
                tg.create_task(one(name))

    async def start(self, names: Iterable[str]) -> None:
        await self.install_and_start(names)

    async def stop(self, names: Iterable[str], *, reason: str = "") -> None:
        """Stop components, dependents before their dependencies."""
        wanted = {n for n in names if n in self._entries}
        # Anything that HARD-depends on a stopped component goes down first.
        wanted |= self.hard_dependents_closure(wanted)
        order = dependency_order({n: self._entries[n].recipe for n in wanted})
        levels = _levels({n: self._entries[n].recipe for n in wanted}, order)
        self._stopping_on_purpose.update(wanted)
        for level in reversed(levels):
            async with asyncio.TaskGroup() as tg:
                for name in level:
                    tg.create_task(self._entries[name].runner.stop(reason=reason))
        self._drop_cgroups(wanted)  # stopped: their groups go (a start makes them again)

    async def remove(self, names: Iterable[str], *, reason: str = "removed") -> None:
        names = [n for n in names if n in self._entries]
        await self.stop(names, reason=reason)
        for name in names:
            entry = self._entries.pop(name)
            self._oom_total.pop(name, None)
            await entry.runner.close()
            self._identities.revoke_component(name)
            if self._on_removed is not None:
                await self._on_removed(name)  # its open IPC sessions end with its token

    async def restart(self, name: str, *, force: bool = False) -> None:
        entry = self._entries[name]
        dependents = [d for d in self.hard_dependents(name) if self.state(d) in SETTLED | {State.STARTING}]
        if dependents:
            await self.stop(dependents, reason=f"HARD dependency {name} restarting")
        self._stopping_on_purpose.add(name)
        await entry.runner.restart(force=force)
        self._stopping_on_purpose.discard(name)
        if dependents:
            self._spawn(self._start_after(name, dependents))

    async def _start_after(self, name: str, dependents: list[str]) -> None:
        entry = self._entries.get(name)
        if entry is None:
            return
        try:
            reached = await entry.runner.wait_for(
                STARTABLE_DEP_STATES, timeout=self._settings.deployments.default_timeout_s
            )
        except TimeoutError:
            return
        if reached is not State.BROKEN:
            await self.start(dependents)

    def report_state(self, name: str, state: State, message: str = "") -> None:
        entry = self._entries.get(name)
        if entry is None:
            raise LifecycleError("unknown component", component=name)
        entry.runner.report_state(state, message)

    async def wait_settled(
        self, names: Iterable[str], *, settle_s: float, deadline: float
    ) -> tuple[bool, str]:
        """Every component RUNNING for ``settle_s`` (or FINISHED) before ``deadline``.

        Returns (ok, reason). BROKEN fails at once; a component that leaves RUNNING
        restarts its settle clock.
        """
        names = list(names)
        running_since: dict[str, float] = {}
        while True:
            now = time.monotonic()
            pending: list[str] = []
            for name in names:
                entry = self._entries.get(name)
                if entry is None:
                    return False, f"{name}: not loaded"
                state = entry.runner.state
                if state is State.BROKEN:
                    why = entry.runner.last_error or "too many errors"
                    return False, f"{name} is BROKEN: {why}"
                if state is State.FINISHED:
                    continue
                if state is State.RUNNING:
                    since = running_since.setdefault(name, now)
                    if now - since >= settle_s:
                        continue
                else:
                    running_since.pop(name, None)
                pending.append(name)
            if not pending:
                return True, ""
            if now >= deadline:
                return False, "timed out waiting for " + "; ".join(self._waiting_for(n, settle_s) for n in pending)
            wake = deadline - now
            for name in pending:
                if name in running_since:
                    wake = min(wake, settle_s - (now - running_since[name]))
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(0.01, min(wake, 1.0)))

    def _waiting_for(self, name: str, settle_s: float) -> str:
        """What a deployment that ran out of time was still waiting for, in an operator's words."""
        entry = self._entries[name]
        state = entry.runner.state
        what = {
            State.NEW: "not installed yet (install step still running)",
            State.INSTALLED: "installed, waiting for its HARD dependencies to start",
            State.STARTING: "starting (startup step still running, or not yet RUNNING)",
            State.RUNNING: f"RUNNING for less than the settle time ({settle_s:g} s)",
            State.ERRORED: f"ERRORED, waiting to restart: {entry.runner.last_error or 'no reason recorded'}",
            State.STOPPING: "stopping",
        }.get(state, str(state))
        return f"{name} {entry.recipe.version}, {state}: {what}"

    async def close(self) -> None:
        """Stop everything in reverse dependency order, then cancel housekeeping tasks."""
        await self.stop(list(self._entries), reason="nucleus shutting down")
        for entry in self._entries.values():
            await entry.runner.close()
        self._drop_cgroups(list(self._entries))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _levels(recipes: Mapping[str, Recipe], order: list[str]) -> list[list[str]]:
    """Group a dependency order into levels whose members do not depend on each other."""
    level_of: dict[str, int] = {}
    for name in order:
        deps = [d for d in recipes[name].dependencies if d in recipes and d != name]
        level_of[name] = 1 + max((level_of[d] for d in deps), default=-1)
    levels: list[list[str]] = [[] for _ in range(max(level_of.values(), default=-1) + 1)]
    for name, level in level_of.items():
        levels[level].append(name)
    return levels
