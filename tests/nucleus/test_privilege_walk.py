"""Who components run as, and who can reach the daemon: the non-root cases, with real users.

A test needs a second, unprivileged user. Exec-ing the interpreter as that user is not possible
everywhere (a virtualenv under a 0700 home), so the unprivileged side is a *forked* child of the
test process that drops to ``nobody`` (uid 65534) with ``setuid`` and then runs code already
imported: a real process with a real non-root uid, as an operator's service user is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import ipc  # imported before the fork: the child cannot read the interpreter's files
import ipc.errors  # noqa: F401
import nucleus.daemon  # noqa: F401
from nucleus import cli, component_python, logconfig  # noqa: F401
from nucleus.clock import SystemClock
from nucleus.component_logs import ComponentLog
from nucleus.paths import Paths
from nucleus.runner import ComponentRunner, ComponentSpec, StepSpec
from nucleus.settings import RestartPolicy
from nucleus.states import State
from nucleus.supervisor import Supervisor, group_members

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a second, unprivileged user")


def as_user(fn: Callable[[], Any], *, uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = (),
            timeout: float = 30.0) -> dict[str, Any]:
    """Run ``fn`` in a forked child that is ``uid``/``gid`` (no other groups unless given).

    Returns ``{"value": ...}`` or ``{"error": "Type: message"}``, and what the child wrote to stderr.
    """
    read_fd, write_fd = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_fd)
            os.close(err_read)
            os.dup2(err_write, 2)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0, closefd=False), write_through=True)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            try:
                out: dict[str, Any] = {"value": fn()}
            except BaseException as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stderr.flush()
            os.write(write_fd, json.dumps(out, default=str).encode())
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    os.close(err_write)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"the child as uid {uid} did not finish in {timeout} s")
    with os.fdopen(read_fd, "rb") as r, os.fdopen(err_read, "rb") as e:
        raw, stderr = r.read(), e.read().decode(errors="replace")
    result: dict[str, Any] = json.loads(raw) if raw else {"error": "the child reported nothing"}
    result["stderr"] = stderr
    return result


def reachable(path: Path) -> None:
    """Let other users traverse ``path`` (the test's temporary directory is 0700)."""
    path.chmod(0o755)


def test_cli_of_a_user_who_cannot_reach_the_root_says_so_in_one_line(short_tmp: Path) -> None:
    reachable(short_tmp)
    root = short_tmp / "root"
    root.mkdir(mode=0o700)  # a root daemon's root: owner-only

    result = as_user(lambda: cli.main(["--root", str(root), "list"]))

    assert result.get("value") == 1, result
    assert "Traceback" not in result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, result["stderr"]
    assert f"cannot reach {root / 'ipc.sock'}: permission denied" in lines[0]


@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_run_on_a_root_of_another_user_is_refused_naming_the_path_and_both_users(short_tmp: Path,
                                                                                  mode: int) -> None:
    reachable(short_tmp)
    root = short_tmp / "root"
    root.mkdir(mode=mode)  # first run by root, now by a service user
    (root / "nucleus.yaml").write_text("stop_grace_s: 1\n")

    result = as_user(lambda: cli.main(["--root", str(root), "run"]))

    assert result.get("value") == 1, result
    assert "Traceback" not in result["stderr"]
    line = result["stderr"].strip()
    assert str(root) in line
    assert "nobody (uid 65534)" in line
    if mode == 0o755:
        assert "owned by root (uid 0)" in line


def test_a_socket_group_that_does_not_exist_is_refused_naming_the_setting(short_tmp: Path) -> None:
    root = short_tmp / "root"
    root.mkdir()
    (root / "nucleus.yaml").write_text(yaml.safe_dump({"ipc": {"socket_group": "no-such-group-nucleus"}}))

    proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(root), "run"],
                          capture_output=True, text=True, timeout=60)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ipc.socket_group: no group named 'no-such-group-nucleus'" in proc.stderr
    assert not (root / "ipc.sock").exists()


def test_a_socket_group_the_daemon_user_is_not_in_is_refused_before_start(short_tmp: Path) -> None:
    reachable(short_tmp)
    root = short_tmp / "root"
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)
    (root / "nucleus.yaml").write_text(yaml.safe_dump({"ipc": {"socket_group": "root"}}))

    result = as_user(lambda: cli.main(["--root", str(root), "run"]), timeout=60)

    assert result.get("value") == 1, result
    assert "Traceback" not in result["stderr"]
    assert "ipc.socket_group: this daemon runs as nobody (uid 65534), which is not a member of group 'root'" \
        in result["stderr"]
    assert not (root / "ipc.sock").exists()


def _connect(path: Path) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        return f"{type(exc).__name__}"
    finally:
        sock.close()
    return "connected"


