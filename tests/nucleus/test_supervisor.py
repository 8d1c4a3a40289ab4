"""The supervisor with real processes: groups, timeouts, signals, log pumping, orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner_harness import alive

from nucleus.supervisor import (
    _PDEATHSIG_WRAPPER,
    OrphanRecord,
    Supervisor,
    group_members,
    kill_orphans,
    parent_guard,
    process_start_time,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups via /proc")


class ListSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, str]] = []

    def write(self, line: str, *, stream: str = "stdout", step: str = "") -> None:
        self.records.append((stream, step, line))

    def lines(self, stream: str = "stdout") -> list[str]:
        return [ln for s, _, ln in self.records if s == stream]


async def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not alive(pid)


def env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", -9)])
async def test_run_step_reports_exit_code(tmp_path: Path, script: str, code: int) -> None:
    sup = Supervisor(stop_grace_s=0.2)
    result = await sup.run_step("c", "install", script, env(), tmp_path, 10.0, ListSink())
    assert (result.exit_code, result.timed_out) == (code, False)
    assert result.ok is (code == 0)


async def test_env_cwd_and_streams_reach_the_log(tmp_path: Path) -> None:
    sink = ListSink()
    sup = Supervisor()
    script = 'echo "foo=$FOO"; pwd; printf "err1\\nerr-partial" >&2; printf "no newline"'
    result = await sup.run_step("c", "startup", script, {**env(), "FOO": "bar"}, tmp_path, 10.0, sink)
    assert result.exit_code == 0
    assert sink.lines("stdout") == ["foo=bar", str(tmp_path), "no newline"]
    assert sink.lines("stderr") == ["err1", "err-partial"]
    assert {step for _, step, _ in sink.records} == {"startup"}


async def test_step_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    sup = Supervisor(stop_grace_s=0.2)
    script = "sleep 100 & echo $! > child.pid; wait"
    result = await sup.run_step("c", "install", script, env(), tmp_path, 0.3, ListSink())
    assert result.timed_out and result.exit_code is None
    child = int((tmp_path / "child.pid").read_text())
    assert await gone(child), "the step's child outlived the timeout"
    assert sup.pgids("c") == []


async def test_terminate_escalates_to_sigkill_for_a_process_that_traps_term(tmp_path: Path) -> None:
    sink = ListSink()
    sup = Supervisor()
    script = "trap 'echo got-term' TERM; echo ready; while true; do sleep 0.05; done"
    handle = await sup.spawn("c", "run", script, env(), tmp_path, sink)
    for _ in range(200):
        if "ready" in sink.lines():
            break
        await asyncio.sleep(0.01)
    code = await handle.terminate(0.3)
    assert code == -signal.SIGKILL
    assert "got-term" in sink.lines(), "SIGTERM should have been delivered first"
    assert not alive(handle.pid)


async def test_terminate_is_quick_for_a_cooperative_process(tmp_path: Path) -> None:
    sup = Supervisor()
    handle = await sup.spawn("c", "run", "exec sleep 100", env(), tmp_path)
    assert await handle.terminate(30.0) == -signal.SIGTERM


async def test_kill_all_ends_groups_left_behind_by_finished_steps(tmp_path: Path) -> None:
    spawned: list[tuple[str, int, int]] = []
    exited: list[tuple[str, int, int]] = []
    sup = Supervisor(
        stop_grace_s=0.2, on_spawn=lambda *a: spawned.append(a), on_exit=lambda *a: exited.append(a)
    )
    # startup leaves a background process behind and exits 0
    result = await sup.run_step("c", "startup", "sleep 100 & echo $! > bg.pid", env(), tmp_path, 10.0)
    assert result.exit_code == 0
    bg = int((tmp_path / "bg.pid").read_text())
    assert alive(bg)
    assert sup.pgids("c") == [spawned[0][2]]
    assert sup.pids("c") == []  # the leader exited
    assert sup.processes("c") == [{"step": "startup", "pgid": spawned[0][2], "step_exited": True, "pids": [bg]}]
    assert [r.pgid for r in sup.records()] == sup.pgids("c")
    await sup.kill_all("c")
    assert await gone(bg)
    assert sup.pgids("c") == []
    assert sup.processes("c") == []
    assert exited == spawned


async def test_missing_cwd_is_a_launch_error(tmp_path: Path) -> None:
    sup = Supervisor()
    with pytest.raises(OSError):
        await sup.run_step("c", "install", "true", env(), tmp_path / "nope", 5.0)


async def test_requires_privilege_runs_as_the_current_user(tmp_path: Path) -> None:
    sink = ListSink()
    sup = Supervisor()
    result = await sup.run_step("c", "install", "id -u", env(), tmp_path, 5.0, sink, requires_privilege=True)
    assert result.exit_code == 0
    assert sink.lines() == [str(os.getuid())]


async def test_cancelled_step_kills_its_group(tmp_path: Path) -> None:
    sup = Supervisor()
    task = asyncio.create_task(
        sup.run_step("c", "install", "echo $$ > me.pid; exec sleep 100", env(), tmp_path, None)
    )
    pidfile = tmp_path / "me.pid"
    for _ in range(300):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gone(pid)


# --- orphans from a previous daemon run ---------------------------------------------------
def start_group(script: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/bin/sh", "-c", script], cwd=cwd, start_new_session=True)


def test_kill_orphans_kills_a_group_whose_leader_is_the_recorded_process(tmp_path: Path) -> None:
    proc = start_group("exec sleep 100", tmp_path)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        assert kill_orphans([OrphanRecord(proc.pid, proc.pid, start)]) == [proc.pid]
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_kill_orphans_spares_a_reused_pid(tmp_path: Path) -> None:
    proc = start_group("exec sleep 100", tmp_path)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        assert kill_orphans([(proc.pid, proc.pid, start - 1)]) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_kill_orphans_does_not_count_a_zombie_leader_as_an_orphan(tmp_path: Path) -> None:
    """After a kill -9 of the daemon its steps' shells stay zombies until PID 1 reaps them; a restart
    within that time logged them as orphans killed, as if components had outlived the daemon."""
    proc = start_group("exec sleep 100", tmp_path)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        os.kill(proc.pid, signal.SIGKILL)  # not reaped: a zombie, as under a slow PID 1
        for _ in range(500):
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                break
            time.sleep(0.01)
        assert stat[stat.rfind(")") + 2] == "Z"
        assert kill_orphans([OrphanRecord(proc.pid, proc.pid, start)]) == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("reaped", [True, False], ids=["leader-reaped", "leader-zombie"])
def test_kill_orphans_kills_survivors_of_a_dead_leader(tmp_path: Path, reaped: bool) -> None:
    proc = start_group("sleep 100 & echo $! > child.pid; wait", tmp_path)
    pidfile = tmp_path / "child.pid"
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        for _ in range(300):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.01)
        child = int(pidfile.read_text())
        proc.kill()  # the daemon's PDEATHSIG took the shell, the child survived
        if reaped:
            proc.wait()
        for _ in range(500):
            if group_members(proc.pid) == [child]:
                break
            time.sleep(0.01)
        assert group_members(proc.pid) == [child]
        assert kill_orphans([(proc.pid, proc.pid, start)]) == [proc.pid]
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)
    finally:
        if pidfile.exists():
            with_pid = int(pidfile.read_text() or 0)
            if with_pid and alive(with_pid):
                os.kill(with_pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


# --- the kernel kills a step's shell when the daemon dies ---------------------------------
DAEMON = """
import asyncio, os, sys
from pathlib import Path
from nucleus.supervisor import Supervisor, _PDEATHSIG_WRAPPER

