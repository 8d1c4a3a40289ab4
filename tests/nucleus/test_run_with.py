"""Per-component runWith (posixUser, systemResourceLimits) on a real root daemon, enforced by the kernel.

The limits are real cgroups (v1 here: /sys/fs/cgroup/{memory,cpu}; v2 where the device has it): a
component that allocates past its memory limit is OOM-killed by the kernel, one that burns CPU gets
its quota. Users are created with useradd and removed after each test, as in test_component_user.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nucleus.cgroups import Cgroups, Limits

FAST = {
    "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.2, "max_errors": 2, "error_window_s": 60},
    "deployments": {"settle_time_s": 0.3, "default_timeout_s": 60},
    "stop_grace_s": 1.0,
}

_PROBLEM = Cgroups().problem(Limits(memory_kb=1024, cpus=0.5))
needs_cgroups = pytest.mark.skipif(_PROBLEM is not None, reason=f"cgroups not writable here: {_PROBLEM}")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to create component users")


def _recipe(directory: Path, name: str, run: str, version: str = "1.0.0") -> Path:
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
           "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": run}}]}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}.json"
    path.write_text(json.dumps(doc))
    return path


def _status(d: Any, name: str) -> dict[str, Any]:
    return json.loads(d.cli("status", name).stdout)  # type: ignore[no-any-return]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


@needs_cgroups
def test_a_component_past_its_memory_limit_is_killed_by_the_kernel_and_its_neighbour_keeps_running(
        daemon_factory: Any, short_tmp: Path) -> None:
    d = daemon_factory(settings=FAST)
    name = f"test.Hog{secrets.token_hex(2)}"
    d.cli("deploy", "--settle", "0", str(_recipe(short_tmp / "r", "test.Neighbour", "exec sleep 600")))
    neighbour = d.wait_state("test.Neighbour", {"RUNNING"})["pids"]
    # 100 MB written (so resident) against a 20 MB hard limit
    hog = _recipe(short_tmp / "r", name, "exec python3 -c \"b = b'x' * (100 * 1024 * 1024); import time; "
                  "time.sleep(600)\"")
    out = d.cli("deploy", str(hog), "--run-with", f"{name}:memory=20480", "--failure-policy", "do-nothing",
                check=False)
    assert out.returncode != 0, out.stdout
    state = d.wait_state(name, {"BROKEN"})
    assert "memory limit of 20480 KB" in (state.get("last_error") or ""), state
    log = d.cli("logs", name, "-n", "50").stdout
    assert "killed by the kernel: memory limit of 20480 KB reached" in log, log
    assert "memory limit" in out.stdout + out.stderr  # the deployment's reason says it too
    assert d.wait_state("test.Neighbour", {"RUNNING"})["pids"] == neighbour  # untouched, same process
    groups = [Path(g) for g in _status(d, name)["run_with"]["cgroups"]]
    assert groups and all(g.is_dir() for g in groups)
    limit_files = [g / f for g in groups for f in ("memory.limit_in_bytes", "memory.max") if (g / f).exists()]
    assert [f.read_text().strip() for f in limit_files] == [str(20480 * 1024)]
    d.cli("deploy", "--remove", name, "--settle", "0")
    assert not any(g.exists() for g in groups)  # removed with the component


@needs_cgroups
def test_a_cpu_limit_holds_a_busy_component_to_its_share_and_sticks_until_cleared(
        daemon_factory: Any, short_tmp: Path) -> None:
    d = daemon_factory(settings=FAST)
    name = f"test.Burn{secrets.token_hex(2)}"
    recipe = _recipe(short_tmp / "r", name, "exec python3 -c 'while True: pass'")
    d.cli("deploy", str(recipe), "--run-with", f"{name}:cpus=0.2", "--settle", "0")
    [pid] = d.wait_state(name, {"RUNNING"})["pids"]
    _wait(lambda: Path(f"/proc/{pid}/stat").exists(), "the burner runs")
    ticks, started = _cpu_ticks(pid), time.monotonic()
    time.sleep(1.5)
    used = (_cpu_ticks(pid) - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started)
    assert used < 0.5, f"{used:.0%} of a core with cpus 0.2"
    status = _status(d, name)["run_with"]
    assert status["systemResourceLimits"] == {"cpus": 0.2} and status["systemResourceLimits_from"] == "deployment"
    groups = [Path(g) for g in status["cgroups"]]
    assert groups and all(g.is_dir() for g in groups), status  # or 'its groups go' below would hold on nothing
    # A later deployment that does not mention runWith keeps it (Greengrass: it sticks)
    d.cli("deploy", "--update-config", json.dumps({name: {"MERGE": {"x": 1}}}), "--settle", "0")
    assert _status(d, name)["run_with"]["systemResourceLimits"] == {"cpus": 0.2}
    # ... until one clears it: the component restarts without limits, its groups go
    d.cli("deploy", "--run-with", f"{name}:systemResourceLimits=", "--settle", "0")
    status = _status(d, name)["run_with"]
    assert status["systemResourceLimits"] == {} and status["systemResourceLimits_from"] == "run_with_default"
    assert d.wait_state(name, {"RUNNING"})["pids"] != [pid]
    assert not any(g.exists() for g in groups)


@needs_cgroups
def test_the_device_default_limits_apply_to_components_without_their_own(daemon_factory: Any,
                                                                          short_tmp: Path) -> None:
    d = daemon_factory(settings={**FAST, "run_with_default": {"system_resource_limits": {"memory": 65536}}})
    own, default = f"test.Own{secrets.token_hex(2)}", f"test.Dflt{secrets.token_hex(2)}"
    for name in (own, default):
        d.cli("deploy", str(_recipe(short_tmp / "r", name, "exec sleep 600")), "--settle", "0",
              *(["--run-with", f"{name}:cpus=0.5"] if name == own else []))
    assert _status(d, default)["run_with"]["systemResourceLimits"] == {"memory": 65536}
    assert _status(d, own)["run_with"]["systemResourceLimits"] == {"cpus": 0.5}  # its own, as a whole
    groups = [Path(g) for n in (own, default) for g in _status(d, n)["run_with"]["cgroups"]]
    assert len(groups) == 2 and all(g.is_dir() for g in groups), groups  # one each: cpu (own), memory (default)
    [pid] = d.components()[default]["pids"]
    member_of = Path(f"/proc/{pid}/cgroup").read_text()
    assert any("/nucleus/" in line and line.endswith(f"/{default}") for line in member_of.splitlines()), member_of
    d.stop()
    assert not any(g.exists() for g in groups)  # gone with the daemon


@pytest.fixture
def two_accounts() -> Iterator[tuple[str, str, str]]:
    """The device's component user (user:group) and a second user in that group; gone afterwards."""
    suffix = secrets.token_hex(3)
    group, user, other = f"nrwg{suffix}", f"nrwa{suffix}", f"nrwb{suffix}"
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True, timeout=30)
    made: list[str] = []
    try:
        for name in (user, other):
            subprocess.run(["useradd", "--system", "--no-create-home", "--gid", group, "--shell",
                            "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=30)
            made.append(name)
        yield user, group, other
    finally:
        for name in made:
            for _ in range(50):
                if subprocess.run(["userdel", name], capture_output=True, timeout=30).returncode in (0, 6):
                    break
                time.sleep(0.1)
        subprocess.run(["groupdel", group], capture_output=True, timeout=30)


@needs_root
def test_a_component_runs_as_its_own_posix_user_while_another_runs_as_the_default(
        two_accounts: tuple[str, str, str], daemon_factory: Any, short_tmp: Path) -> None:
    user, group, other = two_accounts
    short_tmp.chmod(0o755)
    d = daemon_factory(settings={**FAST, "run_with_default": {"posix_user": f"{user}:{group}"}})
    script = "id -un > {work:path}/who; exec sleep 600"
    d.cli("deploy", str(_recipe(short_tmp / "r", "test.Default", script)), "--settle", "0")
    d.cli("deploy", str(_recipe(short_tmp / "r", "test.Own", script)), "--run-with", f"test.Own:posixUser={other}",
          "--settle", "0")
    who = {n: d.root / "work" / n / "who" for n in ("test.Default", "test.Own")}
    _wait(lambda: all(p.exists() and p.read_text().strip() for p in who.values()), "both wrote who they are")
    assert who["test.Default"].read_text().strip() == user
    assert who["test.Own"].read_text().strip() == other
    assert _status(d, "test.Own")["run_with"]["posixUser"] == f"{other}:{group}"
    # a user outside the device group: the refusal names that group (before, it said to set
    # run_with_default.posix_user, which is set), and the form it suggests works
    out = d.cli("deploy", "--run-with", "test.Own:posixUser=nobody", check=False)
    assert out.returncode != 0
    assert f"make nobody a member of it (usermod -aG {group} nobody) or run it as nobody:{group}" in out.stderr, out
    d.cli("deploy", "--run-with", f"test.Own:posixUser=nobody:{group}", "--settle", "0")
    _wait(lambda: who["test.Own"].exists() and who["test.Own"].read_text().strip() == "nobody", "runs as nobody")
    # cleared: back to the default user
    who["test.Own"].unlink()
    d.cli("deploy", "--run-with", "test.Own:posixUser=", "--settle", "0")
    _wait(lambda: who["test.Own"].exists() and who["test.Own"].read_text().strip() == user, "back to the default")


@needs_root
def test_bad_run_with_values_are_refused_naming_the_field_and_component_and_change_nothing(
        daemon_factory: Any, short_tmp: Path) -> None:
    d = daemon_factory(settings=FAST)
    recipe = _recipe(short_tmp / "r", "test.Keep", "exec sleep 600")
    d.cli("deploy", str(recipe), "--settle", "0")
    [pid] = d.wait_state("test.Keep", {"RUNNING"})["pids"]
    before = d.cli("deployments").stdout
    cases = {
        "test.Keep:memory=-5": "run_with.test.Keep.systemResourceLimits.memory",
        "test.Keep:cpus=0": "run_with.test.Keep.systemResourceLimits.cpus",
        "test.Keep:posixUser=no-such-user-nucleus": "test.Keep",
        json.dumps({"test.Keep": {"posixUser": "nobody", "windowsUser": "x"}}): "run_with.test.Keep.windowsUser",
        "test.Keep:memroy=5": "--run-with",
        # inf was taken (no limit spelled as one) and status printed "cpus": Infinity, which is not JSON
        "test.Keep:cpus=inf": "run_with.test.Keep.systemResourceLimits.cpus",
        # an empty limit sent {} (no limits at all: the other limit and the device default dropped)
        "test.Keep:memory=": "test.Keep:systemResourceLimits=",
        # more than a 64-bit word: the CLI died in msgpack with a traceback
        "test.Keep:memory=100000000000000000000000": "test.Keep: memory 100000000000000000000000 KB is more than",
        # true was read as 1: a 1 KB limit
        json.dumps({"test.Keep": {"systemResourceLimits": {"memory": True}}}):
            "run_with.test.Keep.systemResourceLimits.memory",
    }
    for option, named in cases.items():
        out = d.cli("deploy", "--run-with", option, check=False)
        assert out.returncode != 0, option
        text = out.stdout + out.stderr
        assert named in text, (option, text)
        assert "Traceback" not in text
    unknown_user = d.cli("deploy", "--run-with", "test.Keep:posixUser=no-such-user-nucleus", check=False)
    assert "runWith.posixUser" in unknown_user.stderr + unknown_user.stdout
    assert "no user 'no-such-user-nucleus'" in unknown_user.stderr + unknown_user.stdout
    # a numeric id: the advice was "useradd --system 4242420", which makes a user named 4242420
    unknown_uid = d.cli("deploy", "--run-with", "test.Keep:posixUser=4242420:4242421", check=False)
    assert "no user with uid 4242420 on this device (create one, e.g. useradd --system --uid 4242420 NAME" \
        in unknown_uid.stderr, unknown_uid
    assert d.cli("deployments").stdout == before  # none queued
    assert d.wait_state("test.Keep", {"RUNNING"})["pids"] == [pid]


@needs_cgroups
def test_groups_a_killed_daemon_left_are_removed_at_its_next_start(daemon_factory: Any, short_tmp: Path) -> None:
    d = daemon_factory(settings=FAST)
    name = f"test.Left{secrets.token_hex(2)}"
    d.cli("deploy", str(_recipe(short_tmp / "r", name, "exec sleep 600")), "--run-with", f"{name}:cpus=0.5",
          "--settle", "0")
    groups = [Path(g) for g in _status(d, name)["run_with"]["cgroups"]]
    assert groups, "no cgroup for a component with a CPU limit"  # the checks below are over these
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait(timeout=30)
    _wait(lambda: all(not (g / "cgroup.procs").read_text().strip() for g in groups), "its steps died with it")
    assert all(g.is_dir() for g in groups)  # left behind
    d.start()
    _wait(lambda: "stale_cgroups_removed" in d.log_text(), "the stale groups are removed")
    d.wait_state(name, {"RUNNING"})  # and made again for the component the restart starts


def test_limits_a_device_cannot_enforce_are_named_with_the_reason(tmp_path: Path) -> None:
    """Without a cgroup file system (an empty folder stands in for /sys/fs/cgroup), or without the
    controller a limit needs, the reason is said; no limits need nothing."""
    none = Cgroups(mount=tmp_path)
    assert none.problem(Limits()) is None
    assert "no cgroup file system" in (none.problem(Limits(memory_kb=1024)) or "")
    (tmp_path / "cpu").mkdir()
    v1 = Cgroups(mount=tmp_path)
    assert v1.problem(Limits(cpus=0.5)) is None
    assert "no cgroup v1 memory controller" in (v1.problem(Limits(memory_kb=1024)) or "")
    (tmp_path / "cpu").rmdir()
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    v2 = Cgroups(mount=tmp_path)
    assert v2.version == 2
    assert "has no memory controller" in (v2.problem(Limits(memory_kb=1024)) or "")


def test_cgroup_v2_groups_get_memory_max_and_cpu_max(tmp_path: Path) -> None:
    """The v2 writes, on a folder laid out as a unified hierarchy (files the kernel would make are
    made by hand): the controllers enabled on the way, memory.max, no swap, cpu.max."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory io\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    group = tmp_path / "nucleus" / "test.V2"
    group.mkdir(parents=True)
    (tmp_path / "nucleus" / "cgroup.subtree_control").write_text("")
    for f in ("memory.max", "memory.swap.max", "cpu.max", "cgroup.procs"):
        (group / f).write_text("")
    cg = Cgroups(mount=tmp_path)
    assert cg.apply("test.V2", Limits(memory_kb=2048, cpus=0.25)) == [group / "cgroup.procs"]
    assert (group / "memory.max").read_text() == str(2048 * 1024)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "cpu.max").read_text() == "25000 100000"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +cpu"


@needs_root
def test_a_non_root_daemon_with_default_limits_refuses_to_start_naming_the_key(short_tmp: Path) -> None:
    """Limits are never silently unenforced: a daemon that may not write the cgroups says so and stops."""
    import sys

    import yaml

    short_tmp.chmod(0o755)
    root = short_tmp / "root"
    root.mkdir()
    limits = {"run_with_default": {"system_resource_limits": {"memory": 1024}}}
    (root / "nucleus.yaml").write_text(yaml.safe_dump(limits))
    for path in (root, root / "nucleus.yaml"):
        os.chown(path, 65534, 65534)
    repo = Path(__file__).resolve().parents[2]
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    runs = None
    for argv in ([sys.executable], ["env", f"PYTHONPATH={repo}:{site}", "/usr/bin/python3"]):
        probe = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv, "-c", "import nucleus"]
        if subprocess.run(probe, capture_output=True, timeout=30, check=False, cwd="/").returncode == 0:
            runs = argv
            break
    if runs is None:
        pytest.skip("no interpreter nobody may run imports nucleus here")
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *runs, "-m",
                           "nucleus", "--root", str(root), "run"], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run_with_default.system_resource_limits: limits (memory 1024 KB) cannot be enforced" in proc.stderr
    assert "not writable by this daemon (uid 65534)" in proc.stderr
    assert not (root / "ipc.sock").exists()


@needs_cgroups
def test_two_daemons_running_a_component_of_the_same_name_each_have_their_own_groups(
        daemon_factory: Any, short_tmp: Path) -> None:
    """One daemon per trust domain is the documented way to separate components: two roots with a
    component of the same name keep their own limits, and removing it from one leaves the other's
    processes alone (before, both used nucleus/<component>: the second deployment overwrote the
    first's limits and the removal killed the other daemon's process in the shared group)."""
    name = f"test.Twin{secrets.token_hex(2)}"
    a, b = daemon_factory("a", settings=FAST), daemon_factory("b", settings=FAST)
    recipe = _recipe(short_tmp / "r", name, "exec sleep 600")
    a.cli("deploy", str(recipe), "--run-with", f"{name}:memory=65536", "--settle", "0")
    b.cli("deploy", str(recipe), "--run-with", f"{name}:memory=32768", "--settle", "0")
    [pid_a] = a.wait_state(name, {"RUNNING"})["pids"]
    b.wait_state(name, {"RUNNING"})
    [memory_a] = [Path(g) for g in _status(a, name)["run_with"]["cgroups"]]
    [memory_b] = [Path(g) for g in _status(b, name)["run_with"]["cgroups"]]
    assert memory_a != memory_b
    assert (memory_a / "memory.limit_in_bytes").read_text().strip() == str(65536 * 1024)
    assert str(pid_a) in (memory_a / "cgroup.procs").read_text().split()
    b.cli("deploy", "--remove", name, "--settle", "0")
    _wait(lambda: not memory_b.exists(), "b's group goes with its component")
    time.sleep(0.3)
    assert a.wait_state(name, {"RUNNING"})["pids"] == [pid_a] and Path(f"/proc/{pid_a}").exists()
    assert (memory_a / "memory.limit_in_bytes").read_text().strip() == str(65536 * 1024)


@needs_cgroups
def test_a_child_killed_at_the_memory_limit_while_its_parent_lives_on_is_reported(
        daemon_factory: Any, short_tmp: Path) -> None:
    """A step that forks workers: the kernel OOM-kills a worker, the step carries on. Its exit never
    says so, so the daemon watches the group's OOM count: a line in the component's log, a warning in
    the daemon's, ``oom_kills`` in ``nucleus status`` (before, nothing anywhere)."""
    d = daemon_factory(settings=FAST)
    name = f"test.Forker{secrets.token_hex(2)}"
    marker = short_tmp / "child-died"
    run = (f"python3 -c \"b = b'x' * (100 * 1024 * 1024)\" || touch {marker}; exec sleep 600")
    d.cli("deploy", str(_recipe(short_tmp / "r", name, run)), "--run-with", f"{name}:memory=30000", "--settle", "0")
    _wait(marker.exists, "the child is killed")
    [pid] = d.wait_state(name, {"RUNNING"})["pids"]
    status = _status(d, name)
    assert status["state"] == "RUNNING" and status["pids"] == [pid]
    assert status["run_with"]["oom_kills"] == 1, status["run_with"]
    _wait(lambda: "memory limit of 30000 KB reached" in d.cli("logs", name, "-n", "20").stdout, "the log says so")
    log = d.cli("logs", name, "-n", "20").stdout
    assert "the kernel killed 1 process of this component: memory limit of 30000 KB reached" in log, log
    assert "component.oom_killed" in d.log_text()


def test_limits_in_nucleus_yaml_may_be_written_with_an_exponent(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e6`` (no dot) as a string: it was refused as 'unable to parse string as an
    integer' although the user wrote a number; a fraction or a word still is refused."""
    from nucleus.settings import SystemResourceLimits, load_settings
    (tmp_path / "nucleus.yaml").write_text("run_with_default:\n  system_resource_limits: {memory: 1e6, cpus: 5e-1}\n")
    limits = load_settings(tmp_path).run_with_default.system_resource_limits
    assert (limits.memory, limits.cpus) == (1_000_000, 0.5)
    for bad in ("1.5e0", "lots", "inf"):
        with pytest.raises(ValueError, match="memory"):
            SystemResourceLimits.model_validate({"memory": bad})


@needs_cgroups
def test_status_says_when_cpus_is_not_enforced_as_written(daemon_factory: Any, short_tmp: Path) -> None:
    """cpus at least the core count is no limit, and below 0.01 the kernel's smallest quota (1 ms per
    100 ms) applies: nucleus status said cpus 64 / 0.001 as if enforced."""
    d = daemon_factory(settings=FAST)
    name = f"test.Cpus{secrets.token_hex(2)}"
    d.cli("deploy", str(_recipe(short_tmp / "r", name, "exec sleep 600")), "--run-with", f"{name}:cpus=0.001",
          "--settle", "0")
    run_with = _status(d, name)["run_with"]
    assert run_with["note"] == "cpus 0.001 is below the kernel's smallest CFS quota: enforced as 0.01", run_with
    [cpu] = [Path(g) for g in run_with["cgroups"]]
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "1000"
    listing = d.cli("list").stdout
    assert "RUN WITH" in listing and "cpus 0.001 (deployment)" in listing, listing
    d.cli("deploy", "--run-with", f"{name}:cpus=4096", "--settle", "0")
    assert f"is at least this device's {os.cpu_count()} cores: no CPU limit" in _status(d, name)["run_with"]["note"]
    d.cli("deploy", "--run-with", f"{name}:cpus=0.5", "--settle", "0")
    assert "note" not in _status(d, name)["run_with"]


@needs_root
def test_a_component_whose_user_was_deleted_goes_broken_naming_it_without_a_traceback(
        two_accounts: tuple[str, str, str], daemon_factory: Any, short_tmp: Path) -> None:
    """The user a deployment set is deleted while the daemon is down: at the next start the component
    fails naming the field and the user, and the daemon's log has the one line, not a traceback."""
    user, group, other = two_accounts
    short_tmp.chmod(0o755)
    d = daemon_factory(settings={**FAST, "run_with_default": {"posix_user": f"{user}:{group}"}})
    d.cli("deploy", str(_recipe(short_tmp / "r", "test.Gone", "exec sleep 600")),
          "--run-with", f"test.Gone:posixUser={other}", "--settle", "0")
    d.wait_state("test.Gone", {"RUNNING"})
    d.stop()
    subprocess.run(["userdel", other], check=True, capture_output=True, timeout=30)
    d.start()
    state = d.wait_state("test.Gone", {"BROKEN"})
    assert f"runWith.posixUser [test.Gone]: no user '{other}'" in (state.get("last_error") or ""), state
    assert "Traceback" not in d.log_text()


@needs_cgroups
def test_a_bootstrap_step_killed_at_the_memory_limit_fails_the_deployment_saying_so(
        daemon_factory: Any, short_tmp: Path) -> None:
    """Bootstrap runs in the component's groups like every step; killed there, the deployment's
    reason said only 'bootstrap exited with -9'."""
    d = daemon_factory(settings=FAST)
    name = f"test.Boot{secrets.token_hex(2)}"
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": "1.0.0",
           "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {
               "Bootstrap": "exec python3 -c \"b = b'x' * (100 * 1024 * 1024)\"", "Run": "exec sleep 600"}}]}
    recipe = short_tmp / f"{name}.json"
    recipe.write_text(json.dumps(doc))
    out = d.cli("deploy", str(recipe), "--run-with", f"{name}:memory=30000", check=False)
    assert out.returncode != 0
    said = f"{name}: bootstrap exited with -9 (killed by the kernel: memory limit of 30000 KB reached"
    assert said in out.stdout, out