def test_members_of_the_socket_group_reach_both_sockets_and_others_do_not(daemon_factory: Any,
                                                                          short_tmp: Path) -> None:
    reachable(short_tmp)
    group = "nogroup"  # gid 65534 on Debian
    d = daemon_factory(settings={"ipc": {"socket_group": group}, "stop_grace_s": 1.0})
    assert oct(d.socket.stat().st_mode & 0o777) == oct(0o660)
    assert json.loads(d.cli("status").stdout)["user"] == "root"  # who every step runs as

    member = as_user(lambda: [_connect(d.root / "ipc.sock"), _connect(d.root / "gg.sock")],
                     gid=NOBODY, groups=(NOBODY,))
    stranger = as_user(lambda: _connect(d.root / "ipc.sock"), gid=54321)

    assert member.get("value") == ["connected", "connected"], member
    assert stranger.get("value") == "PermissionError", stranger
    # The root lets the group search it, not list it, and the private folders stay private.
    assert oct(d.root.stat().st_mode & 0o777) == oct(0o710)
    assert oct((d.root / "run").stat().st_mode & 0o777) == oct(0o700)
    assert as_user(lambda: [p.name for p in d.root.iterdir()], groups=(NOBODY,))["error"].startswith("PermissionError")
    # Every name in a root is well known: a member reaches the sockets and nothing else, not the
    # logs (components print what they print), the recipes, the work folders or nucleus.yaml.
    for known in ("logs", "packages/recipes", "work"):
        seen = as_user(lambda known=known: [p.name for p in (d.root / known).iterdir()], groups=(NOBODY,))
        assert seen.get("error", "").startswith("PermissionError"), (known, seen)
    settings = as_user((d.root / "nucleus.yaml").read_text, groups=(NOBODY,))
    assert settings.get("error", "").startswith("PermissionError"), settings


class _Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []

    def write(self, line: str, *, stream: str = "stdout", step: str = "") -> None:
        self.lines.append((stream, step, line))


def test_requires_privilege_on_a_non_root_nucleus_is_said_in_the_component_log(short_tmp: Path) -> None:
    reachable(short_tmp)
    work = short_tmp / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)

    def step() -> Any:
        sink = _Lines()

        async def run() -> int | None:
            supervisor = Supervisor(stop_grace_s=1.0)
            result = await supervisor.run_step("com.example.Priv", "install", "id -u", {"PATH": "/usr/bin:/bin"},
                                               work, 20, sink, requires_privilege=True)
            await supervisor.close()
            return result.exit_code

        with contextlib.redirect_stdout(io.StringIO()):
            code = asyncio.run(run())
        return {"code": code, "lines": sink.lines}

    result = as_user(step)

    value = result.get("value")
    assert value is not None, result
    assert value["code"] == 0
    assert ["stdout", "install", str(NOBODY)] in value["lines"]
    assert ["nucleus", "install",
            "RequiresPrivilege: the nucleus is not root, so step install runs as nobody"] in value["lines"]


