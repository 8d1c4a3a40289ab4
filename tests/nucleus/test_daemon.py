"""Integration: a real daemon in a temporary root, real shell recipes, the real CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def write_recipe(directory: Path, name: str, version: str, *, run: str | None = None,
                 install: str | None = None, startup: str | None = None, deps: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None, artifacts: list[dict[str, Any]] | None = None,
                 extra_lifecycle: dict[str, Any] | None = None) -> Path:
    lifecycle: dict[str, Any] = {}
    if install is not None:
        lifecycle["Install"] = install
    if startup is not None:
        lifecycle["Startup"] = startup
    if run is not None:
        lifecycle["Run"] = run
    lifecycle.update(extra_lifecycle or {})
    doc: dict[str, Any] = {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentConfiguration": {"DefaultConfiguration": config or {}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": lifecycle, "Artifacts": artifacts or []}],
    }
    if deps:
        doc["ComponentDependencies"] = deps
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


SLEEPER = "echo started {configuration:/tag} >> {work:path}/starts; exec sleep 600"


def test_deploy_runs_component_and_list_shows_it(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.App", "1.0.0", run=SLEEPER, config={"tag": "v1"})
    out = daemon.cli("deploy", str(recipe))
    assert "SUCCEEDED" in out.stdout
    app = daemon.components()["test.App"]
    assert app["state"] == "RUNNING" and app["version"] == "1.0.0"
    assert len(app["pids"]) == 1 and pid_alive(app["pids"][0])
    starts = (daemon.root / "work" / "test.App" / "starts").read_text()
    assert starts.strip() == "started v1"  # {configuration:/tag} and {work:path} were interpolated
    listing = daemon.cli("list").stdout
    assert "test.App" in listing and "RUNNING" in listing
    status = json.loads(daemon.cli("status", "test.App").stdout)
    assert status["configuration"] == {"tag": "v1"}


def _component_env(daemon: Any, short_tmp: Path) -> dict[str, str]:
    script = "env > {work:path}/env.txt; exec sleep 600"
    # --settle 0: a daemon with its own settings has the default settle time; the file is waited for below
    daemon.cli("deploy", "--settle", "0", str(write_recipe(short_tmp / "r", "test.Env", "1.0.0", run=script)))
    deadline = time.monotonic() + 10
    env_file = daemon.root / "work" / "test.Env" / "env.txt"
    while not env_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


def test_component_environment_carries_ipc_socket_and_token(daemon: Any, short_tmp: Path) -> None:
    env = _component_env(daemon, short_tmp)
    assert env["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"].startswith(str(daemon.root))
    assert env["NUCLEUS_IPC_SOCKET"] == str(daemon.root / "ipc.sock")
    assert len(env["SVCUID"]) >= 32
    assert env["AWS_IOT_THING_NAME"]
    # The token is never written to the daemon's log.
    assert env["SVCUID"] not in (daemon.root / "logs" / "nucleus.log").read_text()


def test_without_the_greengrass_socket_components_are_not_told_of_one(daemon_factory: Any, short_tmp: Path) -> None:
    """With ``ipc.greengrass_socket: false`` an awsiotsdk component then fails naming the missing
    variable, not with AWS_ERROR_FILE_INVALID_PATH for a path that was never a socket."""
    env = _component_env(daemon_factory(settings={"ipc": {"greengrass_socket": False}}), short_tmp)
    assert not {k for k in env if k.startswith("AWS_GG_NUCLEUS_DOMAIN_SOCKET")}
    assert env["NUCLEUS_IPC_SOCKET"] and env["SVCUID"]  # the native socket is still there


def test_failed_update_rolls_back_to_previous_version(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    daemon.cli("deploy", str(write_recipe(d, "test.App", "1.0.0", run=SLEEPER, config={"tag": "v1"})))
    broken = write_recipe(d, "test.App", "2.0.0", run="echo broken; exit 3", config={"tag": "v2"})
    out = daemon.cli("deploy", str(broken), check=False)
    assert out.returncode == 1
    assert "FAILED_ROLLBACK_COMPLETE" in out.stderr
    assert "test.App" in out.stderr  # the reason names the component
    app = daemon.wait_state("test.App", {"RUNNING"})
    assert app["version"] == "1.0.0"
    status = json.loads(daemon.cli("status", "test.App").stdout)
    assert status["configuration"] == {"tag": "v1"}
    deployments = daemon.cli("deployments").stdout
    assert "FAILED_ROLLBACK_COMPLETE" in deployments and "SUCCEEDED" in deployments


def test_do_nothing_failure_policy_keeps_the_new_version(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    daemon.cli("deploy", str(write_recipe(d, "test.App", "1.0.0", run=SLEEPER)))
    out = daemon.cli("deploy", "--failure-policy", "do-nothing",
                     str(write_recipe(d, "test.App", "2.0.0", run="exit 3")), check=False)
    assert out.returncode == 1 and "FAILED_ROLLBACK_NOT_REQUESTED" in out.stderr
    assert daemon.components()["test.App"]["version"] == "2.0.0"


def test_digest_mismatch_fails_and_changes_nothing(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    daemon.cli("deploy", str(write_recipe(d, "test.App", "1.0.0", run=SLEEPER)))
    before = daemon.components()["test.App"]
    artifact = short_tmp / "payload.sh"
    artifact.write_text("echo hi\n")
    wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
    recipe = write_recipe(d, "test.App", "1.1.0", run="sh {artifacts:path}/payload.sh; exec sleep 600",
                          artifacts=[{"URI": artifact.as_uri(), "Digest": wrong, "Algorithm": "SHA-256"}])
    out = daemon.cli("deploy", str(recipe), check=False)
    assert out.returncode == 1
    assert "FAILED_NO_STATE_CHANGE" in out.stderr
    assert "digest" in out.stderr.lower() and "payload.sh" in out.stderr
    after = daemon.components()["test.App"]
    assert after["version"] == "1.0.0" and after["pids"] == before["pids"]
    assert not (daemon.root / "packages" / "artifacts" / "test.App" / "1.1.0").exists()


def test_verified_artifact_is_used(daemon: Any, short_tmp: Path) -> None:
    artifact = short_tmp / "payload.sh"
    artifact.write_text("echo from-artifact > \"$1\"\n")
    digest = base64.b64encode(hashlib.sha256(artifact.read_bytes()).digest()).decode()
    recipe = write_recipe(short_tmp / "r", "test.Art", "1.0.0",
                          run="sh {artifacts:path}/payload.sh {work:path}/out; exec sleep 600",
                          artifacts=[{"URI": artifact.as_uri(), "Digest": digest}])
    daemon.cli("deploy", str(recipe))
    assert (daemon.root / "work" / "test.Art" / "out").read_text().strip() == "from-artifact"


def test_malformed_recipe_names_file_and_field(daemon: Any, short_tmp: Path) -> None:
    bad = short_tmp / "bad.yaml"
    bad.write_text("RecipeFormatVersion: '2020-01-25'\nComponentName: ok.Name\nComponentVersion: 1.0.0\n"
                   "ComponentDependencies:\n  other: {VersionRequirement: '>>1'}\n")
    out = daemon.cli("deploy", str(bad), check=False)
    assert out.returncode == 1
    assert str(bad) in out.stderr and "VersionRequirement" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_dependency_fails_without_state_change(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Needy", "1.0.0", run=SLEEPER,
                          deps={"test.Missing": {"VersionRequirement": "^1.0.0"}})
    out = daemon.cli("deploy", str(recipe), check=False)
    assert out.returncode == 1
    assert "FAILED_NO_STATE_CHANGE" in out.stderr and "test.Missing" in out.stderr


def test_dependencies_start_first_and_hard_dependency_restart_restarts_dependents(
        daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    # Base is RUNNING only once its startup step has exited; a run step would count as RUNNING
    # as soon as it is launched (the Greengrass rule), before its script did anything.
    write_recipe(d, "test.Base", "1.0.0", startup="date +%s.%N >> {work:path}/t",
                 run="exec sleep 600")
    top = write_recipe(d, "test.Top", "1.0.0", run="date +%s.%N >> {work:path}/t; exec sleep 600",
                       deps={"test.Base": {"VersionRequirement": ">=1.0.0 <2.0.0", "DependencyType": "HARD"}})
    # Deploy only the dependent; the dependency is resolved from the same directory's recipes.
    daemon.cli("deploy", str(d / "test.Base-1.0.0.json"), str(top))
    comps = daemon.components()
    assert comps["test.Base"]["state"] == "RUNNING" and comps["test.Top"]["state"] == "RUNNING"
    base_t = float((daemon.root / "work" / "test.Base" / "t").read_text().split()[0])
    top_t = float((daemon.root / "work" / "test.Top" / "t").read_text().split()[0])
    assert base_t <= top_t
    top_pid = comps["test.Top"]["pids"][0]
    daemon.cli("restart", "test.Base")
    daemon.wait_state("test.Base", {"RUNNING"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        top = daemon.components()["test.Top"]
        if top["state"] == "RUNNING" and top["pids"] and top["pids"][0] != top_pid:
            break
        time.sleep(0.1)
    assert top["pids"][0] != top_pid, "HARD dependent was not restarted"
    assert not pid_alive(top_pid)


def test_crash_loop_goes_broken_and_force_restart_leaves_it(daemon: Any, short_tmp: Path) -> None:
    flag = short_tmp / "healthy"
    recipe = write_recipe(short_tmp / "r", "test.Flaky", "1.0.0",
                          run=f"test -e {flag} && exec sleep 600; exit 1")
    out = daemon.cli("deploy", "--failure-policy", "do-nothing", str(recipe), check=False)
    assert out.returncode == 1
    daemon.wait_state("test.Flaky", {"BROKEN"})
    flag.write_text("")
    daemon.cli("restart", "--force", "test.Flaky")
    daemon.wait_state("test.Flaky", {"RUNNING"})


def test_remove_component(daemon: Any, short_tmp: Path) -> None:
    daemon.cli("deploy", str(write_recipe(short_tmp / "r", "test.App", "1.0.0", run=SLEEPER)))
    pid = daemon.components()["test.App"]["pids"][0]
    daemon.cli("deploy", "--remove", "test.App")
    assert "test.App" not in daemon.components()
    assert not pid_alive(pid)


def test_status_lists_the_background_process_a_startup_step_left_and_stop_ends_it(daemon: Any,
                                                                                 short_tmp: Path) -> None:
    """Greengrass lets startup start a background process and exit; `status NAME` used to show
    `pids: []` for it, while `stop` killed it: the operator could not see what the component owned."""
    recipe = write_recipe(short_tmp / "r", "test.Bg", "1.0.0",
                          startup="sleep 600 > /dev/null 2>&1 & echo $! > {work:path}/bg.pid")
    daemon.cli("deploy", str(recipe))
    background = int((daemon.root / "work" / "test.Bg" / "bg.pid").read_text())
    assert pid_alive(background)
    status = json.loads(daemon.cli("status", "test.Bg").stdout)
    assert status["state"] == "RUNNING" and status["pids"] == []  # no step is running any more
    [group] = status["processes"]
    assert group["step"] == "startup" and group["step_exited"] is True
    assert group["pids"] == [background]
    daemon.cli("stop", "test.Bg")
    assert not pid_alive(background)
    assert json.loads(daemon.cli("status", "test.Bg").stdout)["processes"] == []


def test_a_closed_pipe_ends_a_command_quietly(daemon: Any, short_tmp: Path) -> None:
    """`nucleus deployments | head` printed a BrokenPipeError traceback once head had read enough."""
    daemon.cli("deploy", str(write_recipe(short_tmp / "r", "test.Pipe", "1.0.0", run=SLEEPER)))
    for args in (["deployments"], ["list"], ["logs", "test.Pipe"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line is written
        try:
            proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(daemon.root), *args],
                                  stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert proc.returncode == 141, (args, proc.stderr)
        assert proc.stderr == "", (args, proc.stderr)


def test_update_config_reset_then_merge(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Cfg", "1.0.0", run=SLEEPER,
                          config={"tag": "v1", "nested": {"a": 1, "b": [1, 2]}})
    daemon.cli("deploy", str(recipe))
    update = {"test.Cfg": {"MERGE": {"nested": {"b": [9]}, "extra": True}}}
    daemon.cli("deploy", "--update-config", json.dumps(update))
    cfg = json.loads(daemon.cli("status", "test.Cfg").stdout)["configuration"]
    assert cfg == {"tag": "v1", "nested": {"a": 1, "b": [9]}, "extra": True}
    reset = {"test.Cfg": {"RESET": ["/nested/b", "/extra"]}}
    daemon.cli("deploy", "--update-config", json.dumps(reset))
    cfg = json.loads(daemon.cli("status", "test.Cfg").stdout)["configuration"]
    assert cfg == {"tag": "v1", "nested": {"a": 1, "b": [1, 2]}}
    # --update-config given twice, for two components: both apply (the second replaced the first).
    other = write_recipe(short_tmp / "r", "test.Cfg2", "1.0.0", run=SLEEPER, config={"x": 0})
    daemon.cli("deploy", str(other), "--update-config", json.dumps({"test.Cfg": {"MERGE": {"tag": "v2"}}}),
               "--update-config", json.dumps({"test.Cfg2": {"MERGE": {"x": 1}}}))
    assert json.loads(daemon.cli("status", "test.Cfg").stdout)["configuration"]["tag"] == "v2"
    assert json.loads(daemon.cli("status", "test.Cfg2").stdout)["configuration"]["x"] == 1
    twice = daemon.cli("deploy", "--update-config", json.dumps({"test.Cfg": {"MERGE": {"tag": "v3"}}}),
                       "--update-config", json.dumps({"test.Cfg": {"RESET": ["/tag"]}}), check=False)
    assert twice.returncode == 1 and "test.Cfg is updated by two documents" in twice.stderr, twice.stderr
    assert json.loads(daemon.cli("status", "test.Cfg").stdout)["configuration"]["tag"] == "v2"  # nothing sent


def test_second_deploy_is_queued_and_cli_says_so(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    slow = write_recipe(d, "test.Slow", "1.0.0", install="sleep 2", run=SLEEPER)
    first = daemon.cli("deploy", "--no-wait", str(slow))
    assert "deployment" in first.stdout
    second = daemon.cli("deploy", str(write_recipe(d, "test.Other", "1.0.0", run=SLEEPER)))
    assert "queued behind 1" in second.stdout
    assert "SUCCEEDED" in second.stdout
    comps = daemon.components()
    assert comps["test.Slow"]["state"] == "RUNNING" and comps["test.Other"]["state"] == "RUNNING"


def test_step_timeout_fails_the_deployment(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Hang", "1.0.0", run=SLEEPER,
                          extra_lifecycle={"Install": {"Script": "sleep 100", "Timeout": 1}})
    out = daemon.cli("deploy", str(recipe), check=False)
    assert out.returncode == 1
    assert "test.Hang" in out.stderr


def test_logs_show_component_output(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Talk", "1.0.0",
                          run="echo hello-out; echo hello-err >&2; exec sleep 600")
    daemon.cli("deploy", str(recipe))
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = daemon.cli("logs", "test.Talk").stdout
        if "hello-out" in text and "hello-err" in text:
            break
        time.sleep(0.1)
    assert "hello-out" in text and "hello-err" in text
    # each version's first lifecycle line names it: after an update both versions' lines are in one log
    daemon.cli("deploy", str(write_recipe(short_tmp / "r", "test.Talk", "1.1.0", run="exec sleep 600")))
    text = daemon.cli("logs", "test.Talk").stdout
    assert "[lifecycle] state NEW -> INSTALLED (version 1.0.0): no install step" in text
    assert "[lifecycle] state NEW -> INSTALLED (version 1.1.0): no install step" in text


def test_logs_follow_streams_new_lines(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Tick", "1.0.0",
                          run="i=0; while [ $i -lt 200 ]; do echo tick-$i; i=$((i+1)); sleep 0.05; done; sleep 600")
    daemon.cli("deploy", str(recipe))
    proc = subprocess.Popen([sys.executable, "-m", "nucleus", "--root", str(daemon.root), "logs", "-f", "-n", "1",
                             "test.Tick"], stdout=subprocess.PIPE, text=True)
    try:
        seen: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        while len(seen) < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "tick-" in line:
                seen.append(line)
        assert len(seen) >= 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_without_daemon_says_where_it_looked(short_tmp: Path) -> None:
    root = short_tmp / "nothing-here"
    for command in (["list"], ["status", "--wait", "0.5"]):  # waiting for a daemon that never comes ends too
        out = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(root), *command],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1
        assert str(root) in lines[0] and "nucleus run" in lines[0]


def test_root_may_follow_the_subcommand(short_tmp: Path) -> None:
    """`nucleus run --root X` is how the walkthroughs (and most users) type it; it used to be refused as
    an unrecognized argument, which a trailing `&` hides. Both places work, and the later one wins."""
    import yaml

    from tests.conftest import FAST_SETTINGS

    root = short_tmp / "after"
    root.mkdir()
    (root / "nucleus.yaml").write_text(yaml.safe_dump(FAST_SETTINGS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    with (root / "daemon.out").open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nucleus", "run", "--root", str(root)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # right away, as a script would: `status --wait` gives the starting daemon time to answer
        up = subprocess.run([sys.executable, "-m", "nucleus", "status", "--wait", "30", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
        assert up.returncode == 0, (up.stderr, (root / "daemon.out").read_text())
        listed = subprocess.run([sys.executable, "-m", "nucleus", "list", "--json", "--root", str(root)],
                                capture_output=True, text=True, timeout=60, env=env)
        assert listed.returncode == 0 and json.loads(listed.stdout) == []
        elsewhere = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(short_tmp / "none"), "status",
                                    "--root", str(root)], capture_output=True, text=True, timeout=60, env=env)
        assert elsewhere.returncode == 0, elsewhere.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_configuration_update_for_a_misspelt_component_names_the_nearest(daemon: Any, short_tmp: Path) -> None:
    """It read "which is not part of the deployment", which sent the reader to add it to the deployment."""
    daemon.cli("deploy", str(write_recipe(short_tmp / "r", "test.Thermo", "1.0.0", run=SLEEPER, config={"t": 1})))
    out = daemon.cli("deploy", "--update-config", json.dumps({"test.Thermometer": {"MERGE": {"t": 2}}}), check=False)
    assert out.returncode == 1
    assert ("configuration update for test.Thermometer, which is neither deployed nor in this deployment (did you "
            "mean test.Thermo? the components after it would be: test.Thermo)") in out.stderr, out.stderr
    assert json.loads(daemon.cli("status", "test.Thermo").stdout)["configuration"] == {"t": 1}


def test_a_bad_update_config_is_refused_before_sending_naming_the_component(short_tmp: Path) -> None:
    """One prefix, the component, the entry and the fix; no daemon needed to say so."""
    for update, words in (({"com.ex.D": {"RESET": ["interval"]}}, "com.ex.D: RESET entry 'interval' is not a JSON"),
                          ({"com.ex.D": {"MERGE": 3}}, "com.ex.D: MERGE must be an object"),
                          # the key as written (it read 'threshold'), and the shape that was meant
                          ({"com.ex.D": {"Threshold": 10}}, "com.ex.D: unknown keys ['Threshold']: an update is "
                                                            '{"MERGE": {...}, "RESET": [...]}, e.g. {"com.ex.D": '
                                                            '{"MERGE": {"Threshold": ...}}}'),
                          (None, f"cannot read {short_tmp / 'nosuch.json'}: No such file")):
        arg = json.dumps(update) if update is not None else f"@{short_tmp / 'nosuch.json'}"
        out = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(short_tmp / "none"), "deploy",
                              "--update-config", arg], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stderr.strip().startswith(f"nucleus: --update-config: {words}"), out.stderr
        assert out.stderr.count("--update-config") == 1


def test_variables_of_a_dependency_deployed_alongside_resolve_without_false_warnings(daemon: Any,
                                                                                    short_tmp: Path) -> None:
    """A dependency's configuration variable resolves when both arrive in one deployment, and the log warns
    once, only for the variable that really does not resolve (it warned for both, and twice)."""
    d = short_tmp / "vars"
    out = short_tmp / "vars.out"
    write_recipe(d, "test.VarBase", "1.0.0", run="exec sleep 600", config={"greeting": "hello"})
    write_recipe(d, "test.VarUser", "1.0.0", deps={"test.VarBase": {"VersionRequirement": "1.0.0"}},
                 run=f"echo '{{test.VarBase:configuration:/greeting}} {{configuration:/nope}}' > {out}; exec sleep 600")
    daemon.cli("deploy", str(d))
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text().strip() == "hello {configuration:/nope}"
    warned = [line for line in (daemon.root / "logs" / "nucleus.log").read_text().splitlines()
              if "recipe.variable_unresolved" in line]
    assert len(warned) == 1, warned
    assert "test.VarUser" in warned[0] and "{configuration:/nope}" in warned[0]


def test_a_root_too_long_for_a_socket_is_refused_with_a_line_not_a_traceback(short_tmp: Path) -> None:
    root = short_tmp / ("r" * 110)
    out = subprocess.run([sys.executable, "-m", "nucleus", "run", "--root", str(root)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("nucleus: --root: the root is too long")
    assert "107" in out.stderr and "Traceback" not in out.stderr


def test_model_and_fleet_help_reach_their_own_parsers() -> None:
    for argv in (["model", "--help"], ["model", "-h"], ["fleet", "--help"]):
        out = subprocess.run([sys.executable, "-m", "nucleus", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: nucleus {argv[0]}"), (argv, out.stderr)


def test_stop_daemon_stops_components_in_reverse_order(daemon_factory: Any, short_tmp: Path) -> None:
    daemon = daemon_factory("ordered")
    d = short_tmp / "r"
    marker = short_tmp / "order"
    shutdown = f"echo {{name}} >> {marker}"
    write_recipe(d, "test.Low", "1.0.0", run=SLEEPER,
                 extra_lifecycle={"Shutdown": shutdown.replace("{name}", "low")})
    write_recipe(d, "test.High", "1.0.0", run=SLEEPER,
                 deps={"test.Low": {"VersionRequirement": "1.0.0"}},
                 extra_lifecycle={"Shutdown": shutdown.replace("{name}", "high")})
    daemon.cli("deploy", str(d))
    pids = [p for c in daemon.components().values() for p in c["pids"]]
    assert daemon.stop() == 0
    assert marker.read_text().split() == ["high", "low"]
    assert not any(pid_alive(p) for p in pids)


def test_updating_a_dependency_restarts_its_hard_dependents(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "r"
    write_recipe(d, "test.Lib", "1.0.0", run=SLEEPER)
    top = write_recipe(d, "test.User", "1.0.0", run=SLEEPER,
                       deps={"test.Lib": {"VersionRequirement": "^1.0.0", "DependencyType": "HARD"}})
    daemon.cli("deploy", str(d / "test.Lib-1.0.0.json"), str(top))
    user_pids = daemon.components()["test.User"]["pids"]
    out = daemon.cli("deploy", str(write_recipe(d, "test.Lib", "1.1.0", run=SLEEPER)))
    assert "restarting HARD dependents test.User" in out.stdout
    comps = daemon.components()
    assert comps["test.Lib"]["version"] == "1.1.0" and comps["test.User"]["state"] == "RUNNING"
    assert comps["test.User"]["pids"] != user_pids


def test_configuration_used_by_a_script_restarts_the_component(daemon: Any, short_tmp: Path) -> None:
    recipe = write_recipe(short_tmp / "r", "test.Tagged", "1.0.0", run=SLEEPER, config={"tag": "a"})
    daemon.cli("deploy", str(recipe))
    pids = daemon.components()["test.Tagged"]["pids"]
    daemon.cli("deploy", "--update-config", json.dumps({"test.Tagged": {"MERGE": {"tag": "b"}}}))
    comp = daemon.components()["test.Tagged"]
    assert comp["pids"] != pids and comp["state"] == "RUNNING"
    starts = (daemon.root / "work" / "test.Tagged" / "starts").read_text().split("\n")
    assert [s for s in starts if s] == ["started a", "started b"]
