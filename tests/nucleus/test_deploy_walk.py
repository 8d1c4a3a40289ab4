"""Deployments walked as an operator would: multi-component stacks on a real daemon.

Each test here comes from a defect found by running `nucleus deploy` against `nucleus run` the way
docs/recipes.md and docs/architecture.md describe it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon import write_recipe

from nucleus.recipe import parse_recipe
from nucleus.resolver import MemoryCatalog, resolve

SLEEP = "exec sleep 600"


def _log_once_it_shows(daemon: Any, name: str, text: str, lines: int) -> str:
    """The last ``lines`` of ``nucleus logs name``, read up to 50 times 0.1 s apart until they show ``text``: a run
    step's output reaches the log a moment after the component is RUNNING."""
    log = ""
    for _ in range(50):
        log = daemon.cli("logs", name, "-n", str(lines)).stdout
        if text in log:
            break
        time.sleep(0.1)
    return log


def _recipe(name: str, version: str, deps: dict[str, str] | None = None) -> Any:
    doc: dict[str, Any] = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version}
    if deps:
        doc["ComponentDependencies"] = {d: {"VersionRequirement": r} for d, r in deps.items()}
    return parse_recipe(doc, source=f"{name}-{version}")


def test_resolver_keeps_the_deployed_version_while_it_satisfies_every_requirement() -> None:
    catalog = MemoryCatalog([_recipe("A", "1.0.0", {"B": ">=1.0.0 <2.0.0"}), _recipe("C", "1.0.0", {"B": "~1.2"}),
                             *(_recipe("B", v) for v in ("1.2.5", "1.2.9", "1.2.10", "1.3.0"))])
    roots = {"g": {"A": "=1.0.0", "C": "=1.0.0"}}
    assert str(resolve(roots, catalog).version("B")) == "1.2.10"  # nothing deployed: the highest
    assert str(resolve(roots, catalog, prefer={"B": "1.2.9"}).version("B")) == "1.2.9"
    # The deployed version no longer satisfies (C now needs ~1.3): the highest that does.
    catalog.add(_recipe("C", "2.0.0", {"B": "~1.3"}))
    moved = resolve({"g": {"A": "=1.0.0", "C": "=2.0.0"}}, catalog, prefer={"B": "1.2.9"})
    assert str(moved.version("B")) == "1.3.0"


