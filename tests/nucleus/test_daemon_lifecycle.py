"""More of the core on a real daemon: bootstrap restarts, reboot requests, SOFT dependencies,
store cleanup after success, Greengrass name/version limits, `nucleus recipe validate`."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon import write_recipe

pytestmark = pytest.mark.slow

SLEEP = "exec sleep 600"


def test_bootstrap_exit_100_restarts_the_nucleus_and_the_deployment_completes(daemon: Any,
                                                                             short_tmp: Path) -> None:
    marks = short_tmp / "marks"
    marks.mkdir()
    # Exit 100 the first time only, as a real bootstrap (e.g. a kernel module install) would.
    bootstrap = f"if [ -e {marks}/booted ]; then exit 0; fi; touch {marks}/booted; exit 100"
    recipe = write_recipe(short_tmp / "r", "test.Boot", "1.0.0", run=SLEEP,
                          extra_lifecycle={"Bootstrap": bootstrap})
    old_pid = int((daemon.root / "run" / "nucleus.pid").read_text())
    daemon.cli("deploy", "--no-wait", str(recipe))
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline:
        probe = daemon.cli("deployments", check=False)
        status = probe.stdout
        if "SUCCEEDED" in status:
            break
        time.sleep(0.2)
    assert "SUCCEEDED" in status, status + daemon.log_text()
    new_pid = int((daemon.root / "run" / "nucleus.pid").read_text())
    assert new_pid == old_pid  # the daemon re-executed itself in place (same PID, fresh process image)
    log = (daemon.root / "logs" / "nucleus.log").read_text()
    assert log.count("nucleus.started") == 2
    assert daemon.components()["test.Boot"]["state"] == "RUNNING"


def test_deploy_says_the_outcome_is_unknown_when_the_nucleus_does_not_come_back(daemon: Any,
                                                                               short_tmp: Path) -> None:
    """A nucleus killed mid-deployment: `deploy` said "the nucleus is restarting (as a bootstrap step asked)",
    then "no nucleus daemon answering ... start one with", while the deployment is resumed or rolled back
    when the nucleus starts again."""
    started = short_tmp / "installing"
    recipe = write_recipe(short_tmp / "r", "test.Slow", "1.0.0", run=SLEEP,
                          extra_lifecycle={"Install": f"touch {started}; sleep 30"})
    proc = subprocess.Popen([sys.executable, "-m", "nucleus", "--root", str(daemon.root), "deploy",
                             "--restart-wait", "1", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the install step never started"
            time.sleep(0.05)
        daemon.kill9()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "the connection to the nucleus closed (a bootstrap step's restart, or the nucleus stopped)" in out
    assert "outcome unknown: the nucleus did not come back within 1 s" in err and "Traceback" not in err, err
    assert "restarting (as a bootstrap step asked)" not in out


def test_deploy_follows_its_deployment_across_the_restart_a_bootstrap_asks_for(daemon: Any, short_tmp: Path) -> None:
    """`nucleus deploy` (waiting) used to end with CONNECTION_CLOSED, exit 1, while the deployment went on to
    succeed after the restart; it now reconnects and reports the outcome, each progress line once."""
    marks = short_tmp / "marks"
    marks.mkdir()
    bootstrap = f"if [ -e {marks}/booted ]; then exit 0; fi; touch {marks}/booted; exit 100"
    recipe = write_recipe(short_tmp / "r", "test.Boot2", "1.0.0", run=SLEEP,
                          extra_lifecycle={"Bootstrap": bootstrap})
    out = daemon.cli("deploy", str(recipe), check=False, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr + daemon.log_text()
    assert "the connection to the nucleus closed" in out.stdout and out.stdout.rstrip().endswith("SUCCEEDED")
    progress = [line for line in out.stdout.splitlines() if line.startswith("  ") and "connection" not in line]
    assert len(progress) == len(set(progress))  # nothing printed twice after reconnecting
    assert daemon.components()["test.Boot2"]["state"] == "RUNNING"


def test_bootstrap_exit_101_reboot_is_logged_not_executed(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Reboot", "1.0.0", run=SLEEP,
                          extra_lifecycle={"Bootstrap": "exit 101"})
    out = daemon.cli("deploy", str(recipe))
    assert "reboot" in out.stdout and "not executed" in out.stdout
    assert daemon.components()["test.Reboot"]["state"] == "RUNNING"


def test_bootstrap_failure_fails_the_deployment(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.BadBoot", "1.0.0", run=SLEEP,
                          extra_lifecycle={"Bootstrap": "exit 7"})
    out = daemon.cli("deploy", str(recipe), check=False)
    assert out.returncode == 1 and "bootstrap exited with 7" in out.stderr


def test_soft_dependency_never_blocks(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    write_recipe(d, "test.Slowdep", "1.0.0", startup="sleep 3")
    write_recipe(d, "test.Soft", "1.0.0", run=SLEEP,
                       deps={"test.Slowdep": {"VersionRequirement": "^1.0.0", "DependencyType": "SOFT"}})
    daemon.cli("deploy", "--no-wait", "--recipe-dir", str(d), "--merge", "test.Soft=1.0.0")
    comp = daemon.wait_state("test.Soft", {"RUNNING"}, timeout=10)
    assert daemon.components()["test.Slowdep"]["state"] == "STARTING"
    assert comp["state"] == "RUNNING"


def test_unused_versions_are_removed_after_success_and_rollback_versions_kept(daemon: Any,
                                                                              short_tmp: Path) -> None:
    d = short_tmp / "r"
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        daemon.cli("deploy", str(write_recipe(d, "test.App", version, run=SLEEP)))
    recipes = sorted(p.name for p in (daemon.root / "packages" / "recipes").iterdir())
    assert recipes == ["test.App@2.0.0.json", "test.App@3.0.0.json"]
    # 2.0.0 is kept because a rollback of the last deployment needs it.
    out = daemon.cli("deploy", str(write_recipe(d, "test.App", "4.0.0", run="exit 1")), check=False)
    assert "FAILED_ROLLBACK_COMPLETE" in out.stderr
    assert daemon.wait_state("test.App", {"RUNNING"})["version"] == "3.0.0"


@pytest.mark.parametrize(("name", "version", "field"), [
    ("bad name with spaces", "1.0.0", "ComponentName"),
    ("a" * 129, "1.0.0", "ComponentName"),
    ("test.Long", "1.0.0-" + "x" * 64, "ComponentVersion"),
])
def test_greengrass_name_and_version_limits(daemon: Any, short_tmp: Path, name: str, version: str,
                                             field: str) -> None:
    d = short_tmp / "r"
    d.mkdir()
    path = d / "recipe.yaml"
    path.write_text(f"RecipeFormatVersion: '2020-01-25'\nComponentName: '{name}'\nComponentVersion: '{version}'\n")
    out = daemon.cli("deploy", str(path), check=False)
    assert out.returncode == 1
    assert str(path) in out.stderr and field in out.stderr


def test_recipe_validate_reports_every_invalid_corpus_file(shared_dir: Path) -> None:
    corpus = shared_dir / "corpus" / "greengrass-recipes"
    rows = list(csv.DictReader((corpus / "MANIFEST.tsv").open(), delimiter="\t"))
    invalid = [corpus / r["file"] for r in rows if "invalid" in r["features"].split(",")]
    valid = [corpus / r["file"] for r in rows if r["runnable_locally"] == "yes"][:5]
    out = subprocess.run([sys.executable, "-m", "nucleus", "recipe", "validate", *map(str, invalid + valid)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert len(lines) == len(invalid) + len(valid)
    for path, line in zip(invalid, lines, strict=False):
        assert line.startswith("INVALID") and str(path) in line, line
    assert all(line.startswith("ok") for line in lines[len(invalid):])


def test_recipe_validate_takes_a_directory_as_deploy_does(short_tmp: Path) -> None:
    d = short_tmp / "recipes"
    d.mkdir()
    (d / "good.yaml").write_text("RecipeFormatVersion: '2020-01-25'\nComponentName: A\nComponentVersion: '1.0.0'\n")
    (d / "bad.yaml").write_text("RecipeFormatVersion: '2020-01-25'\nComponentName: B\nComponentVersion: 'x'\n")
    (d / "notes.txt").write_text("not a recipe")
    (short_tmp / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "nucleus", "recipe", "validate", str(d), str(short_tmp / "empty")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    bad = next(line for line in lines if str(d / "bad.yaml") in line)
    assert bad.startswith("INVALID") and "ComponentVersion" in bad
    assert any(line.startswith("INVALID") and "empty: no recipe files" in line for line in lines)
    assert any(line.startswith("ok") and str(d / "good.yaml") in line for line in lines)


def test_a_failed_edit_of_the_same_version_leaves_the_deployed_recipe(daemon: Any, short_tmp: Path) -> None:
    """Redeploying an edited recipe under the same version (as local development does) that fails must
    put the stored recipe back: the rollback loaded the broken one, and so did the next daemon start."""
    from nucleus.paths import Paths

    good = write_recipe(short_tmp / "good", "test.Same", "1.0.0", run=SLEEP)
    daemon.cli("deploy", str(good))
    stored = Paths.at(daemon.root).recipe_file("test.Same", "1.0.0")
    before = stored.read_text()
    broken = write_recipe(short_tmp / "broken", "test.Same", "1.0.0", run="exit 1")
    out = daemon.cli("deploy", str(broken), check=False)
    assert out.returncode == 1 and "FAILED_ROLLBACK_COMPLETE" in out.stderr, out.stderr
    assert stored.read_text() == before
    assert daemon.wait_state("test.Same", {"RUNNING"})["state"] == "RUNNING"
    # ... and when it fails before touching anything (an artifact that is not there), the same
    unfetchable = write_recipe(short_tmp / "unfetchable", "test.Same", "1.0.0", run="exit 1",
                               artifacts=[{"URI": "s3://bucket/missing.bin"}])
    out = daemon.cli("deploy", str(unfetchable), check=False)
    assert out.returncode == 1 and "FAILED_NO_STATE_CHANGE" in out.stderr, out.stderr
    assert stored.read_text() == before
    daemon.stop()
    daemon.start()  # what a restart loads is the recipe that was deployed
    assert daemon.wait_state("test.Same", {"RUNNING"})["state"] == "RUNNING"