def test_cgroup_v2_groups_of_a_daemon_root_enable_the_controllers_at_each_level(tmp_path: Path) -> None:
    """With the daemon's level (nucleus/<root>/<component>) the controllers are enabled in nucleus/
    and in the root's level too, or the component's group would have no memory.max (v2 gives a group
    only the controllers its parent enables)."""
    from nucleus.cgroups import instance_name
    (tmp_path / "cgroup.controllers").write_text("cpu memory io\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    level = tmp_path / "nucleus" / instance_name(Path("/var/lib/nucleus"))
    group = level / "test.V2"
    group.mkdir(parents=True)
    for folder in (tmp_path / "nucleus", level):
        (folder / "cgroup.subtree_control").write_text("")
    for f in ("memory.max", "cpu.max", "cgroup.procs"):
        (group / f).write_text("")
    cg = Cgroups(mount=tmp_path, instance=instance_name(Path("/var/lib/nucleus")))
    assert level.name == "var-lib-nucleus"
    assert cg.apply("test.V2", Limits(memory_kb=2048)) == [group / "cgroup.procs"]
    assert all((f / "cgroup.subtree_control").read_text() == "+memory" for f in (tmp_path, tmp_path / "nucleus", level))
    assert (group / "memory.max").read_text() == str(2048 * 1024)


@needs_cgroups
def test_a_step_that_fails_after_a_child_was_oom_killed_is_not_said_to_be_killed_itself(
        daemon_factory: Any, short_tmp: Path) -> None:
    """The step's own code says how it ended: exit 3 after the kernel killed a child is 'exited with
    code 3 (after the kernel killed 1 of its processes at its memory limit ...)', while a step killed
    itself (137, -9) keeps 'killed by the kernel'. Before, any failure after a kill in the group read
    as the step's own death."""
    d = daemon_factory(settings=FAST)
    name = f"test.After{secrets.token_hex(2)}"
    run = "python3 -c \"b = b'x' * (100 * 1024 * 1024)\"; exit 3"
    d.cli("deploy", str(_recipe(short_tmp / "r", name, run)), "--run-with", f"{name}:memory=30000",
          "--failure-policy", "do-nothing", check=False)
    error = d.wait_state(name, {"BROKEN"}).get("last_error") or ""
    assert "run exited with code 3 (after the kernel killed 1 of its processes at its memory limit of 30000 KB" \
        in error, error


@needs_root
def test_the_shutdown_of_a_component_whose_run_with_changes_runs_under_the_old_one(
        two_accounts: tuple[str, str, str], daemon_factory: Any, short_tmp: Path) -> None:
    """The deployment stops the component as it ran (its Shutdown step as the old user, in the old
    limits) and starts it under the new runWith; before, the new runWith was in force from the start
    of the stop, so the old processes' Shutdown ran as the new user (who may not own the work folder
    yet) and in the new limits."""
    user, group, other = two_accounts
    short_tmp.chmod(0o755)
    out = short_tmp / "out"
    out.mkdir()
    out.chmod(0o777)
    d = daemon_factory(settings={**FAST, "run_with_default": {"posix_user": f"{user}:{group}"}})
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": "test.Shut", "ComponentVersion": "1.0.0",
           "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {
               "Run": "exec sleep 600", "Shutdown": f"id -un >> {out}/shutdown"}}]}
    recipe = short_tmp / "shut.json"
    recipe.write_text(json.dumps(doc))
    d.cli("deploy", str(recipe), "--settle", "0")
    d.wait_state("test.Shut", {"RUNNING"})
    d.cli("deploy", "--run-with", f"test.Shut:posixUser={other}", "--settle", "0")
    assert (out / "shutdown").read_text().split() == [user]