@pytest.mark.slow
def test_a_rolled_back_dependency_version_is_not_picked_by_the_next_unrelated_deployment(
        daemon: Any, short_tmp: Path) -> None:
    """B 1.1.0 failed and was rolled back, but its recipe stays in the store until the next success.
    Deploying an unrelated E used to re-resolve B to that newest recipe, restart A and B on it, fail
    and roll back again: no deployment could succeed any more. Greengrass keeps the active version."""
    deps = short_tmp / "deps"
    write_recipe(deps, "test.B", "1.0.0", run=SLEEP)
    a = write_recipe(short_tmp / "r", "test.A", "1.0.0", run=SLEEP,
                     deps={"test.B": {"VersionRequirement": ">=1.0.0 <2.0.0", "DependencyType": "HARD"}})
    daemon.cli("deploy", "--recipe-dir", str(deps), str(a))
    before = daemon.components()
    bad = write_recipe(short_tmp / "bad", "test.B", "1.1.0", run="exit 4")
    out = daemon.cli("deploy", str(bad), check=False)
    assert "FAILED_ROLLBACK_COMPLETE" in out.stderr, out.stdout + out.stderr
    b_pid = daemon.wait_state("test.B", {"RUNNING"})["pids"]
    a_pid = daemon.wait_state("test.A", {"RUNNING"})["pids"]

    out = daemon.cli("deploy", str(write_recipe(short_tmp / "e", "test.E", "1.0.0", run=SLEEP)), check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    after = daemon.components()
    assert after["test.B"]["version"] == before["test.B"]["version"] == "1.0.0"
    assert after["test.B"]["pids"] == b_pid and after["test.A"]["pids"] == a_pid  # neither touched
    assert "stopping" not in out.stdout, out.stdout

    # A dependency version the deployment brings is used: B 1.0.1 from --recipe-dir, not the stale 1.1.0.
    write_recipe(short_tmp / "deps2", "test.B", "1.0.1", run=SLEEP)
    out = daemon.cli("deploy", "--recipe-dir", str(short_tmp / "deps2"), str(a), check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    assert daemon.components()["test.B"]["version"] == "1.0.1"


def test_an_artifact_uri_without_a_scheme_is_refused_in_plain_words(short_tmp: Path) -> None:
    """A recipe author who writes a bare path got 'this: URIs are not fetched by the nucleus'."""
    from nucleus.artifacts import fetch
    from nucleus.errors import ArtifactError
    from nucleus.recipe import Artifact

    source = short_tmp / "app.zip"
    source.write_bytes(b"x")
    with pytest.raises(ArtifactError) as caught:
        fetch(Artifact(uri=str(source).lstrip("/")), short_tmp / "out" / "app.zip", component="com.example.App",
              version="1.0.0")
    text = str(caught.value)
    assert "a URI without a scheme (use file:///absolute/path) is not fetched" in text, text
    assert "this:" not in text


@pytest.mark.slow
def test_removing_a_root_that_others_still_need_says_why_it_stays(daemon: Any, short_tmp: Path) -> None:
    """`--remove B` of a root B that A depends on reported only 'nothing to change'; `--remove B`
    again (B now only a dependency) said 'not a root component' without saying who keeps it."""
    b = write_recipe(short_tmp / "r", "test.B", "1.0.0", run=SLEEP)
    a = write_recipe(short_tmp / "r", "test.A", "1.0.0", run=SLEEP,
                     deps={"test.B": {"VersionRequirement": "^1.0.0"}})
    daemon.cli("deploy", str(b), str(a))
    pid = daemon.components()["test.B"]["pids"]
    out = daemon.cli("deploy", "--remove", "test.B")
    assert "test.B is no longer a root component of group LOCAL_DEPLOYMENT but stays: needed by test.A 1.0.0" \
        in out.stdout, out.stdout
    assert daemon.components()["test.B"]["pids"] == pid
    out = daemon.cli("deploy", "--remove", "test.B", check=False)
    assert out.returncode == 1
    assert "cannot remove test.B: not a root component of group LOCAL_DEPLOYMENT (it runs as a dependency of " \
        "test.A 1.0.0)" in out.stdout, out.stdout


@pytest.mark.slow
def test_a_recipe_for_other_platforms_is_refused_naming_both_platforms(daemon: Any, short_tmp: Path) -> None:
    """It said only 'W: no manifest matches this platform': not which platform, nor what W wants."""
    path = short_tmp / "W-1.0.0.yaml"
    path.write_text('RecipeFormatVersion: "2020-01-25"\nComponentName: W\nComponentVersion: "1.0.0"\n'
                    "Manifests:\n  - Platform: {os: windows}\n    Lifecycle: {Run: echo win}\n"
                    "  - Platform: {os: darwin, architecture: amd64}\n    Lifecycle: {Run: echo mac}\n")
    out = daemon.cli("deploy", str(path), check=False)
    assert out.returncode == 1 and "FAILED_NO_STATE_CHANGE" in out.stderr, out.stdout + out.stderr
    assert "W 1.0.0: no manifest matches this platform (" in out.stderr and "os=linux" in out.stderr, out.stderr
    assert "the recipe's manifests are for: os=windows; os=darwin, architecture=amd64" in out.stderr, out.stderr


@pytest.mark.slow
def test_a_dependents_cross_component_variable_follows_its_dependencys_new_configuration(
        daemon: Any, short_tmp: Path) -> None:
    """R's Run uses {test.Q:configuration:/greeting}. Changing Q's greeting restarted Q but left R
    running on the old text, and even `nucleus restart test.R` kept it: R's lifecycle was only ever
    compared with its own configuration."""
    q = write_recipe(short_tmp / "r", "test.Q", "1.0.0", run="echo Q {configuration:/greeting}; " + SLEEP,
                     config={"greeting": "hello"})
    r = write_recipe(short_tmp / "r", "test.R", "1.0.0", run="echo R sees {test.Q:configuration:/greeting}; " + SLEEP,
                     deps={"test.Q": {"VersionRequirement": "^1.0.0", "DependencyType": "SOFT"}})
    daemon.cli("deploy", str(q), str(r))
    out = daemon.cli("deploy", "--update-config", '{"test.Q": {"MERGE": {"greeting": "bonjour"}}}')
    assert "test.R" in out.stdout, out.stdout  # stopped and started again
    daemon.wait_state("test.R", {"RUNNING"})
    log = _log_once_it_shows(daemon, "test.R", "R sees bonjour", lines=50)
    assert "R sees bonjour" in log, log


@pytest.mark.slow
def test_a_deployment_timeout_says_what_it_was_still_waiting_for(daemon: Any, short_tmp: Path) -> None:
    """`--timeout 2` over a 30 s install said 'timed out waiting for test.Slow=NEW'."""
    slow = write_recipe(short_tmp / "r", "test.Slow", "1.0.0", install="sleep 30", run=SLEEP)
    out = daemon.cli("deploy", str(slow), "--timeout", "2", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "timed out waiting for test.Slow 1.0.0, NEW: not installed yet (install step still running)" \
        in out.stderr, out.stdout + out.stderr
    assert "test.Slow" not in daemon.components()


@pytest.mark.slow
def test_upgrading_a_shared_dependency_restarts_hard_dependents_only(daemon: Any, short_tmp: Path) -> None:
    """A needs B '>=1.0.0 <2.0.0' (HARD), C needs B '~1.2' (SOFT): B resolves to the highest both
    allow; a conflicting D changes nothing; B's upgrade restarts A (after B) and leaves C alone."""
    deps = short_tmp / "deps"
    for version in ("1.0.0", "1.2.5", "1.3.0", "2.0.0"):
        write_recipe(deps, "test.B", version, run=SLEEP)
    r = short_tmp / "r"
    a = write_recipe(r, "test.A", "1.0.0", run=SLEEP,
                     deps={"test.B": {"VersionRequirement": ">=1.0.0 <2.0.0", "DependencyType": "HARD"}})
    c = write_recipe(r, "test.C", "1.0.0", run=SLEEP,
                     deps={"test.B": {"VersionRequirement": "~1.2", "DependencyType": "SOFT"}})
    daemon.cli("deploy", "--recipe-dir", str(deps), str(a), str(c))
    before = daemon.components()
    assert before["test.B"]["version"] == "1.2.5"
    d = write_recipe(r, "test.D", "1.0.0", run=SLEEP, deps={"test.B": {"VersionRequirement": ">=2.0.0"}})
    out = daemon.cli("deploy", "--recipe-dir", str(deps), str(d), check=False)
    assert "FAILED_NO_STATE_CHANGE: test.A 1.0.0 needs test.B >=1.0.0 <2.0.0, test.C 1.0.0 needs test.B ~1.2, " \
        "test.D 1.0.0 needs test.B >=2.0.0" in out.stderr, out.stderr
    assert {n: c["pids"] for n, c in daemon.components().items()} == {n: c["pids"] for n, c in before.items()}

    out = daemon.cli("deploy", str(write_recipe(r, "test.B", "1.2.9", run=SLEEP)))
    assert "stopping test.B (and HARD dependents test.A)" in out.stdout, out.stdout
    after = daemon.components()
    assert after["test.B"]["version"] == "1.2.9"
    assert after["test.A"]["pids"] != before["test.A"]["pids"]
    assert after["test.C"]["pids"] == before["test.C"]["pids"]
    a_log = daemon.cli("logs", "test.A", "-n", "20").stdout
    b_log = daemon.cli("logs", "test.B", "-n", "20").stdout
    stamp = [line.split()[0] for line in a_log.splitlines() if "STARTING -> RUNNING" in line][-1]
    b_up = [line.split()[0] for line in b_log.splitlines() if "STARTING -> RUNNING" in line][-1]
    assert b_up <= stamp  # ISO timestamps: B was up before A started again


def test_a_missing_aws_component_dependency_says_what_to_do() -> None:
    """Real recipes depend on aws.greengrass.Nucleus '>=2.4.0'; the error only said it was missing."""
    from nucleus.errors import UnknownComponentError

    catalog = MemoryCatalog([_recipe("com.example.App", "1.0.0", {"aws.greengrass.Nucleus": ">=2.4.0"})])
    with pytest.raises(UnknownComponentError) as caught:
        resolve({"g": {"com.example.App": "=1.0.0"}}, catalog)
    text = str(caught.value)
    assert text.startswith("no component aws.greengrass.Nucleus in the catalog (needed by com.example.App 1.0.0); "
                           "it is a component AWS provides to Greengrass devices"), text
    assert "--recipe-dir" in text


@pytest.mark.slow
def test_rolling_back_an_edited_same_version_recipe_puts_its_artifacts_back(daemon: Any, short_tmp: Path) -> None:
    """H 1.0.0 redeployed (same version, as docs/architecture.md allows) with a new artifact that
    fails: the rollback restored the old recipe but left the new artifact in place, so the 'rolled
    back' H ran the new code, failed, and ended BROKEN while the deployment said ROLLBACK_COMPLETE."""
    import hashlib

    paths = []
    for i, body in ((1, "echo payload v1"), (2, "echo payload v2; exit 5")):
        src = short_tmp / f"src{i}" / "payload.sh"
        src.parent.mkdir()
        src.write_text(body + "\n")
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        paths.append(write_recipe(short_tmp / f"r{i}", "test.H", "1.0.0",
                                  run="sh {artifacts:path}/payload.sh && " + SLEEP,
                                  artifacts=[{"Uri": f"file://{src}", "Digest": digest}]))
    daemon.cli("deploy", str(paths[0]))
    out = daemon.cli("deploy", str(paths[1]), check=False)
    assert "FAILED_ROLLBACK_COMPLETE" in out.stderr, out.stdout + out.stderr
    stored = daemon.root / "packages" / "artifacts" / "test.H" / "1.0.0" / "payload.sh"
    assert stored.read_text() == "echo payload v1\n"
    assert not list(stored.parent.parent.glob(".*"))  # the set-aside copy went back
    comp = daemon.wait_state("test.H", {"RUNNING"})
    time.sleep(1.0)  # a failing v2 would have exited by now (it exits at once)
    assert daemon.components()["test.H"]["pids"] == comp["pids"]
    assert daemon.cli("logs", "test.H", "-n", "3").stdout.count("payload v1") == 1


@pytest.mark.slow
def test_kill_9_during_an_edited_same_version_install_puts_its_artifacts_back(daemon: Any, short_tmp: Path) -> None:
    """The same, with the daemon killed while the edited H installs: the next start restores the
    old recipe and the old artifact together."""
    import hashlib

    paths = []
    for i, install in ((1, None), (2, "sleep 30")):
        src = short_tmp / f"src{i}" / "payload.sh"
        src.parent.mkdir()
        src.write_text(f"echo payload v{i}\n")
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        paths.append(write_recipe(short_tmp / f"r{i}", "test.H", "1.0.0", install=install,
                                  run="sh {artifacts:path}/payload.sh && " + SLEEP,
                                  artifacts=[{"Uri": f"file://{src}", "Digest": digest}]))
    daemon.cli("deploy", str(paths[0]))
    daemon.cli("deploy", "--no-wait", str(paths[1]))
    stored = daemon.root / "packages" / "artifacts" / "test.H" / "1.0.0" / "payload.sh"
    log = daemon.root / "logs" / "test.H.log"
    for _ in range(200):  # until the edited version's install runs (after APPLYING wrote its snapshot)
        if log.exists() and "step install starting" in log.read_text():  # v1 has no install step
            break
        time.sleep(0.05)
    assert stored.read_text() == "echo payload v2\n"
    daemon.kill9()
    daemon.start()
    daemon.wait_state("test.H", {"RUNNING"})
    assert stored.read_text() == "echo payload v1\n"
    assert "FAILED_ROLLBACK_COMPLETE" in daemon.cli("deployments").stdout


@pytest.mark.slow
def test_a_hard_dependent_stops_when_its_dependency_goes_broken(daemon: Any, short_tmp: Path) -> None:
    """The error that exhausts B's budget goes RUNNING -> BROKEN directly, and only ERRORED took
    HARD dependents down: A kept RUNNING on top of a BROKEN B. `restart --force` brings both back."""
    import os
    import signal

    b = write_recipe(short_tmp / "r", "test.B", "1.0.0", run=SLEEP)
    a = write_recipe(short_tmp / "r", "test.A", "1.0.0", run=SLEEP,
                     deps={"test.B": {"VersionRequirement": "^1.0.0", "DependencyType": "HARD"}})
    daemon.cli("deploy", str(b), str(a))
    for _ in range(3):  # FAST_SETTINGS: 3 errors within 60 s -> BROKEN
        pid = daemon.wait_state("test.B", {"RUNNING"})["pids"][0]
        daemon.wait_state("test.A", {"RUNNING"})
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if daemon.components()["test.B"]["pids"] != [pid]:
                break
            time.sleep(0.05)
    daemon.wait_state("test.B", {"BROKEN"})
    stopped = daemon.wait_state("test.A", {"FINISHED"}, timeout=10)
    assert stopped["pids"] == []
    assert "HARD dependency test.B is BROKEN" in daemon.cli("logs", "test.A", "-n", "5").stdout
    daemon.cli("restart", "test.B", "--force")
    daemon.wait_state("test.B", {"RUNNING"})
    daemon.wait_state("test.A", {"RUNNING"})


@pytest.mark.slow
def test_a_configuration_update_does_not_fetch_installed_artifacts_again(daemon: Any, short_tmp: Path) -> None:
    """K's artifact (no digest) came from an --artifacts directory; `--update-config` of a key its
    Run uses restarts K, and used to fetch the artifact again, without that directory: it failed."""
    art = short_tmp / "art" / "test.K" / "1.0.0"
    art.mkdir(parents=True)
    (art / "k.sh").write_text("echo from-artifact\n")
    k = write_recipe(short_tmp / "r", "test.K", "1.0.0", run="sh {artifacts:path}/k.sh; echo x={configuration:/x}; "
                     + SLEEP, config={"x": 1}, artifacts=[{"Uri": "s3://bucket/k.sh"}])
    daemon.cli("deploy", "--artifacts", str(short_tmp / "art"), str(k))
    out = daemon.cli("deploy", "--update-config", '{"test.K": {"MERGE": {"x": 2}}}', check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    log = _log_once_it_shows(daemon, "test.K", "x=2", lines=20)
    assert "x=2" in log, log


@pytest.mark.slow
def test_removing_a_root_another_group_also_deploys_names_that_group(daemon: Any, short_tmp: Path) -> None:
    """The 'stays' message of a removed root that group g2 also deploys read 'needed by ' (empty)."""
    b = write_recipe(short_tmp / "r", "test.B", "1.0.0", run=SLEEP)
    daemon.cli("deploy", str(b))
    daemon.cli("deploy", "--group", "g2", str(b))
    out = daemon.cli("deploy", "--remove", "test.B")
    assert "test.B is no longer a root component of group LOCAL_DEPLOYMENT but stays: needed by group g2" \
        in out.stdout, out.stdout
    assert daemon.components()["test.B"]["state"] == "RUNNING"


def test_a_deployment_that_names_a_broken_component_starts_it_afresh(daemon: Any, short_tmp: Path) -> None:
    """Greengrass leaves BROKEN with a new deployment. Here a configuration-only deployment to a
    BROKEN component said SUCCEEDED and left it BROKEN, and deploying its recipe again said "nothing
    to change": the operator's fix never reached it. A deployment that does not name it leaves it be."""
    import os
    import signal

    ready = short_tmp / "ready"
    ready.write_text("")
    c = write_recipe(short_tmp / "r", "test.C", "1.0.0", run=f"test -f {ready} || exit 3; {SLEEP}",
                     config={"note": 0})
    daemon.cli("deploy", str(c))

    def break_it() -> None:
        pid = daemon.wait_state("test.C", {"RUNNING"})["pids"][0]
        ready.unlink()
        os.kill(pid, signal.SIGKILL)  # then 'exit 3' twice: 3 errors (FAST_SETTINGS) -> BROKEN
        daemon.wait_state("test.C", {"BROKEN"})
        ready.write_text("")  # the operator fixes the cause

    break_it()
    out = daemon.cli("deploy", "--update-config", '{"test.C": {"MERGE": {"note": 1}}}', check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    assert daemon.components()["test.C"]["state"] == "RUNNING"

    break_it()
    out = daemon.cli("deploy", str(c), check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout and "nothing to change" not in out.stdout, out.stdout
    assert daemon.components()["test.C"]["state"] == "RUNNING"

    break_it()
    daemon.cli("deploy", str(write_recipe(short_tmp / "e", "test.E", "1.0.0", run=SLEEP)))
    assert daemon.components()["test.C"]["state"] == "BROKEN"
