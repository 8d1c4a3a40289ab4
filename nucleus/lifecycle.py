"""The lifecycle of one component as a pure state machine: events in, effects out.

Why pure: crash loops, stale exits from a killed process, stops that arrive during a
backoff, forced restarts of BROKEN components — these are the cases Greengrass gets wrong,
and they are only testable exhaustively when no process, task or clock is involved. So this
module owns every *decision* (which step runs next, which state we are in, how long to
back off, when the error budget is spent) and :mod:`nucleus.runner` merely executes the
effects and feeds back what happened. Tests drive it as tables (tests/nucleus/test_lifecycle.py).

Two mechanisms keep it honest:

* **Generation.** Every sequence (install attempt, start attempt, stop, error handling)
  bumps ``generation``; effects carry it and the events they cause must carry it back.
  An event with another generation comes from a previous incarnation (the exit of a run
  process we already gave up on, a backoff timer of a stopped component) and is ignored.
* **Phase.** Besides the user-visible :class:`State`, the machine knows what it is waiting
  for (an install step, the kill of leftovers, a backoff...). An event that does not fit the
  phase is ignored, which makes the machine total: any event in any state is safe.

Semantics, Greengrass-compatible where Greengrass is sane:

* install (NEW → INSTALLED); startup exit 0 → RUNNING; run launched → RUNNING, run exit 0
  → FINISHED, non-zero → ERRORED; neither startup nor run → FINISHED after install. If a
  recipe has both startup and run, run is launched once startup exits 0.
* An error (non-zero exit, timeout, launch failure, a component reporting ERRORED) kills
  what is left of the component, runs recover if present, then backs off
  (exponential with jitter) and retries the failed stage. ``max_errors`` errors within
  ``error_window_s`` make it BROKEN instead; only ``RestartRequested(force=True)`` (or a
  new runner from a redeploy) leaves BROKEN.
* Stop: shutdown step (only if the component was STARTING/RUNNING), then kill every process
  group of the component, then FINISHED. A stop cancels any pending restart.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from nucleus.settings import RestartPolicy
from nucleus.states import State

StepName = Literal["install", "startup", "run", "shutdown", "recover"]
STEPS: tuple[StepName, ...] = ("install", "startup", "run", "shutdown", "recover")

# Greengrass defaults, in seconds; ``None`` = no limit. bootstrap is run by the deployment
# engine, not by this machine, but its default lives here with the others.
DEFAULT_TIMEOUTS: dict[str, float | None] = {
    "bootstrap": 120.0,
    "install": 120.0,
    "startup": 120.0,
    "run": None,
    "shutdown": 15.0,
    "recover": 60.0,
}


# --- events (what happened) ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InstallRequested:
    pass


# ``leftovers``: the component still has process groups although nothing of it is meant to run (a
# run step that exited 0 leaving a background process behind, so FINISHED or INSTALLED). Only the
# runner can see them; told, the machine ends them through STOPPING before it starts again or
# stops, instead of starting a second copy beside them or leaving them to outlive the daemon.
@dataclass(frozen=True, slots=True)
class StartRequested:
    leftovers: bool = False


@dataclass(frozen=True, slots=True)
class StopRequested:
    reason: str = ""
    leftovers: bool = False


@dataclass(frozen=True, slots=True)
class RestartRequested:
    force: bool = False
    leftovers: bool = False


@dataclass(frozen=True, slots=True)
class StepExited:
    step: StepName
    code: int
    generation: int
    now: float
    cause: str = ""  # why it died when the code does not say (its memory limit)


@dataclass(frozen=True, slots=True)
class StepTimedOut:
    step: StepName
    generation: int
    now: float


@dataclass(frozen=True, slots=True)
class StepSkipped:
    """The step's ``Skipif`` condition held; it counts as not being there."""

    step: StepName
    generation: int


@dataclass(frozen=True, slots=True)
class StepLaunchFailed:
    """The process could not be created at all (missing cwd, exec failure...)."""

    step: StepName
    generation: int
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class RunLaunched:
    generation: int


@dataclass(frozen=True, slots=True)
class RunExited:
    code: int
    generation: int
    now: float
    cause: str = ""  # why it died when the code does not say (its memory limit)


@dataclass(frozen=True, slots=True)
class ReportedState:
    """A state the component reported about itself over IPC (RUNNING or ERRORED)."""

    state: State
    now: float
    message: str = ""  # the component's own words on why (ERRORED), shown in the state's reason


@dataclass(frozen=True, slots=True)
class KillCompleted:
    """Every process group of the component is gone (the effect of :class:`KillAll`)."""

    generation: int


@dataclass(frozen=True, slots=True)
class BackoffElapsed:
    generation: int


