"""`kill -9` of the daemon at several points of a deployment: after the next start the
device runs the old set or the new set, never a mix, and queued deployments survive."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon import pid_alive, write_recipe

pytestmark = pytest.mark.slow


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def running_versions(daemon: Any) -> dict[str, str]:
    return {n: c["version"] for n, c in daemon.components().items() if c["state"] in ("RUNNING", "FINISHED")}


def live_pids_of_marker(marker_dir: Path) -> list[int]:
    """PIDs recorded by component processes (one file per start), still alive."""
    pids = []
    for f in marker_dir.glob("pid-*"):
        pid = int(f.read_text().split()[0])
        if pid_alive(pid):
            pids.append(pid)
    return pids


def app(d: Path, version: str, marks: Path, *, install: str | None = None, run_extra: str = "") -> Path:
    run = f"echo $$ > {marks}/pid-{version}-$$; {run_extra} exec sleep 600"
    return write_recipe(d, "test.App", version, run=run, install=install, config={"v": version})


def test_kill_during_install_of_new_version_restores_old_set(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", str(app(d, "1.0.0", marks)))
    daemon.cli("deploy", "--no-wait", str(app(d, "2.0.0", marks, install=f"touch {marks}/installing; sleep 60")))
    wait_for(marks / "installing")
    daemon.kill9()
    daemon.start()
    comp = daemon.wait_state("test.App", {"RUNNING"})
    assert comp["version"] == "1.0.0"
    deployments = daemon.cli("deployments").stdout
    assert "FAILED_ROLLBACK_COMPLETE" in deployments
    cfg = json.loads(daemon.cli("status", "test.App").stdout)["configuration"]
    assert cfg == {"v": "1.0.0"}
    live = live_pids_of_marker(marks)
    assert live == comp["pids"], f"stale processes survived: {live} vs {comp['pids']}"


def test_kill_while_new_version_settles_restores_old_set(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", str(app(d, "1.0.0", marks)))
    daemon.cli("deploy", "--no-wait", "--settle", "60",
               str(app(d, "2.0.0", marks, run_extra=f"touch {marks}/v2-running;")))
    wait_for(marks / "v2-running")
    daemon.kill9()
    daemon.start()
    comp = daemon.wait_state("test.App", {"RUNNING"})
    assert comp["version"] == "1.0.0"
    assert live_pids_of_marker(marks) == comp["pids"]


def test_kill_after_commit_keeps_new_set(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", str(app(d, "1.0.0", marks)))
    daemon.cli("deploy", str(app(d, "2.0.0", marks)))
    daemon.kill9()
    daemon.start()
    comp = daemon.wait_state("test.App", {"RUNNING"})
    assert comp["version"] == "2.0.0"
    assert live_pids_of_marker(marks) == comp["pids"]


def test_queued_deployment_survives_kill(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", "--no-wait", str(app(d, "1.0.0", marks, install=f"touch {marks}/installing; sleep 60")))
    other = write_recipe(d, "test.Other", "1.0.0", run="exec sleep 600")
    queued = daemon.cli("deploy", "--no-wait", str(other)).stdout
    assert "queued behind 1" in queued
    wait_for(marks / "installing")
    daemon.kill9()
    daemon.start()
    daemon.wait_state("test.Other", {"RUNNING"})
    deadline = time.monotonic() + 30
    statuses = ""
    while "SUCCEEDED" not in statuses and time.monotonic() < deadline:
        statuses = daemon.cli("deployments").stdout
        time.sleep(0.1)
    assert "SUCCEEDED" in statuses and "FAILED_ROLLBACK_COMPLETE" in statuses
    comps = daemon.components()
    assert "test.App" not in comps  # the interrupted first deployment was rolled back (to nothing)


def test_kill_while_idle_restarts_same_set_without_duplicates(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", str(app(d, "1.0.0", marks)))
    first = daemon.components()["test.App"]["pids"]
    daemon.kill9()
    daemon.start()
    comp = daemon.wait_state("test.App", {"RUNNING"})
    # Direct children die with the daemon (PDEATHSIG); anything else is killed at the next start.
    assert not any(pid_alive(p) for p in first)
    assert live_pids_of_marker(marks) == comp["pids"]


def test_grandchildren_left_by_a_killed_daemon_are_cleaned_up_at_next_start(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    run = f"sleep 600 & echo $! > {marks}/grandchild; exec sleep 600"
    daemon.cli("deploy", str(write_recipe(d, "test.Forker", "1.0.0", run=run)))
    wait_for(marks / "grandchild")
    grandchild = int((marks / "grandchild").read_text())
    daemon.kill9()
    assert pid_alive(grandchild)  # nothing killed it: its parent's death does not reach it
    (marks / "grandchild").unlink()
    daemon.start()
    daemon.wait_state("test.Forker", {"RUNNING"})
    deadline = time.monotonic() + 10
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)
