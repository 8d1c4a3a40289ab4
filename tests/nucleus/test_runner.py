"""The component runner with real processes (``sh -c``), a real supervisor and real logs."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from runner_harness import WAIT, Harness, alive, eventually, policy

from nucleus.clock import FakeClock
from nucleus.component_logs import tail
from nucleus.runner import StepSpec, skip_condition_holds
from nucleus.states import State

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups via /proc")

def step(script: str, **kw: object) -> StepSpec:
    return StepSpec(script=script, **kw)  # type: ignore[arg-type]


# --- the happy paths ------------------------------------------------------------------------
async def test_install_then_startup_reaches_running(h: Harness) -> None:
    r = h.runner({"install": step("echo installing > installed.txt"), "startup": step("echo started")})
    await r.install()
    assert r.state is State.INSTALLED
    assert (h.work / "installed.txt").read_text() == "installing\n"
    await r.start()
    assert await r.wait_for({State.RUNNING, State.ERRORED}, WAIT) is State.RUNNING
    assert h.states() == [State.INSTALLED, State.STARTING, State.RUNNING]
    assert "[stdout] [startup] started" in h.log_text()


async def test_run_exit_0_finishes_and_nonzero_errors(h: Harness) -> None:
    ok = h.runner({"run": step("echo done")})
    await ok.start()
    assert await ok.wait_for({State.FINISHED, State.ERRORED}, WAIT) is State.FINISHED
    bad = h.runner({"run": step("exit 7")}, restart=policy(backoff_initial_s=60, backoff_max_s=60))
    await bad.start()
    assert await bad.wait_for({State.ERRORED}, WAIT) is State.ERRORED
    assert bad.last_error == "run exited with code 7"
    assert bad.error_count == 1


async def test_component_without_startup_or_run_finishes_after_install(h: Harness) -> None:
    r = h.runner({"install": step("true")})
    await r.install()
    await r.start()
    assert r.state is State.FINISHED


async def test_env_cwd_and_setenv_precedence(h: Harness) -> None:
    r = h.runner(
        {"install": step('echo "foo=$FOO bar=$BAR cwd=$(pwd)"', setenv={"FOO": "from-step"})},
        env={"FOO": "from-base", "BAR": "base-only"},
    )
    await r.install()
    assert f"foo=from-step bar=base-only cwd={h.work}" in h.log_text()


async def test_a_step_that_cannot_be_launched_for_any_reason_errors_instead_of_hanging(h: Harness) -> None:
    """A NUL byte in an environment value (JSON recipes can carry one) makes the spawn raise
    ValueError, not OSError. It escaped as a logged task failure and the machine never heard of it:
    the component stayed INSTALLING / STARTING until its deployment timed out."""
    install = h.runner({"install": step("true", setenv={"BAD": "a\x00b"})})  # retried, then BROKEN
    await asyncio.wait_for(install.install(), WAIT)
    assert install.state is State.BROKEN
    assert "install could not be launched" in (install.last_error or "") and "null" in (install.last_error or "")
    run = h.runner({"run": step("sleep 60", setenv={"BAD": "a\x00b"})},
                   restart=policy(backoff_initial_s=60, backoff_max_s=60))
    await run.start()
    assert await run.wait_for({State.ERRORED}, WAIT) is State.ERRORED
    assert "run could not be launched" in (run.last_error or "")


# --- skipif -------------------------------------------------------------------------------
async def test_skipif_onpath_skips_install(h: Harness) -> None:
    r = h.runner({"install": step("exit 1", skipif="onpath sh")})
    await r.install()
    assert r.state is State.INSTALLED
    assert "step install skipped" in h.log_text()


async def test_skipif_exists_skips_run_only_when_the_file_exists(h: Harness) -> None:
    (h.work / "marker").write_text("")
    skipped = h.runner({"run": step("exit 1", skipif="exists marker")})
    await skipped.start()
    assert skipped.state is State.FINISHED
    runs = h.runner({"run": step("echo ran", skipif="exists no-such-file")})
    await runs.start()
    assert await runs.wait_for({State.FINISHED}, WAIT) is State.FINISHED
    assert "[stdout] [run] ran" in h.log_text()


def test_skip_condition_parsing(tmp_path: Path) -> None:
    path = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    assert skip_condition_holds("onpath sh", path, tmp_path)
    assert not skip_condition_holds("onpath definitely-not-a-command-xyz", path, tmp_path)
    assert not skip_condition_holds("exists /definitely/not/here", path, tmp_path)
    with pytest.raises(ValueError, match="expected 'onpath"):
        skip_condition_holds("ifnot something", path, tmp_path)


# --- failures, backoff, BROKEN --------------------------------------------------------------
async def test_crash_loop_backs_off_then_goes_broken(h: Harness) -> None:
    r = h.runner({"run": step("echo crashing; exit 3")})
    await r.start()
    assert await r.wait_for({State.BROKEN}, WAIT) is State.BROKEN
    assert h.states().count(State.ERRORED) == 2
    assert h.states().count(State.STARTING) == 3
    assert r.error_count == 3
    assert r.last_error is not None and "run exited with code 3" in r.last_error
    assert "3 errors within 3600 s" in r.last_error
    # BROKEN is terminal: nothing restarts it on its own, and a plain restart does nothing
    await r.restart()
    assert r.state is State.BROKEN
    assert h.log_text().count("[stdout] [run] crashing") == 3


async def test_install_failure_retries_then_succeeds(h: Harness) -> None:
    script = 'n=$(cat n 2>/dev/null || echo 0); n=$((n+1)); echo $n > n; echo "attempt $n"; [ "$n" -ge 2 ]'
    r = h.runner({"install": step(script)})
    await asyncio.wait_for(r.install(), WAIT)
    assert r.state is State.INSTALLED
    assert h.states() == [State.ERRORED, State.INSTALLED]
    assert r.error_count == 1


async def test_install_that_always_fails_ends_broken(h: Harness) -> None:
    r = h.runner({"install": step("exit 1"), "run": step("sleep 100")})
    await asyncio.wait_for(r.install(), WAIT)
    assert r.state is State.BROKEN
    await r.start()
    assert r.state is State.BROKEN


async def test_install_timeout_kills_the_step_and_errors(h: Harness) -> None:
    r = h.runner(
        {"install": step("sleep 100 & echo $! > child.pid; wait", timeout_s=0.3)},
        restart=policy(max_errors=1),
    )
    await asyncio.wait_for(r.install(), WAIT)
    assert r.state is State.BROKEN
    assert r.last_error is not None and r.last_error.startswith("install timed out")
    child = int((h.work / "child.pid").read_text())
    assert await eventually(lambda: not alive(child))


async def test_force_restart_leaves_broken(h: Harness) -> None:
    r = h.runner({"run": step("[ -f ok ] || exit 1; exec sleep 100")}, restart=policy(max_errors=1))
    await r.start()
    assert await r.wait_for({State.BROKEN}, WAIT) is State.BROKEN
    (h.work / "ok").write_text("")
    await r.restart(force=False)
    assert r.state is State.BROKEN
    await r.restart(force=True)
    assert await r.wait_for({State.RUNNING, State.BROKEN}, WAIT) is State.RUNNING
    assert r.error_count == 0
    assert len(r.pids) == 1


async def test_recover_runs_before_the_restart(h: Harness) -> None:
    r = h.runner(
        {"run": step("[ -f recovered ] || exit 1; exec sleep 100"), "recover": step("touch recovered")}
    )
    await r.start()
    assert await eventually(lambda: h.states().count(State.RUNNING) == 2)
    assert h.states() == [State.INSTALLED, State.STARTING, State.RUNNING, State.ERRORED,
                          State.STARTING, State.RUNNING]
    assert (h.work / "recovered").exists()
    assert "[nucleus] [recover] step recover exited with code 0" in h.log_text()


async def test_backoff_waits_for_the_clock(h: Harness) -> None:
    clock = FakeClock()
    r = h.runner({"run": step("exit 1")}, restart=policy(backoff_initial_s=30, backoff_max_s=30,
                                                          backoff_jitter=0.0), clock=clock)
    await r.start()
    assert await r.wait_for({State.ERRORED}, WAIT) is State.ERRORED
    assert await eventually(lambda: clock.sleepers == 1)
    clock.advance(29.0)
    await asyncio.sleep(0.05)
    assert r.state is State.ERRORED and h.states().count(State.STARTING) == 1
    clock.advance(1.0)
    assert await eventually(lambda: h.states().count(State.STARTING) == 2)


async def test_stop_during_backoff_cancels_the_restart(h: Harness) -> None:
    clock = FakeClock()
    r = h.runner({"run": step("exit 1")}, restart=policy(backoff_initial_s=30, backoff_max_s=30), clock=clock)
    await r.start()
    assert await eventually(lambda: clock.sleepers == 1)
    await asyncio.wait_for(r.stop(reason="operator"), WAIT)
    assert r.state is State.FINISHED
    clock.advance(100.0)
    await asyncio.sleep(0.05)
    assert r.state is State.FINISHED
    assert h.states()[-2:] == [State.STOPPING, State.FINISHED]


# --- stop, restart, report_state ----------------------------------------------------------
async def test_stop_runs_shutdown_then_kills_a_term_trapping_process(h: Harness) -> None:
    run = "trap 'echo ignoring-term' TERM; echo $$ > run.pid; while true; do sleep 0.05; done"
    r = h.runner({"run": step(run), "shutdown": step('echo "shutdown saw $SHUT"', setenv={"SHUT": "yes"})})
    await r.start()
    await r.wait_for({State.RUNNING}, WAIT)
    assert await eventually(lambda: (h.work / "run.pid").exists() and bool((h.work / "run.pid").read_text()))
    pid = int((h.work / "run.pid").read_text())
    await asyncio.wait_for(r.stop(reason="test"), WAIT)
    assert r.state is State.FINISHED
    assert not alive(pid)
    assert r.pids == []
    text = h.log_text()
    assert "[stdout] [shutdown] shutdown saw yes" in text
    assert "ignoring-term" in text  # SIGTERM came first, SIGKILL after the grace
    assert r.error_count == 0  # the killed run's exit is stale, not an error
    await r.stop()  # idempotent
    assert h.states()[-2:] == [State.STOPPING, State.FINISHED]


async def test_restart_of_a_running_component_gets_a_new_process(h: Harness) -> None:
    r = h.runner({"run": step("exec sleep 100")})
    await r.start()
    await r.wait_for({State.RUNNING}, WAIT)
    assert await eventually(lambda: len(r.pids) == 1)
    first = r.pids[0]
    await asyncio.wait_for(r.restart(), WAIT)
    assert await r.wait_for({State.RUNNING}, WAIT) is State.RUNNING
    assert await eventually(lambda: len(r.pids) == 1 and r.pids[0] != first)
    assert not alive(first)
    assert h.states()[-3:] == [State.STOPPING, State.STARTING, State.RUNNING]


async def test_reported_errored_restarts_like_a_crash(h: Harness) -> None:
    r = h.runner({"run": step("exec sleep 100")})
    await r.start()
    await r.wait_for({State.RUNNING}, WAIT)
    assert await eventually(lambda: len(r.pids) == 1)
    first = r.pids[0]
    r.report_state(State.ERRORED)
    assert r.state is State.ERRORED
    assert r.last_error == "reported ERRORED by the component"
    assert await eventually(lambda: r.state is State.RUNNING and len(r.pids) == 1 and r.pids[0] != first)
    assert not alive(first)


async def test_reported_running_ends_starting(h: Harness) -> None:
    r = h.runner({"startup": step("sleep 100")})
    await r.start()
    before = r.state
    r.report_state(State.RUNNING)
    assert (before, r.state) == (State.STARTING, State.RUNNING)


# --- logs, notifications, close -----------------------------------------------------------
async def test_output_lands_in_a_size_capped_log(h: Harness) -> None:
    r = h.runner(
        {"run": step("i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done")},
        max_bytes=4096,
        backup_count=2,
    )
    await r.start()
    assert await r.wait_for({State.FINISHED, State.ERRORED}, WAIT) is State.FINISHED
    files = list(h.log_path.parent.glob("c.log*"))
    assert sum(f.stat().st_size for f in files) <= 3 * 4096
    last = tail(h.log_path, 3)
    assert last[0].endswith("[stdout] [run] line 2999")
    assert last[-1].endswith("FINISHED: run exited with code 0")


async def test_subscribe_sees_every_change(h: Harness) -> None:
    r = h.runner({"run": step("true")})
    sub = r.subscribe()
    await r.start()
    seen: list[State] = []

    async def collect() -> None:
        async for _, new, _ in sub:
            seen.append(new)
            if new is State.FINISHED:
                return

    await asyncio.wait_for(collect(), WAIT)
    assert seen == [State.INSTALLED, State.STARTING, State.RUNNING, State.FINISHED]


async def test_wait_for_times_out(h: Harness) -> None:
    r = h.runner({"run": step("exec sleep 100")})
    with pytest.raises(TimeoutError):
        await r.wait_for({State.RUNNING}, 0.05)


async def test_close_stops_processes_and_owned_tasks(h: Harness) -> None:
    r = h.runner({"startup": step("sleep 100 & echo $! > bg.pid")})
    sub = r.subscribe()
    await r.start()
    await r.wait_for({State.RUNNING}, WAIT)
    bg = int((h.work / "bg.pid").read_text())
    assert alive(bg)
    await asyncio.wait_for(r.close(), WAIT)
    assert not alive(bg)
    assert r.state is State.FINISHED
    assert r._tasks == set()
    seen = [change async for change in sub]  # ends because the runner closed
    assert seen[-1][1] is State.FINISHED