Event = (
    InstallRequested
    | StartRequested
    | StopRequested
    | RestartRequested
    | StepExited
    | StepTimedOut
    | StepSkipped
    | StepLaunchFailed
    | RunLaunched
    | RunExited
    | ReportedState
    | KillCompleted
    | BackoffElapsed
)


# --- effects (what to do) -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunStep:
    """Run a step; ``run`` is spawned (report RunLaunched, then RunExited), others awaited."""

    step: StepName
    generation: int


@dataclass(frozen=True, slots=True)
class KillAll:
    """Kill every process group of the component, then report KillCompleted(generation)."""

    generation: int


@dataclass(frozen=True, slots=True)
class ScheduleBackoff:
    delay: float
    generation: int


@dataclass(frozen=True, slots=True)
class CancelBackoff:
    pass


@dataclass(frozen=True, slots=True)
class EnterState:
    state: State
    reason: str


Effect = RunStep | KillAll | ScheduleBackoff | CancelBackoff | EnterState


class Phase(StrEnum):
    """What the machine is waiting for; invisible to users, decisive for events."""

    IDLE = "idle"
    INSTALL = "install"
    STARTUP = "startup"
    RUN = "run"
    SHUTDOWN = "shutdown"
    STOP_KILL = "stop_kill"
    ERROR_KILL = "error_kill"
    RECOVER = "recover"
    BACKOFF = "backoff"


