"""Defects found walking component lifecycles as a user would, each pinned with real processes
(``sh -c`` steps, a real supervisor, real component logs)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from runner_harness import WAIT, Harness, alive, eventually
from test_daemon import write_recipe

from nucleus.runner import ComponentRunner, StepSpec
from nucleus.states import State

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups via /proc")

def pids_file(h: Harness) -> list[int]:
    path = h.work / "bg.pids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


# A run step that leaves a background process and exits 0: the component is FINISHED, and its
# group (listed by `nucleus status NAME` under `processes`) still runs.
LEAVES_A_CHILD = "sleep 60 & echo $! >> bg.pids; echo parent-exits"


async def finished_with_a_leftover(h: Harness) -> tuple[ComponentRunner, int]:
    r = h.runner({"run": StepSpec(script=LEAVES_A_CHILD)})
    await r.start()
    assert await r.wait_for({State.FINISHED, State.ERRORED}, WAIT) is State.FINISHED
    assert await eventually(lambda: len(pids_file(h)) == 1)
    child = pids_file(h)[0]
    assert alive(child)
    return r, child


async def test_stop_of_a_finished_component_ends_what_its_run_left_running(h: Harness) -> None:
    r, child = await finished_with_a_leftover(h)
    await asyncio.wait_for(r.stop(), WAIT)
    assert await eventually(lambda: not alive(child), 2.0), "stop left the run's background process running"
    assert r.state is State.FINISHED
    assert r._supervisor.pgids("c") == []


async def test_restart_of_a_finished_component_does_not_start_a_second_copy_beside_the_first(h: Harness) -> None:
    r, first = await finished_with_a_leftover(h)
    await asyncio.wait_for(r.restart(), WAIT)
    assert await r.wait_for({State.FINISHED, State.ERRORED}, WAIT) is State.FINISHED
    assert await eventually(lambda: len(pids_file(h)) == 2)
    second = pids_file(h)[1]
    assert alive(second)
    assert not alive(first), "restart started a new run beside the old run's background process"
    assert "state FINISHED -> STOPPING: restart requested" in h.log_text()


async def test_closing_the_runner_as_the_daemon_does_at_shutdown_leaves_no_orphan(h: Harness) -> None:
    r, child = await finished_with_a_leftover(h)
    await asyncio.wait_for(r.close(), WAIT)
    assert await eventually(lambda: not alive(child), 2.0), "the daemon's shutdown left a FINISHED component's process"


async def test_stop_and_restart_of_a_finished_component_without_leftovers_change_nothing(h: Harness) -> None:
    r = h.runner({"run": StepSpec(script="echo done")})
    await r.start()
    assert await r.wait_for({State.FINISHED, State.ERRORED}, WAIT) is State.FINISHED
    await asyncio.wait_for(r.stop(), WAIT)
    assert [new for _, _, new, _ in h.changes] == [State.INSTALLED, State.STARTING, State.RUNNING, State.FINISHED]


# --- the daemon ---------------------------------------------------------------------------------
def test_a_bootstrap_restart_keeps_the_thing_name_given_on_the_command_line(daemon_factory: Any,
                                                                             short_tmp: Path) -> None:
    """`nucleus run --thing-name walkthing`, then a bootstrap step's exit 100: the daemon re-executed
    itself without the flag and came back as the host name, so the next run step saw another
    {iot:thingName} and AWS_IOT_THING_NAME."""
    d = daemon_factory(start=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    with d.out.open("ab") as out:
        d.proc = subprocess.Popen([sys.executable, "-m", "nucleus", "--root", str(d.root), "run",
                                   "--thing-name", "walkthing"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (d.socket.exists() and d.cli("status", check=False, timeout=10).returncode == 0):
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log_text()
        time.sleep(0.05)
    marks = short_tmp / "marks"
    marks.mkdir()
    bootstrap = f"if [ -e {marks}/booted ]; then exit 0; fi; touch {marks}/booted; exit 100"
    recipe = write_recipe(short_tmp / "r", "test.Boot", "1.0.0",
                          run=f"echo thing={{iot:thingName}} env=$AWS_IOT_THING_NAME > {marks}/seen; sleep 60",
                          extra_lifecycle={"Bootstrap": bootstrap})
    out = d.cli("deploy", str(recipe), check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + d.log_text()
    assert (marks / "booted").exists()
    assert json.loads(d.cli("status").stdout)["thing_name"] == "walkthing"
    assert (marks / "seen").read_text() == "thing=walkthing env=walkthing\n"


async def test_after_a_restart_the_old_runs_exit_is_logged_before_the_new_run_starts(h: Harness) -> None:
    """The log read `step run starting` and then the old run's `step run exited with code -15`, as if the
    new run had been killed."""
    r = h.runner({"run": StepSpec(script="echo up; while :; do echo tick; seq 1 3000; done")},
                 max_bytes=1 << 26)  # no rotation while it chatters
    for n in range(3):
        await r.start() if r.state is State.NEW else await asyncio.wait_for(r.restart(), WAIT)
        assert await r.wait_for({State.RUNNING}, WAIT) is State.RUNNING
        assert await eventually(lambda up=n + 1: h.log_text().count("] up\n") == up)
        await asyncio.sleep(0.2)  # its output fills the pipe while it is killed
    lines = [line.split("] ", 2)[-1] for line in h.log_text().splitlines() if "[nucleus] [run]" in line]
    assert lines == ["step run starting", "step run exited with code -15"] * 2 + ["step run starting"], lines


def test_a_component_that_cannot_be_started_does_not_stop_the_daemon_from_starting(daemon: Any,
                                                                                   short_tmp: Path) -> None:
    """A deployment without rollback left a component whose Timeout reads its configuration ("abc"):
    the deployment failed, as it should, but at the next `nucleus run` the engine died on that
    component and the daemon stopped, every time."""
    d = short_tmp / "r"
    good = write_recipe(d, "test.Good", "1.0.0", run="sleep 60")
    bad = write_recipe(d, "test.Bad", "1.0.0", config={"t": "abc"},
                       extra_lifecycle={"Run": {"Script": "sleep 60", "Timeout": "{configuration:/t}"}})
    needs_bad = write_recipe(d, "test.NeedsBad", "1.0.0", run="sleep 60",
                             deps={"test.Bad": {"DependencyType": "HARD"}})
    daemon.cli("deploy", str(good))
    out = daemon.cli("deploy", "--failure-policy", "do-nothing", str(bad), str(needs_bad), check=False)
    assert out.returncode != 0 and "Timeout 'abc' is not a number" in out.stdout + out.stderr
    assert daemon.stop() == 0
    daemon.start()  # raised "daemon exited with 0" before
    assert daemon.wait_state("test.Good", {"RUNNING"})["state"] == "RUNNING"
    log = daemon.log_text()
    assert "component.not_started" in log and "Timeout 'abc' is not a number" in log
    assert "its HARD dependency test.Bad was not started" in log
    assert "NeedsBad" not in {c for c, e in daemon.components().items() if e["state"] == "RUNNING"}


def test_logs_follow_goes_on_across_a_daemon_restart(daemon: Any, short_tmp: Path) -> None:
    """`nucleus logs NAME -f` ended with CONNECTION_CLOSED (exit 1) when the daemon stopped, though the
    component's log went on as soon as the daemon was back."""
    recipe = write_recipe(short_tmp / "r", "test.Chat", "1.0.0",
                          run="echo up; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.02; done")
    daemon.cli("deploy", str(recipe))
    out_path = short_tmp / "follow.out"
    with out_path.open("wb") as out:
        follower = subprocess.Popen([sys.executable, "-m", "nucleus", "--root", str(daemon.root), "logs",
                                     "test.Chat", "-f", "-n", "1"], stdout=out, stderr=subprocess.PIPE)

    def after_restart() -> str:
        return out_path.read_text().partition("nucleus shutting down")[2]

    try:
        deadline = time.monotonic() + 30
        while "tick" not in out_path.read_text():
            assert time.monotonic() < deadline and follower.poll() is None, out_path.read_text()
            time.sleep(0.05)
        assert daemon.stop() == 0
        daemon.start()
        while "tick 2\n" not in after_restart():
            assert time.monotonic() < deadline and follower.poll() is None, out_path.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        follower.kill()
        follower.wait(timeout=10)
    assert "] up\n" in after_restart() and "state INSTALLED -> STARTING" in after_restart()
    lines = out_path.read_text().splitlines()
    assert len(lines) == len(set(lines)), "a line was printed twice"


