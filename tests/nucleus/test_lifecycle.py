"""The pure lifecycle machine, driven as tables: no processes, no tasks, no sleeping."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus.clock import FakeClock
from nucleus.lifecycle import (
    STEPS,
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
    StepSkipped,
    StepTimedOut,
    StopRequested,
    backoff_delay,
)
from nucleus.settings import RestartPolicy
from nucleus.states import TRANSITIONS, State


def policy(**fields: float) -> RestartPolicy:
    return RestartPolicy.model_validate(fields)


NO_JITTER = policy(backoff_initial_s=1.0, backoff_max_s=8.0, backoff_multiplier=2.0, backoff_jitter=0.0)


def machine(*steps: str, policy: RestartPolicy = NO_JITTER, seed: int = 1) -> Lifecycle:
    return Lifecycle(steps, policy, random.Random(seed))


def feed(m: Lifecycle, *events: Event) -> list[Effect]:
    out: list[Effect] = []
    for ev in events:
        out.extend(m.handle(ev))
    return out


def states(effects: list[Effect]) -> list[State]:
    return [e.state for e in effects if isinstance(e, EnterState)]


def running_run_component(m: Lifecycle) -> int:
    """Bring a run-only component to RUNNING; returns the generation of its run."""
    feed(m, StartRequested())
    gen = m.generation
    feed(m, RunLaunched(gen))
    assert m.state is State.RUNNING
    return gen


# --- happy paths --------------------------------------------------------------------------
def test_install_then_startup_reaches_running() -> None:
    m = machine("install", "startup")
    assert feed(m, InstallRequested()) == [RunStep("install", 1)]
    assert feed(m, StepExited("install", 0, 1, now=0.0)) == [
        EnterState(State.INSTALLED, "install exited with code 0")
    ]
    assert feed(m, StartRequested()) == [EnterState(State.STARTING, "running startup"), RunStep("startup", 2)]
    assert states(feed(m, StepExited("startup", 0, 2, now=1.0))) == [State.RUNNING]
    assert not m.busy


def test_run_is_running_when_launched_and_finished_on_exit_0() -> None:
    m = machine("run")
    assert feed(m, StartRequested()) == [
        EnterState(State.INSTALLED, "no install step"),
        EnterState(State.STARTING, "launching run"),
        RunStep("run", 2),
    ]
    assert states(feed(m, RunLaunched(2))) == [State.RUNNING]
    assert states(feed(m, RunExited(0, 2, now=5.0))) == [State.FINISHED]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (RunExited(3, 2, now=1.0), "run exited with code 3"),
        (StepTimedOut("run", 2, now=1.0), "run timed out"),
        (StepLaunchFailed("run", 2, "no such dir", now=1.0), "run could not be launched: no such dir"),
        (ReportedState(State.ERRORED, now=1.0), "reported ERRORED by the component"),
    ],
)
def test_failures_of_a_running_component_error_it(event: Event, reason: str) -> None:
    m = machine("run")
    running_run_component(m)
    assert feed(m, event) == [EnterState(State.ERRORED, reason), KillAll(3)]
    assert m.last_reason == reason


def test_startup_then_run_launches_run_after_startup() -> None:
    m = machine("startup", "run")
    feed(m, StartRequested())
    assert feed(m, StepExited("startup", 0, 2, now=0.0)) == [RunStep("run", 2)]
    assert states(feed(m, RunLaunched(2))) == [State.RUNNING]


def test_neither_startup_nor_run_finishes_after_install() -> None:
    m = machine("install")
    feed(m, InstallRequested(), StepExited("install", 0, 1, now=0.0))
    assert states(feed(m, StartRequested())) == [State.FINISHED]


def test_install_on_finished_installed_component_goes_back_to_installed() -> None:
    m = machine("install", "run")
    feed(m, InstallRequested(), StepExited("install", 0, 1, now=0.0))
    gen = running_run_component(m)
    feed(m, RunExited(0, gen, now=0.0))
    assert m.state is State.FINISHED
    assert feed(m, InstallRequested()) == [EnterState(State.INSTALLED, "already installed")]


def test_reported_running_moves_starting_to_running() -> None:
    m = machine("startup")
    feed(m, StartRequested())
    assert states(feed(m, ReportedState(State.RUNNING, now=0.0))) == [State.RUNNING]
    # the startup exit afterwards changes nothing visible
    assert feed(m, StepExited("startup", 0, m.generation, now=0.0)) == []
    assert m.state is State.RUNNING


# --- skipif -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "skipped", "expected"),
    [
        (("install", "run"), "install", [State.INSTALLED]),
        (("startup",), "startup", [State.FINISHED]),
        (("run",), "run", [State.FINISHED]),
    ],
)
def test_skipped_steps_count_as_absent(steps: tuple[str, ...], skipped: str, expected: list[State]) -> None:
    m = machine(*steps)
    if skipped == "install":
        feed(m, InstallRequested())
    else:
        feed(m, StartRequested())
    assert states(feed(m, StepSkipped(skipped, m.generation))) == expected  # type: ignore[arg-type]


def test_skipped_startup_with_run_launches_run() -> None:
    m = machine("startup", "run")
    feed(m, StartRequested())
    assert feed(m, StepSkipped("startup", 2)) == [RunStep("run", 2)]


# --- errors, recover, backoff, BROKEN -----------------------------------------------------
def test_install_failure_backs_off_and_retries_install() -> None:
    m = machine("install", "run")
    feed(m, InstallRequested())
    assert feed(m, StepExited("install", 1, 1, now=0.0)) == [
        EnterState(State.ERRORED, "install exited with code 1"),
        KillAll(2),
    ]
    assert feed(m, KillCompleted(2)) == [ScheduleBackoff(1.0, 2)]
    assert feed(m, BackoffElapsed(2)) == [RunStep("install", 3)]
    assert m.state is State.ERRORED
    assert states(feed(m, StepExited("install", 0, 3, now=2.0))) == [State.INSTALLED]


def test_install_timeout_counts_as_error() -> None:
    m = machine("install")
    feed(m, InstallRequested())
    assert states(feed(m, StepTimedOut("install", 1, now=0.0))) == [State.ERRORED]
    assert m.error_count == 1


def test_recover_runs_before_the_backoff() -> None:
    m = machine("run", "recover")
    gen = running_run_component(m)
    feed(m, RunExited(1, gen, now=0.0))
    assert feed(m, KillCompleted(m.generation)) == [RunStep("recover", m.generation)]
    # a failing recover does not stop the restart
    assert feed(m, StepExited("recover", 9, m.generation, now=0.1)) == [ScheduleBackoff(1.0, m.generation)]
    gen = m.generation
    assert feed(m, BackoffElapsed(gen)) == [EnterState(State.STARTING, "launching run"),
                                            RunStep("run", gen + 1)]


def crash(m: Lifecycle, now: float) -> list[Effect]:
    """Crash the current run incarnation and let the kill complete."""
    gen = m.generation
    if m.state is State.STARTING:
        feed(m, RunLaunched(gen))
    effects = feed(m, RunExited(1, gen, now=now))
    effects += feed(m, KillCompleted(m.generation))
    return effects


def test_broken_after_max_errors_within_window() -> None:
    m = machine("run")
    running_run_component(m)
    first = crash(m, now=0.0)
    assert states(first) == [State.ERRORED]
    feed(m, BackoffElapsed(m.generation))
    second = crash(m, now=1.0)
    assert [e for e in second if isinstance(e, ScheduleBackoff)] == [ScheduleBackoff(2.0, m.generation)]
    feed(m, BackoffElapsed(m.generation))
    third = crash(m, now=3.0)
    assert states(third) == [State.BROKEN]
    assert "3 errors within 3600 s" in m.last_reason
    assert not any(isinstance(e, ScheduleBackoff) for e in third)
    assert not m.busy
    # BROKEN ignores start and plain restart
    assert feed(m, StartRequested()) == []
    assert feed(m, RestartRequested(force=False)) == []


def test_errors_spread_over_more_than_the_window_never_break() -> None:
    m = machine("run")
    running_run_component(m)
    for i in range(6):
        effects = crash(m, now=i * 2000.0)
        assert states(effects) == [State.ERRORED], i
        feed(m, BackoffElapsed(m.generation))
    assert m.errors_within(5 * 2000.0) == 2


def test_force_restart_leaves_broken_and_clears_the_budget() -> None:
    m = machine("run", policy=policy(max_errors=1, backoff_jitter=0.0))
    running_run_component(m)
    assert states(crash(m, now=0.0)) == [State.BROKEN]
    assert feed(m, RestartRequested(force=True)) == [EnterState(State.STARTING, "launching run"),
                                                     RunStep("run", m.generation)]
    assert m.error_count == 0
    assert states(feed(m, RunLaunched(m.generation))) == [State.RUNNING]


def test_force_restart_of_never_installed_broken_component_installs_first() -> None:
    m = machine("install", "run", policy=policy(max_errors=1))
    feed(m, InstallRequested(), StepExited("install", 1, 1, now=0.0))
    assert m.state is State.BROKEN
    feed(m, KillCompleted(m.generation))
    assert feed(m, RestartRequested(force=True)) == [RunStep("install", m.generation)]
    effects = feed(m, StepExited("install", 0, m.generation, now=1.0))
    assert states(effects) == [State.INSTALLED, State.STARTING]


def test_force_restart_while_broken_kill_is_pending_waits_for_the_kill() -> None:
    m = machine("run", policy=policy(max_errors=1))
    gen = running_run_component(m)
    feed(m, RunExited(1, gen, now=0.0))
    assert m.state is State.BROKEN
    assert feed(m, RestartRequested(force=True)) == []
    assert states(feed(m, KillCompleted(m.generation))) == [State.STARTING]


def test_backoff_grows_exponentially_with_bounded_seeded_jitter() -> None:
    pol = policy(backoff_initial_s=0.5, backoff_max_s=10.0, backoff_multiplier=2.0,
                           backoff_jitter=0.2, max_errors=50)
    m = machine("run", policy=pol, seed=42)
    running_run_component(m)
    delays: list[float] = []
    for i in range(8):
        effects = crash(m, now=float(i))
        delays += [e.delay for e in effects if isinstance(e, ScheduleBackoff)]
        feed(m, BackoffElapsed(m.generation))
    assert len(delays) == 8
    for n, delay in enumerate(delays, start=1):
        base = min(10.0, 0.5 * 2 ** (n - 1))
        assert base * 0.8 <= delay <= min(10.0, base * 1.2), (n, delay)
    uncapped = delays[:5]
    assert len(set(uncapped)) == len(uncapped), "jitter should make delays differ"
    # same seed, same sequence: the machine is deterministic given its rng
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [backoff_delay(pol, n, rng_a) for n in range(1, 6)] == [
        backoff_delay(pol, n, rng_b) for n in range(1, 6)
    ]


def test_backoff_never_overflows_with_a_huge_attempt() -> None:
    pol = policy(backoff_initial_s=1.0, backoff_max_s=30.0, backoff_multiplier=10.0)
    assert backoff_delay(pol, 10_000, random.Random(0)) <= 30.0


# --- stale events, stop, restart ----------------------------------------------------------
def test_stale_generation_events_are_ignored() -> None:
    m = machine("run")
    old = running_run_component(m)
    crash(m, now=0.0)
    feed(m, BackoffElapsed(m.generation))
    feed(m, RunLaunched(m.generation))
    assert m.state is State.RUNNING
    for stale in (RunExited(1, old, now=1.0), StepTimedOut("run", old, now=1.0), KillCompleted(old),
                  BackoffElapsed(old), RunLaunched(old), StepSkipped("run", old)):
        assert feed(m, stale) == [], stale
    assert m.state is State.RUNNING
    assert m.error_count == 1


def test_stop_with_shutdown_step_then_kill() -> None:
    m = machine("run", "shutdown")
    running_run_component(m)
    assert feed(m, StopRequested("operator")) == [EnterState(State.STOPPING, "operator"),
                                                  RunStep("shutdown", 3)]
    # the run process exiting because of the shutdown is stale, not an error
    assert feed(m, RunExited(143, 2, now=1.0)) == []
    assert feed(m, StepTimedOut("shutdown", 3, now=16.0)) == [KillAll(3)]
    assert feed(m, KillCompleted(3)) == [EnterState(State.FINISHED, "operator")]
    assert m.error_count == 0
    assert feed(m, StopRequested()) == []  # idempotent


def test_stop_during_backoff_cancels_the_restart() -> None:
    m = machine("run")
    running_run_component(m)
    crash(m, now=0.0)
    pending = m.generation
    assert feed(m, StopRequested()) == [CancelBackoff(), EnterState(State.STOPPING, "stop requested"),
                                        KillAll(pending + 1)]
    assert feed(m, BackoffElapsed(pending)) == []
    assert states(feed(m, KillCompleted(pending + 1))) == [State.FINISHED]
    assert not m.busy


def test_stop_during_install_and_then_start_installs_again() -> None:
    m = machine("install", "run")
    feed(m, InstallRequested())
    assert states(feed(m, StopRequested())) == [State.STOPPING]
    assert feed(m, StepExited("install", 0, 1, now=0.0)) == []  # stale
    assert states(feed(m, KillCompleted(m.generation))) == [State.FINISHED]
    assert not m.installed
    assert feed(m, StartRequested()) == [RunStep("install", m.generation)]


def test_restart_of_running_component_goes_stopping_to_starting() -> None:
    m = machine("run", "shutdown")
    running_run_component(m)
    effects = feed(m, RestartRequested())
    assert states(effects) == [State.STOPPING]
    feed(m, StepExited("shutdown", 0, m.generation, now=0.0))
    assert feed(m, KillCompleted(m.generation)) == [EnterState(State.STARTING, "launching run"),
                                                    RunStep("run", m.generation)]


def test_stop_after_restart_request_cancels_the_restart() -> None:
    m = machine("run")
    running_run_component(m)
    feed(m, RestartRequested())
    feed(m, StopRequested("really"))
    assert states(feed(m, KillCompleted(m.generation))) == [State.FINISHED]


def test_restart_during_backoff_starts_now() -> None:
    m = machine("run")
    running_run_component(m)
    crash(m, now=0.0)
    assert feed(m, RestartRequested()) == [CancelBackoff(), EnterState(State.STARTING, "launching run"),
                                           RunStep("run", m.generation)]
    assert m.error_count == 1  # a plain restart keeps the budget


# --- the machine is total and only takes allowed edges ------------------------------------
_gen = st.integers(min_value=0, max_value=12)
_step = st.sampled_from(STEPS)
_now = st.floats(min_value=0, max_value=1e5, allow_nan=False)
_events = st.one_of(
    st.just(InstallRequested()),
    st.just(StartRequested()),
    st.builds(StopRequested, st.sampled_from(["", "x"])),
    st.builds(RestartRequested, st.booleans()),
    st.builds(StepExited, _step, st.integers(-9, 3), _gen, _now),
    st.builds(StepTimedOut, _step, _gen, _now),
    st.builds(StepSkipped, _step, _gen),
    st.builds(StepLaunchFailed, _step, _gen, st.just("boom"), _now),
    st.builds(RunLaunched, _gen),
    st.builds(RunExited, st.integers(-9, 3), _gen, _now),
    st.builds(ReportedState, st.sampled_from([State.RUNNING, State.ERRORED]), _now),
    st.builds(KillCompleted, _gen),
    st.builds(BackoffElapsed, _gen),
)


@settings(max_examples=300, deadline=None)
@given(st.sets(_step), st.lists(_events, max_size=40))
def test_every_state_change_is_an_allowed_transition(steps: set[str], events: list[Event]) -> None:
    m = machine(*steps, policy=policy(max_errors=3, backoff_jitter=0.5))
    current = m.state
    for ev in events:
        for effect in m.handle(ev):
            if isinstance(effect, EnterState):
                assert effect.state in TRANSITIONS[current], (current, effect, ev)
                current = effect.state
            elif isinstance(effect, RunStep):
                assert effect.step in steps
                assert effect.generation == m.generation
            elif isinstance(effect, ScheduleBackoff):
                assert 0.0 <= effect.delay <= m.policy.backoff_max_s
        assert m.state is current


# --- FakeClock ----------------------------------------------------------------------------
async def test_fake_clock_wakes_sleepers_in_deadline_order_only_when_advanced() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("b", 2.0)), asyncio.create_task(sleeper("a", 1.0))]
    for _ in range(10):
        if clock.sleepers == 2:
            break
        await asyncio.sleep(0)
    assert clock.sleepers == 2
    assert clock.advance(0.5) == 0
    await asyncio.sleep(0)
    assert woke == []
    assert clock.advance(2.0) == 2
    await asyncio.gather(*tasks)
    assert woke == ["a", "b"]
    assert clock.now() == 2.5
