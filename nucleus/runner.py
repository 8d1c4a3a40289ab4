"""The asyncio service that runs one component: executes the lifecycle machine's effects.

All decisions live in :mod:`nucleus.lifecycle`; this class turns its effects into processes
(:mod:`nucleus.supervisor`), timers (the injected :class:`~nucleus.clock.Clock`) and
notifications, and feeds what happened back as events. Feeding is synchronous and
never awaits, so the machine sees events one at a time without a lock; every effect that
takes time runs in a task the runner owns and cancels on :meth:`ComponentRunner.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nucleus.clock import Clock
from nucleus.component_logs import ComponentLog
from nucleus.errors import NucleusError
from nucleus.lifecycle import (
    DEFAULT_TIMEOUTS,
    BackoffElapsed,
    CancelBackoff,
    Effect,
    EnterState,
    Event,
    InstallRequested,
    KillAll,
    KillCompleted,
    Lifecycle,
    ReportedState,
    RestartRequested,
    RunExited,
    RunLaunched,
    RunStep,
    ScheduleBackoff,
    StartRequested,
    StepExited,
    StepLaunchFailed,
    StepName,
    StepSkipped,
    StepTimedOut,
    StopRequested,
)
from nucleus.recipe import parse_skipif
from nucleus.settings import RestartPolicy
from nucleus.states import State, can_transition
from nucleus.supervisor import Supervisor, process_user

_log = structlog.get_logger("nucleus.runner")

StateCallback = Callable[[str, State, State, str], None]
Change = tuple[State, State, str]


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One lifecycle step, already interpolated (the runner's view of a recipe step)."""

    script: str
    timeout_s: float | None = None  # None: the Greengrass default for the step
    setenv: Mapping[str, str] = field(default_factory=dict)
    skipif: str | None = None
    requires_privilege: bool = False


@dataclass(frozen=True, slots=True)
class ComponentSpec:
    name: str
    version: str
    steps: Mapping[str, StepSpec]  # keys among install, startup, run, shutdown, recover
    env: Mapping[str, str]  # full base environment; a step's setenv goes on top
    work_dir: Path
    reports_state: bool = False  # informational: the component reports RUNNING/ERRORED itself


def skip_condition_holds(skipif: str, env: Mapping[str, str], cwd: Path) -> bool:
    """Greengrass ``Skipif``: ``onpath <executable>`` or ``exists <file>``.

    Raises ValueError for anything else so the caller can say which recipe is wrong.
    """
    kind, arg = parse_skipif(skipif)
    if kind == "onpath":
        return shutil.which(arg, path=env.get("PATH")) is not None
    target = Path(arg)
    return (target if target.is_absolute() else cwd / target).exists()


class StateSubscription:
    """State changes of one runner, as an async iterator with a bounded buffer.

    Registered when created (not on first iteration), so no change between subscribing and
    iterating is lost. A slow reader loses the oldest changes, never blocks the runner.
    Iteration ends when the runner is closed or :meth:`close` is called.
    """

    def __init__(self, owner: ComponentRunner, maxsize: int = 64) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0
        self._ended = False
        owner._subscriptions.add(self)

    def _put(self, item: Change | None) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self.dropped += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> StateSubscription:
        return self

    async def __anext__(self) -> Change:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._ended = True
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._owner._subscriptions.discard(self)
        self._put(None)