def _setuid_escalator(directory: Path) -> Path | None:
    """A setuid-root copy of setpriv: what ``sudo`` is to a step, without a sudoers file. None where
    it does not work (no setpriv, a nosuid mount)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    copy = directory / "escalate"
    shutil.copy(setpriv, copy)
    copy.chmod(0o4755)
    def uid_after_escalating() -> str:
        argv = [str(copy), "--reuid=0", "--regid=0", "--clear-groups", "id", "-u"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()

    probe = as_user(uid_after_escalating)
    return copy if probe.get("value") == "0" else None


def test_a_stop_that_leaves_a_process_the_nucleus_may_not_signal_says_so(short_tmp: Path) -> None:
    reachable(short_tmp)
    escalate = _setuid_escalator(short_tmp)
    if escalate is None:
        pytest.skip("no setuid helper possible here (setpriv missing or a nosuid /tmp)")
    work = short_tmp / "work"
    work.mkdir()
    logs = short_tmp / "logs"
    logs.mkdir()
    for d in (work, logs):
        os.chown(d, NOBODY, NOBODY)
    script = f"{escalate} --reuid=0 --regid=0 --clear-groups sleep 30 & exec sleep 31"

    def stop_it() -> Any:
        async def run() -> list[int]:
            spec = ComponentSpec(name="com.example.Sudo", version="1.0.0", steps={"run": StepSpec(script)},
                                 env={"PATH": "/usr/bin:/bin"}, work_dir=work)
            supervisor = Supervisor(stop_grace_s=0.2)
            runner = ComponentRunner(spec, supervisor, ComponentLog(logs / "c.log", max_bytes=1 << 20, backup_count=1),
                                     RestartPolicy(), clock=SystemClock())
            await runner.start()
            await runner.wait_for({State.RUNNING}, timeout=10)
            for _ in range(1500):  # bounded, 30 s: the root process is up once the group has two members
                if len(group_members(supervisor.pgids(spec.name)[0])) == 2:
                    break
                await asyncio.sleep(0.02)
            await runner.stop()
            left = [pid for pgid in supervisor.pgids(spec.name) for pid in group_members(pgid)]
            await runner.close()
            return left

        with contextlib.redirect_stdout(io.StringIO()):
            left = asyncio.run(run())
        return {"left": left, "log": (logs / "c.log").read_text()}

    result = as_user(stop_it)
    value = result.get("value")
    assert value is not None, result
    try:
        assert len(value["left"]) == 1, value  # the root sleep: the nucleus (nobody) cannot end it
        assert f"processes left running, which the nucleus may not signal: {value['left'][0]} (root)" in value["log"]
    finally:
        for pid in value["left"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_a_skipif_path_the_nucleus_may_not_stat_runs_the_step_and_says_why(short_tmp: Path) -> None:
    reachable(short_tmp)
    private = short_tmp / "private"
    private.mkdir(mode=0o700)  # root's: nobody may not look inside
    work = short_tmp / "work"
    logs = short_tmp / "logs"
    for d in (work, logs):
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
    skipif = f"exists {private / 'installed'}"

    def install() -> Any:
        async def run() -> str:
            spec = ComponentSpec(name="com.example.Skip", version="1.0.0",
                                 steps={"install": StepSpec("echo installing", skipif=skipif)},
                                 env={"PATH": "/usr/bin:/bin"}, work_dir=work)
            runner = ComponentRunner(spec, Supervisor(stop_grace_s=0.2),
                                     ComponentLog(logs / "c.log", max_bytes=1 << 20, backup_count=1),
                                     RestartPolicy(), clock=SystemClock())
            try:
                async with asyncio.timeout(10):
                    await runner.install()
            finally:
                state = str(runner.state)
                await runner.close()
            return state

        with contextlib.redirect_stdout(io.StringIO()):
            state = asyncio.run(run())
        return {"state": state, "log": (logs / "c.log").read_text()}

    result = as_user(install)

    value = result.get("value")
    assert value is not None, result  # without the fix: PermissionError out of install(), the component in NEW
    assert value["state"] == "INSTALLED"
    assert f"Skipif {skipif!r} cannot be checked (Permission denied); the step runs" in value["log"]
    assert "installing" in value["log"]


def test_a_second_daemon_of_another_user_on_a_running_root_is_refused(daemon_factory: Any,
                                                                       short_tmp: Path) -> None:
    reachable(short_tmp)
    root = short_tmp / "root"
    Paths.at(root).ensure()  # a service user's root...
    for path in (root, *root.rglob("*")):
        os.chown(path, NOBODY, NOBODY)
    d = daemon_factory(settings={"stop_grace_s": 1.0})  # ...in which root started a daemon (sudo)

    result = as_user(lambda: cli.main(["--root", str(root), "run"]), timeout=60)

    assert result.get("value") == 1, result  # without the fix: PermissionError at run/nucleus.pid
    assert "Traceback" not in result["stderr"]
    assert f"a nucleus (pid {d.proc.pid}, user root) is already running with this root" in result["stderr"]
    assert d.cli("status").returncode == 0


def _interpreter_usable_by_nobody() -> bool:
    real = os.path.realpath(sys.executable)
    return as_user(lambda: os.access(real, os.X_OK)).get("value") is True


needs_venv_and_reachable_python = pytest.mark.skipif(
    sys.prefix == sys.base_prefix, reason="the daemon runs on a system interpreter: no components' Python")


@needs_venv_and_reachable_python
def test_a_service_user_daemon_uses_the_components_python_root_made(short_tmp: Path) -> None:
    if not _interpreter_usable_by_nobody():
        pytest.skip("this interpreter is not usable by other users here (a virtualenv under a 0700 home)")
    reachable(short_tmp)
    venv = short_tmp / "venv"  # the daemon's virtualenv, installed by root
    venv.mkdir()
    made = component_python.ensure(venv)
    assert made == venv / "component-python" / "bin"

    seen = as_user(lambda: str(component_python.ensure(venv)), timeout=60)

    assert seen.get("value") == str(made), seen  # without the fix: None (the lock file is root's)


@needs_venv_and_reachable_python
def test_a_service_user_daemon_makes_the_components_python_in_its_root(short_tmp: Path) -> None:
    if not _interpreter_usable_by_nobody():
        pytest.skip("this interpreter is not usable by other users here (a virtualenv under a 0700 home)")
    reachable(short_tmp)
    venv = short_tmp / "venv"  # root's, and nobody made the environment in it yet
    venv.mkdir()
    root = short_tmp / "root"
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)

    seen = as_user(lambda: str(component_python.ensure(venv, fallback=root)), timeout=120)

    assert seen.get("value") == str(root / "component-python" / "bin"), seen
    assert (root / "component-python" / "bin" / "python3").exists()
    assert (root / "component-python").stat().st_uid == NOBODY
