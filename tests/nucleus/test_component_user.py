"""run_with_default.posix_user: a root daemon runs components as a component user, with real users.

Each test that needs one creates a user and a group with ``useradd``/``groupadd`` and removes them
at the end; so they run as root only. The component is a real deployment on a real daemon: it
reports who it runs as, what it may write and read, and whether it reaches the IPC bus.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nucleus.errors import ConfigurationError
from nucleus.settings import load_settings

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root and useradd to create a component user")

FAST = {
    "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_errors": 3, "error_window_s": 60},
    "deployments": {"settle_time_s": 0.5, "default_timeout_s": 60},
    "stop_grace_s": 1.0,
}
REPO = Path(__file__).resolve().parents[2]


def _delete(command: str, name: str) -> None:
    """userdel refuses a user that still has processes (a component the daemon is stopping)."""
    for _ in range(50):
        if subprocess.run([command, name], capture_output=True, timeout=30, check=False).returncode in (0, 6):
            return  # 6: no such user/group
        time.sleep(0.1)
    raise AssertionError(f"{command} {name} kept failing: remove it by hand")


@pytest.fixture
def account() -> Iterator[tuple[str, str]]:
    """A fresh system user in a fresh group, both gone after the test. Ask for it before
    daemon_factory, so that the daemon (and every process of that user) is gone first."""
    suffix = secrets.token_hex(3)
    user, group = f"nucu{suffix}", f"nucg{suffix}"
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--gid", group, "--shell", "/usr/sbin/nologin",
                        user], check=True, capture_output=True, timeout=30)
        try:
            yield user, group
        finally:
            _delete("userdel", user)
    finally:
        _delete("groupdel", group)


def _reachable(path: Path) -> None:
    """Let other users traverse the test's temporary directory (mkdtemp makes it 0700)."""
    path.chmod(0o755)


def _sdk_python(user: str, group: str) -> tuple[list[str], str] | None:
    """An interpreter the component user can import the SDK with, as ``env`` words for its script.

    The test's own virtualenv may live under a 0700 home (/root), where other users cannot execute
    it; then the system python3 of the same version with the repository and the virtualenv's
    site-packages on PYTHONPATH (both readable) stands in for it. None if neither works.
    """
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    candidates = [([sys.executable], ""),
                  (["/usr/bin/python3"], f"PYTHONPATH={REPO}:{site}")]
    for argv, env in candidates:
        probe = ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--", "env",
                 *([env] if env else []), *argv, "-c", "import ipc"]
        try:
            if subprocess.run(probe, capture_output=True, timeout=30, check=False, cwd="/").returncode == 0:
                return argv, env
        except OSError:
            continue
    return None


SDK_SCRIPT = """
import asyncio, sys
from ipc import Client
async def main():
    async with Client.from_env() as c:
        value = await c.get_configuration(["tag"])
    open(sys.argv[1], "w").write("connected " + str(value))
asyncio.run(main())
"""


def _recipe(directory: Path, name: str, lifecycle: dict[str, Any], artifacts: list[dict[str, Any]] | None = None,
            config: dict[str, Any] | None = None) -> Path:
    doc = {
        "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": config or {}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": lifecycle, "Artifacts": artifacts or []}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-1.0.0.json"
    path.write_text(json.dumps(doc))
    return path


def _artifact(path: Path, **extra: Any) -> dict[str, Any]:
    digest = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"URI": path.as_uri(), "Digest": digest, **extra}


