"""Component processes: launching, log pumping, timeouts, and killing whole process groups.

Why process *groups*: a lifecycle script is ``sh -c '...'`` and usually starts children
(``python3 app.py``, ``java -jar``...). Killing only the shell leaves those behind, which
is how Greengrass devices accumulate orphans. Every step therefore runs in its own session
(``start_new_session=True``: pgid == sid == pid of the shell) and every signal goes to the
group. The supervisor remembers every group a component still has, including groups whose
leader exited but whose members live on (a startup step that left a daemon behind), and
:meth:`Supervisor.kill_all` ends them all: SIGTERM, a grace period, then SIGKILL.

Why not ``asyncio.create_subprocess_exec``: on Python 3.11 its ``wait()`` only returns once
every pipe is closed, and a background process started by a startup step keeps the pipe
open forever. We use ``subprocess.Popen`` and learn about the exit through a pidfd
(``os.pidfd_open``, Linux >= 5.3) watched by the event loop, with a worker-thread wait as
fallback. Output is pumped by loop readers, line by line, with no task per stream.

Why PR_SET_PDEATHSIG, and how without ``preexec_fn``: if the daemon is ``kill -9``-ed, the
kernel should kill each step's shell with it. ``preexec_fn`` is unsafe with threads, so the
command is prefixed with ``setpriv --pdeathsig KILL --`` (util-linux, present on Debian)
or, where that is missing, with a tiny ``python -S -c`` wrapper that calls ``prctl`` via
ctypes and ``exec``-s the real command. PDEATHSIG fires when the *thread* that forked
exits: launches happen on the event-loop thread, which lives as long as the daemon.
Grandchildren are not covered; :func:`kill_orphans` cleans those up at the next start from
the groups the daemon recorded (``on_spawn`` / :meth:`Supervisor.records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import structlog

from nucleus.cgroups import join_prefix
from nucleus.users import ComponentUser, user_name

log = structlog.get_logger("nucleus.supervisor")

_READ_CHUNK = 64 * 1024
# A line longer than this is written in pieces rather than buffered without bound.
_MAX_LINE = 8 * 1024
_PR_SET_PDEATHSIG = 1
_PDEATHSIG_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class LogSink(Protocol):
    """Where a step's output goes (a :class:`nucleus.component_logs.ComponentLog`)."""

    def write(self, line: str, *, stream: str = ..., step: str = ...) -> None: ...


class _NullSink:
    def write(self, line: str, *, stream: str = "stdout", step: str = "") -> None:
        return None


ProcessCallback = Callable[[str, int, int], None]
# Who a component's steps run as (None: the daemon's user) and the cgroup.procs files they join.
Placement = tuple[ComponentUser | None, list[Path]]


@dataclass(frozen=True, slots=True)
class StepResult:
    exit_code: int | None  # None when timed out; negative: killed by that signal
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class OrphanRecord(NamedTuple):
    """What the daemon persists per live group to clean up after its own ``kill -9``."""

    pgid: int
    pid: int
    start_time: int  # /proc/<pid>/stat field 22, clock ticks since boot


# --- /proc ----------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised comm, which may hold spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    end = raw.rfind(b")")
    return raw[end + 2 :].decode(errors="replace").split() if end >= 0 else None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22), None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_user(pid: int) -> str:
    """The user a process runs as (its real uid, what kill(2) checks), or ``?`` if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return user_name(int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Zombies are excluded on purpose: in a container whose PID 1 does not reap, a dead
    member would otherwise keep a group "alive" forever.
    """
    if not Path("/proc/self/stat").exists():  # not Linux: ask the kernel instead
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("supervisor.signal_denied", pgid=pgid, signal=sig.name)
        return False
    return True


def _record_fields(record: OrphanRecord | tuple[int, int, int] | Mapping[str, Any]) -> tuple[int, int, int]:
    if isinstance(record, Mapping):
        return int(record["pgid"]), int(record["pid"]), int(record["start_time"])
    pgid, pid, start_time = record
    return int(pgid), int(pid), int(start_time)