def test_the_component_log_says_how_its_bootstrap_step_ended(daemon: Any, short_tmp: Path) -> None:
    """Every step's start and end are in `nucleus logs NAME` except bootstrap's: a failed bootstrap showed
    only its own output there, and its exit code only in the deployment."""
    recipe = write_recipe(short_tmp / "r", "test.BadBoot", "1.0.0", run="sleep 60",
                          extra_lifecycle={"Bootstrap": "echo booting; exit 7"})
    out = daemon.cli("deploy", str(recipe), check=False)
    assert out.returncode == 1 and "bootstrap exited with 7" in out.stderr
    log = daemon.cli("logs", "test.BadBoot").stdout
    assert "[nucleus] [bootstrap] step bootstrap starting" in log
    assert "[stdout] [bootstrap] booting" in log
    assert "[nucleus] [bootstrap] step bootstrap exited with code 7" in log


def test_logs_lines_0_prints_none_and_a_negative_count_is_refused(daemon: Any, short_tmp: Path) -> None:
    """`nucleus logs NAME -n 0` printed the last 50 lines (0 read as "not given"), so `-n 0 -f` could not
    show only new lines; `-n -3` printed nothing and said nothing."""
    recipe = write_recipe(short_tmp / "r", "test.Lines", "1.0.0", run="seq 1 80; sleep 60")
    daemon.cli("deploy", str(recipe))
    deadline = time.monotonic() + 20
    while "] 80\n" not in daemon.cli("logs", "test.Lines").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert daemon.cli("logs", "test.Lines", "-n", "0").stdout == ""
    assert daemon.cli("logs", "test.Lines", "-n", "3").stdout.splitlines()[-1].endswith("] 80")
    assert len(daemon.cli("logs", "test.Lines").stdout.splitlines()) == 50
    bad = daemon.cli("logs", "test.Lines", "-n", "-3", check=False)
    assert bad.returncode != 0 and "-n/--lines" in bad.stderr and "0 or more" in bad.stderr