def _wait_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_components_run_as_the_component_user_with_their_own_work_folder_and_read_only_artifacts(
        account: tuple[str, str], daemon_factory: Any, short_tmp: Path) -> None:
    user, group = account
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    _reachable(short_tmp)
    src = short_tmp / "src"
    src.mkdir()
    (src / "payload.txt").write_text("artifact content\n")
    with zipfile.ZipFile(src / "bundle.zip", "w") as zf:
        zf.writestr("inner.txt", "unarchived content\n")
    d = daemon_factory(settings={**FAST, "run_with_default": {"posix_user": f"{user}:{group}"}})
    root = d.root
    sdk = _sdk_python(user, group)
    if sdk is not None:
        argv, env = sdk
        (src / "sdk.py").write_text(SDK_SCRIPT)
        gg = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        sdk_line = (f"{env} {' '.join(argv)} {src / 'sdk.py'} $W/sdk 2> $W/sdk.err; "
                    f"if {' '.join(argv)} -c '{gg}' {root}/gg.sock; then echo connected; else echo refused; fi > $W/gg")
    else:
        sdk_line = ": no interpreter"
    d.cli("deploy", str(_recipe(short_tmp / "r", "test.Other",
                                {"Run": "echo other > {work:path}/secret; exec sleep 600"})))
    private = ["nucleus.yaml", "logs/nucleus.log", "logs/test.Other.log", "config/test.Other.json",
               "run/cli.token", "db/nucleus.db"]
    run = "\n".join([
        "W={work:path}",
        "id -u > $W/uid; id -g > $W/gid; echo $HOME > $W/home",
        "touch $W/touched",
        "if echo x >> {artifacts:path}/payload.txt; then echo writable; else echo denied; fi > $W/artifact_write",
        "if touch {artifacts:path}/new; then echo writable; else echo denied; fi > $W/artifact_create",
        "if chmod u+w {artifacts:path}/payload.txt; then echo changed; else echo denied; fi > $W/artifact_chmod",
        "cat {artifacts:path}/payload.txt > $W/artifact_read",
        "cat {artifacts:decompressedPath}/bundle/inner.txt > $W/unarchived_read",
        *(f"if cat {root}/{p} > /dev/null; then echo '{p} open'; else echo '{p} closed'; fi >> $W/private"
          for p in private),
        *(f"if ls {root}/{p} > /dev/null; then echo '{p} open'; else echo '{p} closed'; fi >> $W/private"
          for p in ("logs", "packages/recipes", "config", "work")),
        sdk_line,
        "echo done > $W/done",
        "exec sleep 600",
    ])
    lifecycle = {"Install": {"Script": "id -u > {work:path}/install_uid", "RequiresPrivilege": True},
                 "Bootstrap": {"Script": "id -u > {work:path}/bootstrap_uid", "RequiresPrivilege": True}, "Run": run}
    recipe = _recipe(short_tmp / "r", "test.User", lifecycle, config={"tag": "v1"},
                     artifacts=[_artifact(src / "payload.txt"), _artifact(src / "bundle.zip", Unarchive="ZIP")])
    assert "SUCCEEDED" in d.cli("deploy", str(recipe)).stdout
    work = root / "work" / "test.User"
    _wait_file(work / "done")

    def seen(name: str) -> str:
        return (work / name).read_text().strip()

    assert seen("uid") == str(uid) and seen("gid") == str(gid)
    assert seen("install_uid") == "0"  # RequiresPrivilege: root
    assert seen("bootstrap_uid") == "0"  # the deployment runs Bootstrap, and it obeys RequiresPrivilege too
    assert (work / "touched").stat().st_uid == uid
    assert work.stat().st_uid == uid and oct(work.stat().st_mode & 0o777) == oct(0o700)
    assert seen("artifact_write") == "denied"
    assert seen("artifact_create") == "denied"
    assert seen("artifact_chmod") == "denied"
    assert seen("artifact_read") == "artifact content"
    assert seen("unarchived_read") == "unarchived content"
    assert seen("private").splitlines() == [f"{p} closed" for p in
                                            [*private, "logs", "packages/recipes", "config", "work"]]
    # The sockets are the component group's; the root lets it search, not list.
    for sock in ("ipc.sock", "gg.sock"):
        st = (root / sock).stat()
        assert st.st_gid == gid and oct(st.st_mode & 0o777) == oct(0o660), sock
    assert root.stat().st_gid == gid and oct(root.stat().st_mode & 0o777) == oct(0o710)
    assert json.loads(d.cli("status").stdout)["component_user"] == f"{user}:{group}"
    pid = d.components()["test.User"]["pids"][0]
    d.cli("stop", "test.User")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()  # the root daemon ends the component user's processes
    if sdk is None:
        pytest.skip("no interpreter the component user may run imports the SDK here; the rest passed")
    assert seen("sdk") == "connected v1", (work / "sdk.err").read_text()  # Client.from_env() as that user
    assert seen("gg") == "connected"  # the Greengrass socket (awsiotsdk) too


