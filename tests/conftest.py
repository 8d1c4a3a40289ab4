"""Shared fixtures: the shared test data location and a real daemon in a temporary root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED} (a clone without ../shared)")
    return SHARED


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nuc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


FAST_SETTINGS: dict[str, Any] = {
    "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_errors": 3, "error_window_s": 60},
    "deployments": {"settle_time_s": 0.5, "default_timeout_s": 60},
    "stop_grace_s": 1.0,
}


class Daemon:
    """A real `nucleus run` process in its own root, driven through the real CLI."""

    def __init__(self, root: Path, settings: dict[str, Any] | None = None) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "nucleus.yaml").write_text(yaml.safe_dump(settings if settings is not None else FAST_SETTINGS))
        self.out = root / "daemon.out"

    @property
    def socket(self) -> Path:
        return self.root / "ipc.sock"

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
        with self.out.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nucleus", "--root", str(self.root), "run"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.socket.exists():
                probe = self.cli("status", check=False, timeout=10)
                if probe.returncode == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up in {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.out.read_text(errors="replace")[-6000:] if self.out.exists() else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "nucleus", "--root", str(self.root), *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"nucleus {' '.join(args)} exited {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}\n"
                f"daemon log:\n{self.log_text()}"
            )
        return proc

    def components(self) -> dict[str, dict[str, Any]]:
        out = self.cli("list", "--json").stdout
        return {c["name"]: c for c in json.loads(out)}

    def wait_state(self, name: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.components().get(name, {})
            if last.get("state") in states:
                return last
            time.sleep(0.1)
        raise AssertionError(f"{name} never reached {states}; last {last}\n{self.log_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise


def kill_component_processes(root: Path) -> None:
    """Safety net for tests that kill -9 the daemon: no stray component survives the test."""
    pid_file = root / "run" / "pids.json"
    try:
        records = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return
    for record in records:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(record["pgid"]), signal.SIGKILL)


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[Any]:
    made: list[Daemon] = []

    def make(name: str = "root", settings: dict[str, Any] | None = None, start: bool = True) -> Daemon:
        d = Daemon(short_tmp / name, settings)
        made.append(d)
        if start:
            d.start()
        return d

    try:
        yield make
    finally:
        for d in made:
            with contextlib.suppress(Exception):
                d.stop()
            kill_component_processes(d.root)


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    return daemon_factory()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def gg_daemon() -> Iterator[Daemon]:
    """One daemon for a whole test module, for tests that only add components and clients to it
    (the Greengrass IPC tests: starting a daemon per test would cost most of their time)."""
    root = Path(tempfile.mkdtemp(prefix="gg-", dir="/tmp"))
    d = Daemon(root / "d", FAST_SETTINGS)
    try:
        d.start()
        yield d
    finally:
        d.stop()
        kill_component_processes(d.root)
        shutil.rmtree(root, ignore_errors=True)
