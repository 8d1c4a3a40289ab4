"""A component runner with real processes, a real supervisor and a real log, for the runner's tests
(test_runner.py, test_lifecycle_walk.py; the fixture ``h`` is in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from nucleus.clock import Clock, SystemClock
from nucleus.component_logs import ComponentLog
from nucleus.runner import ComponentRunner, ComponentSpec, StepSpec
from nucleus.settings import RestartPolicy
from nucleus.states import State
from nucleus.supervisor import Supervisor

WAIT = 10.0  # generous bound for any single wait on a real process


def policy(**fields: float) -> RestartPolicy:
    base: dict[str, float] = {"backoff_initial_s": 0.05, "backoff_max_s": 0.1, "backoff_jitter": 0.1,
                              "max_errors": 3}
    return RestartPolicy.model_validate(base | fields)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (PID 1 may be slow to reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def eventually(cond: Callable[[], bool], within: float = WAIT) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.log_path = tmp_path / "logs" / "c.log"
        self.changes: list[tuple[str, State, State, str]] = []
        self.runners: list[ComponentRunner] = []

    def runner(
        self,
        steps: dict[str, StepSpec],
        *,
        restart: RestartPolicy | None = None,
        clock: Clock | None = None,
        env: dict[str, str] | None = None,
        max_bytes: int = 1 << 20,
        backup_count: int = 1,
    ) -> ComponentRunner:
        spec = ComponentSpec(
            name="c",
            version="1.0.0",
            steps=steps,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
            work_dir=self.work,
        )
        r = ComponentRunner(
            spec,
            Supervisor(stop_grace_s=0.3),
            ComponentLog(self.log_path, max_bytes=max_bytes, backup_count=backup_count),
            restart or policy(),
            clock=clock or SystemClock(),
            on_state=lambda *change: self.changes.append(change),
            rng=random.Random(0),
        )
        self.runners.append(r)
        return r

    def states(self) -> list[State]:
        return [new for _, _, new, _ in self.changes]

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