class ComponentRunner:
    """Drives one component's lifecycle with real processes."""

    def __init__(
        self,
        spec: ComponentSpec,
        supervisor: Supervisor,
        log: ComponentLog,
        policy: RestartPolicy,
        *,
        clock: Clock,
        on_state: StateCallback | None = None,
        rng: random.Random | None = None,
        exit_cause: Callable[[str], Callable[[int], str | None]] | None = None,
    ) -> None:
        self.name = spec.name
        # Asked before a step launches; what it returns says, after a failed exit, why the process
        # died when the exit code cannot (the kernel's OOM kill at the component's memory limit).
        self._exit_cause = exit_cause
        self.spec = spec
        self._supervisor = supervisor
        self._clog = log
        self._clock = clock
        self._on_state = on_state
        self._machine = Lifecycle(spec.steps.keys(), policy, rng)
        self._state = self._machine.state
        self._since = time.time()
        self._last_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._step_tasks: set[asyncio.Task[None]] = set()  # the steps' own, a subset of _tasks
        self._backoff: asyncio.Task[None] | None = None
        self._pending: deque[Event] = deque()
        self._feeding = False
        self._closed = False
        self._change = asyncio.Event()
        self._subscriptions: set[StateSubscription] = set()
        self._logger = _log.bind(component=spec.name, version=spec.version)

    # --- queries -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def since(self) -> float:
        """Wall-clock time (``time.time()``) of the last state change."""
        return self._since

    @property
    def log(self) -> ComponentLog:
        """The component's log, for steps run outside the runner (bootstrap)."""
        return self._clog

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def pids(self) -> list[int]:
        return self._supervisor.pids(self.name)

    @property
    def error_count(self) -> int:
        """Errors within the restart policy's window, as of now."""
        return self._machine.errors_within(self._clock.now())

    # --- operations --------------------------------------------------------------------
    async def install(self) -> None:
        """Run the install step (retrying with backoff); returns when INSTALLED or BROKEN
        (or FINISHED, if a stop interrupted it)."""
        self._feed(InstallRequested())
        await self._until(
            lambda: self._machine.installed
            or self._state is State.BROKEN
            or (not self._machine.busy and self._state is not State.ERRORED)
        )

    async def start(self) -> None:
        """Request a start (installing first if needed); does not wait for RUNNING."""
        self._feed(StartRequested(leftovers=self._has_leftovers()))

    async def stop(self, *, reason: str = "") -> None:
        """Shutdown step, then kill every process group; returns when FINISHED. Idempotent;
        cancels any pending restart."""
        self._feed(StopRequested(reason, leftovers=self._has_leftovers()))
        await self._until(lambda: self._state is not State.STOPPING)

    async def restart(self, *, force: bool = False) -> None:
        """Stop (if running) and start again; ``force`` also leaves BROKEN and clears the
        error budget. Returns once the stop part is over."""
        self._feed(RestartRequested(force, leftovers=self._has_leftovers()))
        await self._until(lambda: self._state is not State.STOPPING)

    def _has_leftovers(self) -> bool:
        """Process groups of a component that is not meant to run (FINISHED after a run step that left a
        background process): the machine cannot see them, and must end them before a start or on a stop."""
        return self._state in (State.INSTALLED, State.FINISHED) and bool(self._supervisor.pgids(self.name))

    def report_state(self, state: State, message: str = "") -> None:
        """A state the component reported over IPC: RUNNING or ERRORED (with its own reason, if given)."""
        if state not in (State.RUNNING, State.ERRORED):
            self._logger.warning("component.reported_state_ignored", state=str(state))
            return
        self._feed(ReportedState(state, self._clock.now(), message))

    async def wait_for(self, states: Collection[State], timeout: float | None) -> State:  # noqa: ASYNC109
        """The first of ``states`` reached (now or later); TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._until(lambda: self._state in states)
        return self._state

    def subscribe(self) -> StateSubscription:
        """Every later state change as ``(old, new, reason)``; ``async for`` over it."""
        return StateSubscription(self)

    async def close(self) -> None:
        """Stop the component and cancel everything the runner owns."""
        if self._closed:
            return
        try:
            await self.stop(reason="runner closed")
        finally:
            self._closed = True
            tasks = [*self._tasks, *([self._backoff] if self._backoff else [])]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for sub in list(self._subscriptions):
                sub.close()
            self._clog.close()

    # --- the event loop of the machine -------------------------------------------------
    def _feed(self, event: Event) -> None:
        """Hand an event to the machine and apply its effects, in order, without awaiting.

        Events raised while applying (an ``on_state`` callback reporting a state) are
        queued and handled after the current ones, so effects never interleave.
        """
        self._pending.append(event)
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._pending:
                for effect in self._machine.handle(self._pending.popleft()):
                    self._apply(effect)
        finally:
            self._feeding = False
            self._pulse()

    def _pulse(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._change.wait()

    def _apply(self, effect: Effect) -> None:
        match effect:
            case EnterState(state=new, reason=reason):
                self._enter(new, reason)
            case RunStep(step=step, generation=gen):
                if self._skipped(step):
                    self._feed(StepSkipped(step, gen))  # queued: handled right after this batch
                else:
                    task = self._own(self._run_step(step, gen), f"{step}")
                    if task is not None:
                        self._step_tasks.add(task)
                        task.add_done_callback(self._step_tasks.discard)
            case KillAll(generation=gen):
                self._own(self._kill_all(gen), "kill")
            case ScheduleBackoff(delay=delay, generation=gen):
                self._cancel_backoff()
                if not self._closed:
                    self._backoff = asyncio.create_task(self._backoff_then(delay, gen))
            case CancelBackoff():
                self._cancel_backoff()

    def _enter(self, new: State, reason: str) -> None:
        old = self._state
        if not can_transition(old, new):  # the machine's tests make this unreachable
            self._logger.error("component.transition_unexpected", old=str(old), new=str(new))
        self._state = new
        self._since = time.time()
        if new in (State.ERRORED, State.BROKEN):
            self._last_error = reason
        pids = self.pids
        log_method = self._logger.warning if new in (State.ERRORED, State.BROKEN) else self._logger.info
        log_method("component.state_changed", old=str(old), new=str(new), reason=reason,
                   pid=pids[0] if pids else None)
        # The first line of a version's life names it: after an update or a rollback the log holds two
        # versions' lines, and nothing else tells them apart.
        version = f" (version {self.spec.version})" if old is State.NEW else ""
        self._clog.write(f"state {old} -> {new}{version}: {reason}", stream="nucleus", step="lifecycle")
        if self._on_state is not None:
            try:
                self._on_state(self.name, old, new, reason)
            except Exception:
                self._logger.exception("component.state_callback_failed")
        for sub in list(self._subscriptions):
            sub._put((old, new, reason))

    def _own(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None] | None:
        if self._closed:
            coro.close()
            return None
        task = asyncio.create_task(self._guarded(coro, what), name=f"{self.name}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self._logger.exception("component.runner_task_failed", task=what)

    def _cancel_backoff(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None

    async def _backoff_then(self, delay: float, gen: int) -> None:
        self._logger.info("component.restart_scheduled", delay_s=round(delay, 3))
        await self._clock.sleep(delay)
        self._backoff = None
        self._feed(BackoffElapsed(gen))

    async def _kill_all(self, gen: int) -> None:
        try:
            survivors = await self._supervisor.kill_all(self.name)
            # The killed steps' tasks still have to log their exit: let them (bounded: drain is) before
            # the machine goes on, or a restart's log read "run starting", then the old run's
            # "exited with code -15", as if the new run had died.
            ending = [t for t in self._step_tasks if not t.done()]
            if ending:
                await asyncio.wait(ending, timeout=1.0)
            if survivors:  # said where the operator looks: the state will read FINISHED or ERRORED anyway
                listed = ", ".join(f"{pid} ({process_user(pid)})" for pid in survivors)
                self._clog.write(f"processes left running, which the nucleus may not signal: {listed}",
                                 stream="nucleus", step="lifecycle")
        finally:
            if not self._closed:
                self._feed(KillCompleted(gen))

    # --- steps -------------------------------------------------------------------------
    def _skipped(self, step: StepName) -> bool:
        """Evaluate ``Skipif`` now (cheap: a PATH lookup or a stat), so a skipped step
        resolves without a task."""
        spec = self.spec.steps[step]
        if not spec.skipif:
            return False
        try:
            skip = skip_condition_holds(spec.skipif, {**self.spec.env, **spec.setenv}, self.spec.work_dir)
        except ValueError as exc:
            self._logger.warning("component.skipif_invalid", step=step, error=str(exc))
            return False
        except OSError as exc:
            # `exists` of a path this user may not stat (a non-root nucleus, a 0700 folder): escaping
            # here left the component in NEW and its deployment waiting for its timeout. As Greengrass
            # (Java's Files.exists), a file that cannot be seen does not exist: the step runs.
            self._logger.warning("component.skipif_unchecked", step=step, skipif=spec.skipif, error=str(exc))
            self._clog.write(f"Skipif {spec.skipif!r} cannot be checked ({exc.strerror or exc}); the step runs",
                             stream="nucleus", step=step)
            return False
        if skip:
            self._clog.write(f"step {step} skipped ({spec.skipif})", stream="nucleus", step=step)
        return skip

    async def _run_step(self, step: StepName, gen: int) -> None:
        spec = self.spec.steps[step]
        cwd = self.spec.work_dir
        env = {**self.spec.env, **spec.setenv}
        timeout = spec.timeout_s if spec.timeout_s and spec.timeout_s > 0 else DEFAULT_TIMEOUTS.get(step)
        self._clog.write(f"step {step} starting", stream="nucleus", step=step)
        if step == "run":
            await self._run_long(spec, env, cwd, timeout, gen)
            return
        cause = self._exit_cause(self.name) if self._exit_cause is not None else None
        try:
            result = await self._supervisor.run_step(
                self.name, step, spec.script, env, cwd, timeout, self._clog,
                requires_privilege=spec.requires_privilege,
            )
        except Exception as exc:  # any launch failure, see _launch_failed
            self._launch_failed(step, gen, exc)
            return
        if result.timed_out:
            self._clog.write(f"step {step} timed out after {timeout} s", stream="nucleus", step=step)
            self._feed(StepTimedOut(step, gen, self._clock.now()))
        else:
            code = result.exit_code if result.exit_code is not None else -1
            why = self._why(step, code, cause)
            self._clog.write(f"step {step} exited with code {code}{why and f' ({why})'}", stream="nucleus", step=step)
            self._feed(StepExited(step, code, gen, self._clock.now(), cause=why))

    async def _run_long(
        self, spec: StepSpec, env: Mapping[str, str], cwd: Path, limit_s: float | None, gen: int
    ) -> None:
        cause = self._exit_cause(self.name) if self._exit_cause is not None else None
        try:
            handle = await self._supervisor.spawn(
                self.name, "run", spec.script, env, cwd, self._clog,
                requires_privilege=spec.requires_privilege,
            )
        except Exception as exc:  # any launch failure, see _launch_failed
            self._launch_failed("run", gen, exc)
            return
        self._feed(RunLaunched(gen))
        try:
            async with asyncio.timeout(limit_s):
                code = await handle.wait()
        except TimeoutError:
            await handle.terminate(self._supervisor.stop_grace_s)
            self._clog.write(f"step run timed out after {limit_s} s", stream="nucleus", step="run")
            self._feed(StepTimedOut("run", gen, self._clock.now()))
            return
        except asyncio.CancelledError:
            handle.kill_now()
            raise
        await handle.drain()
        why = self._why("run", code, cause)
        self._clog.write(f"step run exited with code {code}{why and f' ({why})'}", stream="nucleus", step="run")
        self._feed(RunExited(code, gen, self._clock.now(), cause=why))

    def _why(self, step: str, code: int, cause: Callable[[int], str | None] | None) -> str:
        """Why a step that failed died, when its exit code does not say (empty: it does)."""
        why = cause(code) if cause is not None and code != 0 else None
        if why:
            self._logger.warning("component.memory_limit_reached", step=step, exit_code=code, detail=why)
        return why or ""

    def _launch_failed(self, step: StepName, gen: int, exc: Exception) -> None:
        """Any failure to launch is the step's failure, told to the machine: ValueError too (a NUL byte
        in an environment value or the script). Escaping, it left the component in INSTALLING or
        STARTING until its deployment timed out."""
        if isinstance(exc, OSError | NucleusError):  # the device (a user gone, limits it cannot enforce), said
            self._logger.warning("component.step_launch_failed", step=step, error=str(exc))
        else:  # not an environment problem: keep the traceback for whoever reads the daemon's log
            self._logger.exception("component.step_launch_failed", step=step, error=str(exc))
        self._clog.write(f"step {step} could not be launched: {exc}", stream="nucleus", step=step)
        self._feed(StepLaunchFailed(step, gen, str(exc), self._clock.now()))