def backoff_delay(policy: RestartPolicy, attempt: int, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered.

    The jitter spreads restarts of components that crashed together (a shared dependency
    died) so that they do not hammer it in lockstep; the result never exceeds the cap.
    """
    try:
        base = policy.backoff_initial_s * policy.backoff_multiplier ** max(0, attempt - 1)
    except OverflowError:
        base = math.inf
    base = min(policy.backoff_max_s, base)
    spread = policy.backoff_jitter * base
    return max(0.0, min(policy.backoff_max_s, base + rng.uniform(-spread, spread)))


class Lifecycle:
    """One component's lifecycle decisions. Not thread-safe; not async; never blocks."""

    def __init__(
        self,
        steps: Collection[str],
        policy: RestartPolicy,
        rng: random.Random | None = None,
    ) -> None:
        self.steps = frozenset(s for s in steps if s in STEPS)
        self.policy = policy
        self._rng = rng or random.Random()
        self.state = State.NEW
        self.phase = Phase.IDLE
        self.generation = 0
        self.installed = False
        self.last_reason = ""
        self._errors: deque[float] = deque()
        self._retry: Literal["install", "start"] = "start"
        self._start_after_install = False
        self._restart_after_stop = False
        self._restart_pending = False
        self._stop_reason = ""

    # --- queries ------------------------------------------------------------------------
    @property
    def error_count(self) -> int:
        """Errors recorded in the current window (as of the last error)."""
        return len(self._errors)

    def errors_within(self, now: float) -> int:
        horizon = now - self.policy.error_window_s
        return sum(1 for t in self._errors if t > horizon)

    @property
    def busy(self) -> bool:
        """True while a step, a kill or a backoff is pending."""
        return self.phase is not Phase.IDLE

    # --- the transition function --------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        match event:
            case InstallRequested():
                return self._on_install_requested()
            case StartRequested(leftovers=leftovers):
                return self._on_start_requested(leftovers)
            case StopRequested(reason=reason, leftovers=leftovers):
                self._start_after_install = False
                self._restart_after_stop = False
                self._restart_pending = False
                return self._begin_stop(reason or "stop requested", leftovers=leftovers)
            case RestartRequested(force=force, leftovers=leftovers):
                return self._on_restart_requested(force, leftovers)
            case ReportedState(state=state, now=now, message=message):
                return self._on_reported(state, now, message)
            case BackoffElapsed(generation=gen):
                if gen != self.generation or self.phase is not Phase.BACKOFF:
                    return []
                return self._retry_now()
            case KillCompleted(generation=gen):
                if gen != self.generation:
                    return []
                return self._on_kill_completed()
            case RunLaunched(generation=gen):
                if gen != self.generation or self.phase is not Phase.RUN or self.state is not State.STARTING:
                    return []
                return self._enter(State.RUNNING, "run step launched")
            case RunExited(code=code, generation=gen, now=now, cause=cause):
                return self._on_step_result("run", gen, now, code=code, cause=cause)
            case StepExited(step=step, code=code, generation=gen, now=now, cause=cause):
                return self._on_step_result(step, gen, now, code=code, cause=cause)
            case StepTimedOut(step=step, generation=gen, now=now):
                return self._on_step_result(step, gen, now, failure="timed out")
            case StepLaunchFailed(step=step, generation=gen, reason=why, now=now):
                return self._on_step_result(step, gen, now, failure=f"could not be launched: {why}")
            case StepSkipped(step=step, generation=gen):
                return self._on_step_skipped(step, gen)
        return []  # pragma: no cover - the match is exhaustive over Event

    # --- requests -----------------------------------------------------------------------
    def _on_install_requested(self) -> list[Effect]:
        if self.installed:
            if self.state is State.FINISHED and self.phase is Phase.IDLE:
                return self._enter(State.INSTALLED, "already installed")
            return []
        if self.state in (State.BROKEN, State.STOPPING) or self.phase is not Phase.IDLE:
            return []  # broken, stopping, or an install (or its retry) is already under way
        return self._begin_install()

    def _on_start_requested(self, leftovers: bool = False) -> list[Effect]:
        if self.state in (State.STARTING, State.RUNNING, State.STOPPING, State.BROKEN):
            return []
        if leftovers and self._idle_with_leftovers():
            self._restart_after_stop = True
            return self._begin_stop("ending what the last run left running", leftovers=True)
        if self.phase is not Phase.IDLE:
            if not self.installed:
                self._start_after_install = True
            return []  # an install or a restart is already on its way
        if not self.installed:
            self._start_after_install = True
            return self._begin_install()
        return self._begin_start()

    def _on_restart_requested(self, force: bool, leftovers: bool = False) -> list[Effect]:
        if self.state is State.BROKEN and not force:
            return []
        if force:
            self._errors.clear()
        if leftovers and self._idle_with_leftovers():
            self._restart_after_stop = True
            return self._begin_stop("restart requested", leftovers=True)
        if self.state is State.STOPPING:
            self._restart_after_stop = True
            return []
        if self.state in (State.STARTING, State.RUNNING):
            self._restart_after_stop = True
            return self._begin_stop("restart requested")
        if self.phase is Phase.INSTALL:
            self._start_after_install = True
            return []
        if self.phase in (Phase.ERROR_KILL, Phase.RECOVER):
            # Leftovers are still being killed or recover is running: restart as soon as
            # that is done, skipping the backoff.
            self._restart_pending = True
            return []
        effects: list[Effect] = []
        if self.phase is Phase.BACKOFF:
            effects.append(CancelBackoff())
            self.phase = Phase.IDLE
        return effects + self._start_now()

    def _on_reported(self, state: State, now: float, message: str = "") -> list[Effect]:
        alive = self.phase in (Phase.STARTUP, Phase.RUN, Phase.IDLE)
        if state is State.RUNNING and self.state is State.STARTING and alive:
            return self._enter(State.RUNNING, "reported RUNNING by the component")
        if state is State.ERRORED and self.state in (State.STARTING, State.RUNNING) and alive:
            why = f": {message}" if message else ""
            return self._error(now, f"reported ERRORED by the component{why}", retry="start")
        return []

    # --- sequences ----------------------------------------------------------------------
    def _begin_install(self) -> list[Effect]:
        self.generation += 1
        if "install" in self.steps:
            self.phase = Phase.INSTALL
            return [RunStep("install", self.generation)]
        return self._installed("no install step")

    def _installed(self, reason: str) -> list[Effect]:
        self.installed = True
        self.phase = Phase.IDLE
        effects = self._enter(State.INSTALLED, reason)
        if self._start_after_install:
            self._start_after_install = False
            effects += self._begin_start()
        return effects

    def _begin_start(self) -> list[Effect]:
        self.generation += 1
        self._restart_after_stop = False
        if "startup" in self.steps:
            self.phase = Phase.STARTUP
            return [*self._enter(State.STARTING, "running startup"), RunStep("startup", self.generation)]
        if "run" in self.steps:
            self.phase = Phase.RUN
            return [*self._enter(State.STARTING, "launching run"), RunStep("run", self.generation)]
        self.phase = Phase.IDLE
        return self._enter(State.FINISHED, "no startup or run step")

    def _start_now(self) -> list[Effect]:
        """Start (installing first if it never was) without waiting for anything."""
        self._restart_pending = False
        if not self.installed:
            self._start_after_install = True
            return self._begin_install()
        return self._begin_start()

    def _idle_with_leftovers(self) -> bool:
        return self.phase is Phase.IDLE and self.installed and self.state in (State.INSTALLED, State.FINISHED)

    def _begin_stop(self, reason: str, *, leftovers: bool = False) -> list[Effect]:
        if self.state in (State.STOPPING, State.BROKEN):
            return []
        if self.phase is Phase.IDLE and self.state in (State.NEW, State.INSTALLED, State.FINISHED) and not leftovers:
            return []  # nothing runs
        was_active = self.state in (State.STARTING, State.RUNNING)
        effects: list[Effect] = []
        if self.phase is Phase.BACKOFF:
            effects.append(CancelBackoff())
        self.generation += 1
        self._stop_reason = reason
        effects += self._enter(State.STOPPING, reason)
        if was_active and "shutdown" in self.steps and self.installed:
            self.phase = Phase.SHUTDOWN
            effects.append(RunStep("shutdown", self.generation))
        else:
            self.phase = Phase.STOP_KILL
            effects.append(KillAll(self.generation))
        return effects

    def _stopped(self) -> list[Effect]:
        self.phase = Phase.IDLE
        if self._restart_after_stop:
            self._restart_after_stop = False
            if self.installed:
                return self._begin_start()
            effects = self._enter(State.FINISHED, self._stop_reason)
            return effects + self._start_now()
        return self._enter(State.FINISHED, self._stop_reason)

    def _error(self, now: float, reason: str, retry: Literal["install", "start"]) -> list[Effect]:
        self._errors.append(now)
        horizon = now - self.policy.error_window_s
        while self._errors and self._errors[0] <= horizon:
            self._errors.popleft()
        self.generation += 1
        self._retry = retry
        self.phase = Phase.ERROR_KILL
        count = len(self._errors)
        if count >= self.policy.max_errors:
            why = f"{reason} ({count} errors within {self.policy.error_window_s:g} s)"
            return [*self._enter(State.BROKEN, why), KillAll(self.generation)]
        return [*self._enter(State.ERRORED, reason), KillAll(self.generation)]

    def _on_kill_completed(self) -> list[Effect]:
        if self.phase is Phase.STOP_KILL:
            return self._stopped()
        if self.phase is not Phase.ERROR_KILL:
            return []
        if self.state is State.BROKEN:
            self.phase = Phase.IDLE
            return self._start_now() if self._restart_pending else []
        if "recover" in self.steps and self.installed:
            self.phase = Phase.RECOVER
            return [RunStep("recover", self.generation)]
        return self._back_off()

    def _back_off(self) -> list[Effect]:
        if self._restart_pending:
            self.phase = Phase.IDLE
            return self._start_now()
        self.phase = Phase.BACKOFF
        delay = backoff_delay(self.policy, len(self._errors), self._rng)
        return [ScheduleBackoff(delay, self.generation)]

    def _retry_now(self) -> list[Effect]:
        self.phase = Phase.IDLE
        if self._retry == "install" or not self.installed:
            return self._begin_install()
        return self._begin_start()

    # --- step results -------------------------------------------------------------------
    def _on_step_result(
        self, step: str, gen: int, now: float, *, code: int | None = None, failure: str | None = None,
        cause: str = "",
    ) -> list[Effect]:
        if gen != self.generation:
            return []
        ok = failure is None and code == 0
        what = f"{step} {failure}" if failure is not None else f"{step} exited with code {code}"
        if cause:
            what = f"{what} ({cause})"
        if step == "install" and self.phase is Phase.INSTALL:
            return self._installed(what) if ok else self._error(now, what, retry="install")
        if step == "startup" and self.phase is Phase.STARTUP:
            if not ok:
                return self._error(now, what, retry="start")
            if "run" in self.steps:
                self.phase = Phase.RUN
                return [RunStep("run", self.generation)]
            self.phase = Phase.IDLE
            return self._enter(State.RUNNING, what)
        if step == "run" and self.phase is Phase.RUN:
            if not ok:
                return self._error(now, what, retry="start")
            self.phase = Phase.IDLE
            return self._enter(State.FINISHED, what)
        if step == "shutdown" and self.phase is Phase.SHUTDOWN:
            self.phase = Phase.STOP_KILL
            return [KillAll(self.generation)]
        if step == "recover" and self.phase is Phase.RECOVER:
            return self._back_off()
        return []

    def _on_step_skipped(self, step: str, gen: int) -> list[Effect]:
        if gen != self.generation:
            return []
        if step == "install" and self.phase is Phase.INSTALL:
            return self._installed("install skipped")
        if step == "startup" and self.phase is Phase.STARTUP:
            if "run" in self.steps:
                self.phase = Phase.RUN
                return [RunStep("run", self.generation)]
            self.phase = Phase.IDLE
            return self._enter(State.FINISHED, "startup skipped")
        if step == "run" and self.phase is Phase.RUN:
            self.phase = Phase.IDLE
            return self._enter(State.FINISHED, "run skipped")
        if step == "shutdown" and self.phase is Phase.SHUTDOWN:
            self.phase = Phase.STOP_KILL
            return [KillAll(self.generation)]
        if step == "recover" and self.phase is Phase.RECOVER:
            return self._back_off()
        return []

    def _enter(self, state: State, reason: str) -> list[Effect]:
        if state is self.state and state is not State.ERRORED:
            return []
        self.state = state
        self.last_reason = reason
        return [EnterState(state, reason)]