def kill_orphans(records: Iterable[OrphanRecord | tuple[int, int, int] | Mapping[str, Any]]) -> list[int]:
    """SIGKILL the groups a previous daemon run left behind; returns the pgids killed.

    Records are ``(pgid, pid, start_time)`` tuples or mappings with those keys (as read
    back from a JSON pid file); a malformed record is logged and skipped, never raised,
    because this runs during daemon start.

    A PID may have been reused since the record was written, so a group is killed only if
    its leader is still the same process (same start time), or, when the leader is gone,
    if members remain that started no earlier than the leader did and are in the session
    it created (a pgid cannot be handed out again while members of the group live).
    """
    killed: list[int] = []
    for record in records:
        try:
            pgid, pid, start_time = _record_fields(record)
        except (KeyError, TypeError, ValueError):
            log.warning("supervisor.orphan_record_invalid", record=repr(record)[:200])
            continue
        if pgid <= 1 or pid <= 1:
            continue
        leader = _stat_fields(pid)
        leader_start = int(leader[19]) if leader and len(leader) > 19 else None
        if leader_start is not None and leader_start != start_time:
            log.info("supervisor.orphan_pid_reused", pgid=pgid, pid=pid)
            continue
        # A zombie leader is dead, only not reaped yet (a PID 1 may take a second): after a kill -9 of
        # the daemon its steps' shells are zombies for a while, and were reported as orphans killed.
        # Like a gone leader, it counts only through live members of its group.
        if leader is not None and leader_start is not None and leader[0] != "Z":
            if leader[2] != str(pgid):
                continue
        else:
            survivors = []
            for member in group_members(pgid):
                fields = _stat_fields(member)
                started = process_start_time(member)
                if fields and fields[3] == str(pgid) and started is not None and started >= start_time:
                    survivors.append(member)
            if not survivors:
                continue
        if _signal_group(pgid, signal.SIGKILL):
            log.warning("supervisor.orphan_killed", pgid=pgid, pid=pid)
            killed.append(pgid)
    return killed


def _pdeathsig_prefix() -> list[str]:
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return [sys.executable, "-S", "-c", _PDEATHSIG_WRAPPER, str(os.getpid())]


def parent_guard(parent_pid: int) -> str:
    """The first line of a step's script under ``setpriv``: exit unless the daemon is still the parent.

    setpriv sets PDEATHSIG only after it has started; a daemon that dies before that (``kill -9``
    within a millisecond of a launch, easier on a loaded machine) leaves the step reparented and the
    signal armed against its new parent, which never dies. The shell reads ``$PPID`` after setpriv's
    ``prctl``, so a step whose daemon is already gone ends here (as the Python wrapper's ``getppid``
    check does)."""
    return f'[ "$PPID" = "{parent_pid}" ] || exit 137\n'


