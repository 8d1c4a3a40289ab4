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
    comps = daemon.components()
    assert "test.App" not in comps  # the interrupted first deployment was rolled back (to nothing)
    statuses = daemon.cli("deployments").stdout
    assert "SUCCEEDED" in statuses and "FAILED_ROLLBACK_COMPLETE" in statuses


def test_kill_while_idle_restarts_same_set_without_duplicates(daemon: Any, short_tmp: Path) -> None:
    d, marks = short_tmp / "r", short_tmp / "marks"
    marks.mkdir()
    daemon.cli("deploy", str(app(d, "1.0.0", marks)))
    first = daemon.components()["test.App"]["pids"]
    daemon.kill9()
    assert all(pid_alive(p) for p in first)  # components outlive a SIGKILLed daemon...
    daemon.start()
    comp = daemon.wait_state("test.App", {"RUNNING"})
    assert not any(pid_alive(p) for p in first)  # ...until the next start cleans them up
    assert live_pids_of_marker(marks) == comp["pids"]