def test_a_damaged_stored_recipe_does_not_stop_the_daemon_from_starting(daemon: Any, short_tmp: Path) -> None:
    """A stored recipe that no longer parses (a disk error, an edit by hand) stopped the engine at the
    next `nucleus run` (nucleus.engine_crashed, and the daemon exited 0): nothing ran on the device."""
    d = short_tmp / "r"
    daemon.cli("deploy", str(write_recipe(d, "test.Good", "1.0.0", run="sleep 60")),
               str(write_recipe(d, "test.Damaged", "1.0.0", run="sleep 60")),
               str(write_recipe(d, "test.NeedsDamaged", "1.0.0", run="sleep 60",
                                deps={"test.Damaged": {"DependencyType": "HARD"}})))
    assert daemon.stop() == 0
    (daemon.root / "packages" / "recipes" / "test.Damaged@1.0.0.json").write_text("{not json")
    daemon.start()  # raised "daemon exited with 0" before
    assert daemon.wait_state("test.Good", {"RUNNING"})["state"] == "RUNNING"
    log = daemon.log_text()
    assert "deployment.recipe_unreadable" in log and "test.Damaged" in log and "JSON syntax error" in log
    assert "its HARD dependency test.Damaged was not started" in log
    assert daemon.components().get("test.NeedsDamaged", {}).get("state") != "RUNNING"