def _refused(root: Path, settings: dict[str, Any]) -> str:
    root.mkdir(exist_ok=True)
    (root / "nucleus.yaml").write_text(yaml.safe_dump(settings))
    proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(root), "run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (root / "ipc.sock").exists()
    return proc.stderr


def test_a_component_user_or_group_that_does_not_exist_is_refused_at_start(account: tuple[str, str],
                                                                            short_tmp: Path) -> None:
    user, _group = account
    out = _refused(short_tmp / "a", {"run_with_default": {"posix_user": "no-such-user-nucleus"}})
    assert "run_with_default.posix_user: no user 'no-such-user-nucleus' on this device" in out
    out = _refused(short_tmp / "b", {"run_with_default": {"posix_user": f"{user}:no-such-group-nucleus"}})
    assert "run_with_default.posix_user: no group 'no-such-group-nucleus' on this device" in out


def test_a_component_user_outside_the_socket_group_is_refused_at_start(account: tuple[str, str],
                                                                        short_tmp: Path) -> None:
    user, group = account
    out = _refused(short_tmp / "a", {"run_with_default": {"posix_user": f"{user}:{group}"},
                                     "ipc": {"socket_group": "nogroup"}})
    assert f"run_with_default.posix_user: components run as {user}, which is not a member of " \
           "ipc.socket_group 'nogroup'" in out


def test_a_non_root_daemon_with_a_component_user_is_refused_at_start(account: tuple[str, str],
                                                                     short_tmp: Path) -> None:
    user, _group = account
    _reachable(short_tmp)
    root = short_tmp / "root"
    root.mkdir()
    (root / "nucleus.yaml").write_text(yaml.safe_dump({"run_with_default": {"posix_user": user}}))
    for path in (root, root / "nucleus.yaml"):
        os.chown(path, 65534, 65534)
    # as nobody: the system python3 runs the repository's nucleus when the venv's is out of reach
    sdk = _sdk_python("nobody", "nogroup")
    if sdk is None:
        pytest.skip("no interpreter nobody may run imports nucleus here")
    argv, env = sdk
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "env",
                           *([env] if env else []), *argv, "-m", "nucleus", "--root", str(root), "run"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("run_with_default.posix_user: this daemon runs as nobody (uid 65534), not root, so it cannot run "
            "components as another user") in proc.stderr
    assert not (root / "ipc.sock").exists()


@pytest.mark.parametrize("value", ["a:", ":g", "a:b:c", "a b"])
def test_a_malformed_posix_user_is_refused_naming_the_key(short_tmp: Path, value: str) -> None:
    (short_tmp / "nucleus.yaml").write_text(yaml.safe_dump({"run_with_default": {"posix_user": value}}))
    with pytest.raises(ConfigurationError, match=r"run_with_default\.posix_user: must be 'user' or 'user:group'"):
        load_settings(short_tmp)


def test_without_the_setting_components_run_as_the_daemon_user(daemon_factory: Any, short_tmp: Path) -> None:
    d = daemon_factory(settings=FAST)
    d.cli("deploy", str(_recipe(short_tmp / "r", "test.Me", {"Run": "id -u > {work:path}/uid; exec sleep 600"})))
    assert _wait_file(d.root / "work" / "test.Me" / "uid").strip() == "0"
    assert oct(d.root.stat().st_mode & 0o777) == oct(0o700)
    assert json.loads(d.cli("status").stdout)["component_user"] == "root"
    with contextlib.suppress(Exception):
        d.cli("stop", "test.Me")