async def main():
    sup = Supervisor()
    if sys.argv[1] == "wrapper":
        sup._prefix = [sys.executable, "-S", "-c", _PDEATHSIG_WRAPPER, str(os.getpid())]
    h = await sup.spawn("c", "run", "exec sleep 100", {"PATH": os.environ["PATH"]}, Path("."))
    print("PID", h.pid, flush=True)
    await asyncio.sleep(100)

asyncio.run(main())
"""


@pytest.mark.parametrize("mechanism", ["setpriv", "wrapper"])
async def test_step_dies_with_the_daemon(tmp_path: Path, mechanism: str) -> None:
    if mechanism == "setpriv" and not Path("/usr/bin/setpriv").exists():
        pytest.skip("setpriv (util-linux) not installed")
    assert "prctl" in _PDEATHSIG_WRAPPER
    repo = Path(__file__).resolve().parents[2]
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, mechanism], cwd=tmp_path, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert daemon.stdout is not None
        step_pid = 0
        for _ in range(50):  # structlog may print first
            line = await asyncio.wait_for(asyncio.to_thread(daemon.stdout.readline), 20)
            if line.startswith(b"PID "):
                step_pid = int(line.split()[1])
                break
        assert step_pid
        assert alive(step_pid)
        daemon.kill()
        daemon.wait(timeout=5)
        assert await gone(step_pid), "PDEATHSIG did not take the step down with the daemon"
    finally:
        daemon.kill()
        daemon.wait()


def test_a_step_whose_daemon_died_before_setpriv_armed_the_signal_ends_at_once() -> None:
    """setpriv arms PDEATHSIG only once it runs: a daemon killed in between left the step running for
    good (test_step_dies_with_the_daemon[setpriv] failed now and then on a loaded machine). The guard
    line ends a step whose parent is no longer the daemon that launched it."""
    ran = subprocess.run(["/bin/sh", "-c", parent_guard(os.getpid()) + "echo ran"], capture_output=True, text=True,
                         timeout=10)
    assert (ran.returncode, ran.stdout) == (0, "ran\n")
    orphan = subprocess.run(["/bin/sh", "-c", parent_guard(1) + "echo ran"], capture_output=True, text=True,
                            timeout=10)  # its parent is this test, not "the daemon" (PID 1 here)
    assert (orphan.returncode, orphan.stdout) == (137, "")


def test_kill_orphans_accepts_json_records_and_skips_bad_ones(tmp_path: Path) -> None:
    proc = start_group("exec sleep 100", tmp_path)
    try:
        start = process_start_time(proc.pid)
        records: list[object] = [
            {"component": "c", "pid": proc.pid, "pgid": proc.pid, "start_time": start},
            {"component": "c", "pid": 12345678},  # no pgid/start_time
            {"pid": 1, "pgid": 1, "start_time": 0},  # never init
            "garbage",
        ]
        assert kill_orphans(records) == [proc.pid]  # type: ignore[arg-type]
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