# --- output pumping ------------------------------------------------------------------------
class _Pump:
    """Moves one pipe's bytes into the log, line by line, from a loop reader callback."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], sink: LogSink, stream: str, step: str
    ) -> None:
        self._loop = loop
        self._pipe = pipe
        self._fd = pipe.fileno()
        self._sink = sink
        self._stream = stream
        self._step = step
        self._buf = b""
        self.closed = loop.create_future()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)

    def _emit(self, raw: bytes) -> None:
        try:
            self._sink.write(raw.decode(errors="replace"), stream=self._stream, step=self._step)
        except Exception:
            log.exception("supervisor.log_sink_failed", stream=self._stream, step=self._step)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._emit(line)
        while len(self._buf) > _MAX_LINE:
            self._emit(self._buf[:_MAX_LINE])
            self._buf = self._buf[_MAX_LINE:]

    def close(self) -> None:
        if self.closed.done():
            return
        if self._buf:
            self._emit(self._buf)
            self._buf = b""
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self._pipe.close()
        self.closed.set_result(None)


# --- processes -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Group:
    pgid: int
    pid: int
    start_time: int | None
    step: str
    leader_alive: bool = True


class ProcessHandle:
    """One launched step: its own session and process group, output pumped to the log."""

    def __init__(
        self,
        supervisor: Supervisor,
        component: str,
        step: str,
        popen: subprocess.Popen[bytes],
        pumps: list[_Pump],
    ) -> None:
        self._supervisor = supervisor
        self.component = component
        self.step = step
        self._popen = popen
        self._pumps = pumps
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session: the shell leads its own group
        self.started = time.monotonic()
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """Exit code of the leader (negative: killed by that signal). Does not wait for
        output of processes it left behind: those keep being logged."""
        return await asyncio.shield(self._exited)

    async def wait_output(self, within_s: float) -> None:
        """Wait (bounded) until every pipe reached EOF; used after a step's group is dead."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await asyncio.gather(*(asyncio.shield(p.closed) for p in self._pumps))

    async def drain(self) -> None:
        """After the leader exited: let its last output reach the log (bounded). A member it
        left behind may hold the pipe open, so then only glance."""
        await self.wait_output(0.02 if group_members(self.pgid) else 0.5)

    def signal(self, sig: signal.Signals) -> bool:
        return _signal_group(self.pgid, sig)

    async def terminate(self, grace_s: float) -> int | None:
        """SIGTERM the whole group, SIGKILL it after ``grace_s``; the leader's exit code."""
        await self._supervisor._end_groups([self.pgid], grace_s)
        code: int | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, grace_s)):
                code = await self.wait()
        # The leader may have been reaped while members still lived; they are gone now.
        self._supervisor._prune(self.component)
        return code

    def kill_now(self) -> None:
        """SIGKILL the group without waiting (cancellation paths)."""
        _signal_group(self.pgid, signal.SIGKILL)

    def _set_exit(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)


