"""The seam between decisions and the machine.

:class:`Actuator` is what the service calls; two implementations ship. :class:`SimulatedActuator`
prints and records what it would have done (the example and the tests watch it);
:class:`CommandActuator` runs one configured program per action — the usual way to reach a PLC,
a relay board or a vendor CLI on a real device — with a timeout, so a hung script is reported as a
failed action instead of holding the protective function hostage. The program gets the decision in
its environment (``NUCLEUS_ACTION``, ``NUCLEUS_ASSET``, ``NUCLEUS_DECISION_ID``, ``NUCLEUS_REASON``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from components.protective_action.audit import Outcome


@dataclass(slots=True, frozen=True)
class ActionRequest:
    action: str
    asset: str
    decision_id: str
    reason: str


class Actuator(Protocol):
    async def execute(self, request: ActionRequest) -> Outcome:
        """Carry out one action; report failure in the outcome rather than raising."""
        ...


@dataclass(slots=True)
class SimulatedActuator:
    record_path: Path | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)
    calls: list[tuple[ActionRequest, float]] = field(default_factory=list)  # (request, monotonic time)

    async def execute(self, request: ActionRequest) -> Outcome:
        mono, wall = time.monotonic(), time.time()
        self.calls.append((request, mono))
        if len(self.calls) > 10_000:
            del self.calls[:5_000]
        self.out.write(f"ACTUATOR {request.action} asset={request.asset} decision={request.decision_id} "
                       f"reason={request.reason!r}\n")
        self.out.flush()
        if self.record_path is not None:
            with self.record_path.open("a") as f:
                f.write(json.dumps({"action": request.action, "asset": request.asset,
                                    "decision_id": request.decision_id, "wall": wall, "monotonic": mono}) + "\n")
        return Outcome(request.action, True, "simulated", wall, time.monotonic() - mono)


@dataclass(slots=True)
class CommandActuator:
    commands: dict[str, tuple[str, ...]]
    timeout_s: float = 5.0

    async def execute(self, request: ActionRequest) -> Outcome:
        start, wall = time.monotonic(), time.time()

        def done(ok: bool, detail: str) -> Outcome:
            return Outcome(request.action, ok, detail, wall, time.monotonic() - start)

        argv = self.commands.get(request.action)
        if not argv:
            return done(False, f"no command configured for {request.action}")
        env = dict(os.environ, NUCLEUS_ACTION=request.action, NUCLEUS_ASSET=request.asset,
                   NUCLEUS_DECISION_ID=request.decision_id, NUCLEUS_REASON=request.reason)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return done(False, f"cannot run {argv[0]}: {exc}")
        try:
            async with asyncio.timeout(self.timeout_s):
                output, _ = await proc.communicate()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return done(False, f"{argv[0]} timed out after {self.timeout_s:g} s (killed)")
        except BaseException:  # cancelled (we are stopping): leave no script behind in its own session
            _kill_group(proc.pid)
            raise
        tail = output.decode(errors="replace").strip()[-300:]
        if proc.returncode != 0:
            return done(False, f"{argv[0]} exited {proc.returncode}: {tail}")
        return done(True, tail or "ok")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
