"""The seam between decisions and the machine.

:class:`Actuator` is what the service calls; two implementations ship. :class:`SimulatedActuator`
prints and records what it would have done (the example and the tests watch it);
:class:`CommandActuator` runs one configured program per action — the usual way to reach a PLC,
a relay board or a vendor CLI on a real device — with a timeout, so a hung script is reported as a
failed action instead of holding the protective function hostage. The program gets the decision in
its environment (``NUCLEUS_ACTION``, ``NUCLEUS_ASSET``, ``NUCLEUS_DECISION_ID``, ``NUCLEUS_REASON``).
Its exit status is the outcome: 0 is success, anything else (or no exit within the timeout) is a
failure, and the end of its output is the outcome's detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TextIO

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
        if request.action == "keepalive":  # every keepaliveS seconds: recorded, not printed
            return Outcome(request.action, True, "simulated", wall, time.monotonic() - mono)
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

    def unavailable(self) -> dict[str, str]:
        """Each action whose program cannot be run from here, and why; checked at start and on every new
        configuration so that a missing relay script shows up in the log then, not at the first trip.
        Only a warning: the program may come with a component the same deployment installs."""
        out: dict[str, str] = {}
        for action, argv in self.commands.items():
            prog = argv[0]
            if "/" not in prog:
                if shutil.which(prog) is None:
                    out[action] = f"{prog}: not found on PATH"
            elif not Path(prog).is_file():
                out[action] = f"{prog}: no such file" + ("" if prog.startswith("/") else f" in {Path.cwd()}")
            elif not os.access(prog, os.X_OK):
                out[action] = f"{prog}: not executable"
        return out

    async def execute(self, request: ActionRequest) -> Outcome:
        start, wall = time.monotonic(), time.time()

        def done(ok: bool, detail: str) -> Outcome:
            return Outcome(request.action, ok, detail, wall, time.monotonic() - start)

        argv = self.commands.get(request.action)
        if not argv:
            return done(False, f"no command configured for {request.action}")
        env = dict(os.environ, NUCLEUS_ACTION=request.action, NUCLEUS_ASSET=request.asset,
                   NUCLEUS_DECISION_ID=request.decision_id, NUCLEUS_REASON=request.reason)
        # Output goes to a file, not a pipe: the outcome is the program's exit, and a background process
        # it leaves running (a siren on a timer) keeps a pipe open, which made a relay script that had
        # succeeded wait out the timeout and count as failed.
        with tempfile.TemporaryFile() as output:
            try:
                proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                            stdout=output, stderr=asyncio.subprocess.STDOUT,
                                                            start_new_session=True)
            except OSError as exc:
                return done(False, f"cannot run {argv[0]}: {exc}")
            try:
                async with asyncio.timeout(self.timeout_s):
                    await proc.wait()
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                return done(False, f"{argv[0]} timed out after {self.timeout_s:g} s (killed)")
            except BaseException:  # cancelled (we are stopping): leave no script behind in its own session
                _kill_group(proc.pid)
                raise
            tail = _tail(output)
        if proc.returncode != 0:
            return done(False, f"{argv[0]} exited {proc.returncode}: {tail}")
        return done(True, tail or "ok")


def _tail(output: IO[bytes], chars: int = 300) -> str:
    """The end of what the program wrote, as the outcome's detail (bounded: a chatty script cannot
    bloat the audit log)."""
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - 4 * chars))
    return output.read().decode(errors="replace").strip()[-chars:]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