class Supervisor:
    """Launches and tracks the processes of every component."""

    def __init__(
        self,
        log_sink_factory: Callable[[str], LogSink] | None = None,
        *,
        stop_grace_s: float = 5.0,
        on_spawn: ProcessCallback | None = None,
        on_exit: ProcessCallback | None = None,
        pdeathsig: bool = True,
        run_as: ComponentUser | None = None,
        placement: Callable[[str], Placement] | None = None,
    ) -> None:
        self._sink_factory = log_sink_factory
        self.stop_grace_s = stop_grace_s
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        self._prefix = _pdeathsig_prefix() if pdeathsig else []
        # A root daemon's component user (run_with_default): every step but RequiresPrivilege ones
        # runs as it, switched by setpriv in the same exec that arms PDEATHSIG (which survives it).
        # ``placement`` answers per component instead (runWith.posixUser, and the cgroups of its
        # systemResourceLimits): it may raise NucleusError, which fails the launch like an OSError.
        self._run_as = run_as
        self._placement = placement
        self._setpriv: str | None = None
        if run_as is not None:
            self._as_user_prefix(run_as)
        self._groups: dict[str, dict[int, _Group]] = {}
        self._handles: set[ProcessHandle] = set()
        self._waiters: set[asyncio.Future[int]] = set()

    def _as_user_prefix(self, user: ComponentUser) -> list[str]:
        setpriv = self._setpriv
        if setpriv is None:  # looked up once it is needed, not at every launch (a walk of PATH)
            setpriv = self._setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise OSError("setpriv (util-linux) is needed to run components as another user")
        return [setpriv, *(["--pdeathsig", "KILL"] if self._prefix else []),
                f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]

    # --- queries -----------------------------------------------------------------------
    def pids(self, component: str) -> list[int]:
        """Live leader pids of the component's groups."""
        return [g.pid for g in self._groups.get(component, {}).values() if g.leader_alive]

    def pgids(self, component: str) -> list[int]:
        """Every group the component may still have members in."""
        return list(self._groups.get(component, {}))

    def processes(self, component: str) -> list[dict[str, Any]]:
        """Every live process of the component, by the step whose group it is in.

        The same groups :meth:`kill_all` ends, so an operator sees exactly what a stop will
        kill: :meth:`pids` shows only steps still running, not the background process a
        startup step left behind (``step_exited``). Groups with no live member are left out.
        """
        listed: list[dict[str, Any]] = []
        for pgid, group in list(self._groups.get(component, {}).items()):
            members = group_members(pgid)
            if members:
                listed.append({"step": group.step, "pgid": pgid, "step_exited": not group.leader_alive,
                               "pids": sorted(members)})
        return listed

    def records(self) -> list[OrphanRecord]:
        """Groups to persist for :func:`kill_orphans` after a daemon crash."""
        return [
            OrphanRecord(g.pgid, g.pid, g.start_time)
            for groups in self._groups.values()
            for g in groups.values()
            if g.start_time is not None
        ]

    # --- launching ---------------------------------------------------------------------
    async def spawn(  # noqa: PLR0917 - positional order is the documented API
        self,
        name: str,
        step: str,
        script: str,
        env: Mapping[str, str],
        cwd: Path,
        log_sink: LogSink | None = None,
        *,
        requires_privilege: bool = False,
    ) -> ProcessHandle:
        """Launch ``sh -c script`` in a new session; raises OSError if it cannot start."""
        sink = log_sink or (self._sink_factory(name) if self._sink_factory else _NullSink())
        if requires_privilege and hasattr(os, "geteuid") and os.geteuid() != 0:
            # Said in the component's own log too: that is where an operator looks when the step then
            # fails with "Permission denied", and the daemon's log is not.
            user = user_name(os.geteuid())
            log.warning("component.privilege_unavailable", component=name, step=step, user=user,
                        detail="RequiresPrivilege: running as the nucleus user")
            sink.write(f"RequiresPrivilege: the nucleus is not root, so step {step} runs as {user}",
                       stream="nucleus", step=step)
        run_as, cgroup_procs = self._placement(name) if self._placement is not None else (self._run_as, [])
        prefix = self._prefix
        if run_as is not None and not requires_privilege:
            prefix = self._as_user_prefix(run_as)
            # Its own HOME (pip install --user, dotfiles), as sudo -H gives it under Greengrass.
            env = {**env, "HOME": run_as.home, "USER": run_as.user, "LOGNAME": run_as.user}
        guard = parent_guard(os.getpid()) if "--pdeathsig" in prefix and prefix[0].endswith("setpriv") else ""
        # A step's cgroups (systemResourceLimits) are joined before the step runs, as root: every
        # process of the step is in them, and a RequiresPrivilege step is limited too.
        argv = [*join_prefix(cgroup_procs), *prefix, "/bin/sh", "-c", guard + script]
        loop = asyncio.get_running_loop()
        popen = subprocess.Popen(  # noqa: ASYNC220 - fork+exec is quick; the wait is async
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=str(cwd),
            start_new_session=True,
            close_fds=True,
        )
        assert popen.stdout is not None and popen.stderr is not None
        pumps = [
            _Pump(loop, popen.stdout, sink, "stdout", step),
            _Pump(loop, popen.stderr, sink, "stderr", step),
        ]
        handle = ProcessHandle(self, name, step, popen, pumps)
        group = _Group(handle.pgid, handle.pid, process_start_time(handle.pid), step)
        self._groups.setdefault(name, {})[group.pgid] = group
        self._handles.add(handle)
        self._watch_exit(loop, handle, popen, group)
        log.debug("component.process_spawned", component=name, step=step, pid=handle.pid)
        if self._on_spawn is not None:
            try:
                self._on_spawn(name, handle.pid, handle.pgid)
            except Exception:
                log.exception("supervisor.on_spawn_failed", component=name)
        return handle

    def _watch_exit(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: ProcessHandle,
        popen: subprocess.Popen[bytes],
        group: _Group,
    ) -> None:
        def reaped(code: int) -> None:
            group.leader_alive = False
            self._handles.discard(handle)
            handle._set_exit(code)
            log.debug("component.process_exited", component=handle.component, step=handle.step,
                      pid=handle.pid, exit_code=code)
            self._prune(handle.component)

        try:
            pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            fut = loop.run_in_executor(None, popen.wait)
            self._waiters.add(fut)

            def waited(f: asyncio.Future[int]) -> None:
                self._waiters.discard(f)
                if not f.cancelled():
                    reaped(f.result())

            fut.add_done_callback(waited)
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            reaped(popen.wait())

        loop.add_reader(pidfd, readable)

    def _prune(self, component: str) -> None:
        """Forget groups with no live member left (and say so to ``on_exit``)."""
        groups = self._groups.get(component)
        if not groups:
            return
        for pgid, group in list(groups.items()):
            if group.leader_alive or group_members(pgid):
                continue
            del groups[pgid]
            if self._on_exit is not None:
                try:
                    self._on_exit(component, group.pid, pgid)
                except Exception:
                    log.exception("supervisor.on_exit_failed", component=component)
        if not groups:
            self._groups.pop(component, None)

    async def run_step(  # noqa: PLR0917 - positional order is the documented API
        self,
        name: str,
        step: str,
        script: str,
        env: Mapping[str, str],
        cwd: Path,
        timeout_s: float | None,
        log_sink: LogSink | None = None,
        *,
        requires_privilege: bool = False,
    ) -> StepResult:
        """Run a step to completion; on timeout its whole group is ended (TERM, grace, KILL).

        Raises OSError if the process cannot be launched. Cancelling kills the group at once.
        """
        started = time.monotonic()
        handle = await self.spawn(
            name, step, script, env, cwd, log_sink, requires_privilege=requires_privilege
        )
        try:
            async with asyncio.timeout(timeout_s):
                code = await handle.wait()
        except TimeoutError:
            log.warning("component.step_timed_out", component=name, step=step, pid=handle.pid,
                        timeout_s=timeout_s)
            await handle.terminate(self.stop_grace_s)
            return StepResult(None, True, time.monotonic() - started)
        except asyncio.CancelledError:
            handle.kill_now()
            raise
        await handle.drain()  # its last lines land in the log before its result is acted on
        return StepResult(code, False, time.monotonic() - started)

    # --- killing -----------------------------------------------------------------------
    async def kill_all(self, component: str, grace_s: float | None = None) -> list[int]:
        """End every process group the component still has: SIGTERM, grace, SIGKILL.

        Returns the processes still alive after SIGKILL: members the daemon may not signal (a
        non-root daemon, a step that ran ``sudo``). They are logged, with their users, as
        ``component.processes_survived``, and the groups stay listed (``nucleus status``).
        """
        self._prune(component)
        pgids = self.pgids(component)
        if pgids:
            await self._end_groups(pgids, self.stop_grace_s if grace_s is None else grace_s)
        # give the loop a moment to reap the leaders we just killed, then forget them
        for _ in range(50):
            if not any(g.leader_alive for g in self._groups.get(component, {}).values()):
                break
            await asyncio.sleep(0.01)
        self._prune(component)
        survivors = sorted(pid for pgid in self.pgids(component) for pid in group_members(pgid))
        if survivors:
            log.warning("component.processes_survived", component=component, pids=survivors,
                        users=sorted({process_user(pid) for pid in survivors}),
                        nucleus_user=user_name(os.geteuid()))
        elif pgids:
            log.info("component.processes_killed", component=component, groups=len(pgids))
        return survivors

    async def _end_groups(self, pgids: list[int], grace_s: float) -> None:
        alive = [p for p in pgids if _signal_group(p, signal.SIGTERM)]
        deadline = time.monotonic() + max(0.0, grace_s)
        pause = 0.005
        while alive and time.monotonic() < deadline:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.1)
            alive = [p for p in alive if group_members(p)]
        for pgid in alive:
            if _signal_group(pgid, signal.SIGKILL):
                log.warning("component.group_killed", pgid=pgid, grace_s=grace_s)
        # SIGKILL cannot be ignored; wait (bounded) until the kernel has done it.
        for _ in range(100):
            alive = [p for p in alive if group_members(p)]
            if not alive:
                break
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Kill everything still running, at once; for daemon shutdown after the stops."""
        for component in list(self._groups):
            await self.kill_all(component, grace_s=0.0)
        for fut in list(self._waiters):
            fut.cancel()
