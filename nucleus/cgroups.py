"""System resource limits (Greengrass's ``systemResourceLimits``) enforced with Linux cgroups.

Why cgroups and not ``setrlimit``: a memory limit must hold for a component's processes together
(a shell, its Python, the Python's children), and the kernel must be the one to stop a runaway:
with a hard limit on the group it OOM-kills inside the group, and the rest of the device (the
protective-action component on a wind turbine, say) keeps its memory. CPU is a CFS quota: ``cpus``
0.5 is 50 ms of CPU time per 100 ms period, over all the group's processes.

Where the groups are, as Greengrass's ``greengrass/<component>``:

* cgroup v1 (a ``memory`` and a ``cpu`` hierarchy): ``<controller>/<daemon's group>/nucleus/<root>/<component>``
  in each, nested under the daemon's own group of that controller (``/proc/self/cgroup``), so a
  nucleus run in a service's group keeps its components inside that group's accounting;
* cgroup v2 (one unified hierarchy): ``/sys/fs/cgroup/nucleus/<root>/<component>``, with the memory and
  cpu controllers enabled on the way (v2 forbids processes in a group whose children have controllers,
  so the groups cannot nest under the daemon's own).

``<root>`` is the daemon's root folder, escaped as ``systemd-escape --path`` does (``/var/lib/nucleus``:
``var-lib-nucleus``): one daemon per trust domain is the documented way to separate components, and
two daemons running a component of the same name must not share (and overwrite, and on removal kill
the processes of) one group.

A step joins its groups before anything of it runs: the command is prefixed with a tiny ``sh`` that
writes its own pid to each group's ``cgroup.procs`` and then ``exec``s the step (as root, before
``setpriv`` switches to the component user). Every child the step forks is then in the group;
writing the pid after ``Popen`` returned would leave out whatever it forked first.

Nothing here touches a cgroup unless some component has limits.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from nucleus.errors import NucleusError

log = structlog.get_logger("nucleus.cgroups")

MOUNT = Path("/sys/fs/cgroup")
PARENT = "nucleus"
CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel's minimum cfs_quota_us


@dataclass(frozen=True, slots=True)
class Limits:
    """A component's limits: memory in KB (hard, all its processes together), cpus in cores."""

    memory_kb: int | None = None
    cpus: float | None = None

    def __bool__(self) -> bool:
        return self.memory_kb is not None or self.cpus is not None

    def describe(self) -> str:
        parts = [f"memory {self.memory_kb} KB" if self.memory_kb is not None else "",
                 f"cpus {self.cpus:g}" if self.cpus is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


def _own_group(controller: str) -> str:
    """The daemon's group in the v1 hierarchy of ``controller``."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path or "/"
    return "/"


class Cgroups:
    """The device's cgroup file system, as far as component limits need it."""

    def __init__(self, mount: Path = MOUNT, record: Path | None = None, instance: str | None = None) -> None:
        self.mount = mount
        self._instance = instance  # this daemon's level under nucleus/ (instance_name), None: none
        self._record = record  # the groups this root created, for the clean-up after a crash
        if (mount / "cgroup.controllers").is_file():
            self.version: int | None = 2
        elif (mount / "memory").is_dir() or (mount / "cpu").is_dir():
            self.version = 1
        else:
            self.version = None
        self._written: dict[str, Limits] = {}
        self._oom_seen: dict[str, int] = {}  # the kernel's oom_kill count last taken (new_oom_kills)
        # the daemon's own v1 groups do not move while it runs: read once, not at every look at a group
        # (the OOM watcher asks for each limited component's groups every second)
        self._own = {c: _own_group(c).strip("/") for c in ("memory", "cpu")} if self.version == 1 else {}

    # --- where --------------------------------------------------------------------------------
    def _parents(self, limits: Limits | None = None) -> dict[str, Path]:
        """The ``nucleus`` group of each controller the limits need (all, for None)."""
        if self.version == 2:
            return {"unified": self._nucleus(self.mount)}
        parents: dict[str, Path] = {}
        for controller, wanted in (("memory", limits is None or limits.memory_kb is not None),
                                   ("cpu", limits is None or limits.cpus is not None)):
            if wanted:
                own = self._own[controller]
                base = self.mount / controller
                parents[controller] = self._nucleus(base / own if own else base)
        return parents

    def _nucleus(self, base: Path) -> Path:
        return base / PARENT / self._instance if self._instance else base / PARENT

    def groups(self, component: str, limits: Limits | None = None) -> list[Path]:
        return [parent / component for parent in self._parents(limits).values()]

    # --- can they be enforced -----------------------------------------------------------------
    def problem(self, limits: Limits) -> str | None:
        """Why ``limits`` cannot be enforced on this device (None: they can)."""
        if not limits:
            return None
        if self.version is None:
            return f"no cgroup file system at {self.mount} (neither v2 nor the v1 memory and cpu controllers)"
        if self.version == 2:
            available = (self.mount / "cgroup.controllers").read_text().split()
            for controller, wanted in (("memory", limits.memory_kb is not None), ("cpu", limits.cpus is not None)):
                if wanted and controller not in available:
                    return f"the cgroup v2 hierarchy at {self.mount} has no {controller} controller"
            where = self.mount
        else:
            for controller, wanted in (("memory", limits.memory_kb is not None), ("cpu", limits.cpus is not None)):
                if wanted and not (self.mount / controller).is_dir():
                    return f"no cgroup v1 {controller} controller at {self.mount / controller}"
            where = self.mount / ("memory" if limits.memory_kb is not None else "cpu")
        for parent in self._parents(limits).values():
            base = parent
            while not base.exists() and base != base.parent:  # the nearest folder that is there
                base = base.parent
            if not os.access(base, os.W_OK):
                who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
                return (f"{base} is not writable by this daemon ({who}); limits need a root daemon with the "
                        f"cgroup file system mounted read-write ({where})")
        return None

    # --- making and filling groups ------------------------------------------------------------
    def apply(self, component: str, limits: Limits) -> list[Path]:
        """Create the component's groups with ``limits`` (again if they changed or went away);
        the ``cgroup.procs`` files a step writes its pid to. NucleusError naming the component."""
        try:
            return self._apply(component, limits)
        except OSError as exc:
            raise NucleusError(f"cannot set its system resource limits ({limits.describe()}) with cgroups: "
                               f"{exc.strerror or exc} ({exc.filename or self.mount})",
                               component=component, field="runWith.systemResourceLimits") from None

    def _apply(self, component: str, limits: Limits) -> list[Path]:
        groups = self.groups(component, limits)
        fresh = [g for g in groups if not g.is_dir()]
        if self.version == 2:
            self._enable_v2_controllers(limits)
        for group in fresh:
            for attempt in range(3):  # another daemon's last component may remove nucleus/ meanwhile
                try:
                    group.mkdir(parents=True, exist_ok=True)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            self._remember(group)
        if fresh:
            self._oom_seen.pop(component, None)  # a new group counts from 0
        if fresh or self._written.get(component) != limits:
            for group in groups:
                self._set_limits(group, limits)
            self._written[component] = limits
        return [g / "cgroup.procs" for g in groups]

    def _enable_v2_controllers(self, limits: Limits) -> None:
        wanted = [c for c, on in (("memory", limits.memory_kb is not None), ("cpu", limits.cpus is not None)) if on]
        levels = [self.mount, self.mount / PARENT]
        if self._instance:
            levels.append(levels[-1] / self._instance)
        for level in levels[1:]:
            level.mkdir(exist_ok=True)
        for level in levels:
            enabled = (level / "cgroup.subtree_control").read_text().split()
            missing = " ".join(f"+{c}" for c in wanted if c not in enabled)
            if missing:
                _write(level / "cgroup.subtree_control", missing)

    def _set_limits(self, group: Path, limits: Limits) -> None:
        if self.version == 2:
            if (group / "memory.max").exists():
                _write(group / "memory.max", str(limits.memory_kb * 1024) if limits.memory_kb is not None else "max")
                if (group / "memory.swap.max").exists():  # a hard limit: not spilled to swap
                    _write(group / "memory.swap.max", "0" if limits.memory_kb is not None else "max")
            if (group / "cpu.max").exists():
                quota = _quota(limits.cpus)
                _write(group / "cpu.max", f"{quota if quota is not None else 'max'} {CFS_PERIOD_US}")
            return
        if (group / "memory.limit_in_bytes").exists():
            value = str(limits.memory_kb * 1024) if limits.memory_kb is not None else "-1"
            files = [group / "memory.limit_in_bytes"]
            if (group / "memory.memsw.limit_in_bytes").exists():  # memory+swap: swap does not extend the limit
                files.append(group / "memory.memsw.limit_in_bytes")
            # memsw must stay >= the memory limit: lowering goes memory first, raising memsw first
            try:
                for f in files:
                    _write(f, value)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                for f in reversed(files):
                    _write(f, value)
        if (group / "cpu.cfs_quota_us").exists():
            quota = _quota(limits.cpus)
            _write(group / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(group / "cpu.cfs_quota_us", str(quota if quota is not None else -1))

    # --- what happened ------------------------------------------------------------------------
    def oom_kills(self, component: str) -> int:
        """How many processes the kernel killed in the component's memory group for its limit."""
        for group in self.groups(component):
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                with contextlib.suppress(OSError, ValueError):
                    for line in (group / name).read_text().splitlines():
                        field, _, value = line.partition(" ")
                        if field == key:
                            return int(value)
        return 0

    def new_oom_kills(self, component: str) -> int:
        """The OOM kills in the component's memory group since the last call (or since the group was
        made): each is reported once, whether the step itself died or only a child it forked."""
        if (limits := self._written.get(component)) is None or limits.memory_kb is None:
            return 0
        now = self.oom_kills(component)
        seen = self._oom_seen.get(component, 0)
        self._oom_seen[component] = now
        return max(0, now - seen)

    def limits_of(self, component: str) -> Limits | None:
        return self._written.get(component)

    # --- removing -----------------------------------------------------------------------------
    def remove(self, component: str) -> None:
        """Remove the component's groups; what is still in them (a stray process the stop did not
        reach) is killed first, or the kernel refuses to remove the group."""
        self._written.pop(component, None)
        self._oom_seen.pop(component, None)
        for group in self.groups(component):
            _remove_group(group)
            _remove_empty_parents(group, self._instance)
        self._forget(self.groups(component))

    def remove_stale(self) -> list[str]:
        """At daemon start: the groups an earlier run of this root left (a ``kill -9``)."""
        if self._record is None:
            return []
        removed: list[str] = []
        for group in self._recorded():
            if Path(group).is_dir():
                _remove_group(Path(group))
                removed.append(group)
            _remove_empty_parents(Path(group), self._instance)
        with contextlib.suppress(OSError):
            self._record.unlink()
        return removed

    def _recorded(self) -> list[str]:
        if self._record is None:
            return []
        try:
            data = json.loads(self._record.read_text())
        except (OSError, ValueError):
            return []
        return [str(g) for g in data] if isinstance(data, list) else []

    def _remember(self, group: Path) -> None:
        if self._record is None:
            return
        groups = self._recorded()
        if str(group) not in groups:
            groups.append(str(group))
            self._record.write_text(json.dumps(groups))

    def _forget(self, groups: list[Path]) -> None:
        if self._record is None:
            return
        gone = {str(g) for g in groups}
        kept = [g for g in self._recorded() if g not in gone]
        with contextlib.suppress(OSError):
            self._record.write_text(json.dumps(kept))


def _quota(cpus: float | None) -> int | None:
    """The CFS quota (µs per period) for ``cpus``; None when it does not limit (as in Greengrass: more
    cpus than the device has is no limit)."""
    if cpus is None or cpus >= (os.cpu_count() or 1):
        return None
    return max(_MIN_QUOTA_US, round(cpus * CFS_PERIOD_US))


def cpus_note(cpus: float | None) -> str | None:
    """What a ``cpus`` value does that its number does not say (None: it is enforced as given)."""
    quota = _quota(cpus)
    if cpus is None:
        return None
    if quota is None:
        return f"cpus {cpus:g} is at least this device's {os.cpu_count() or 1} cores: no CPU limit"
    if quota != round(cpus * CFS_PERIOD_US):
        return f"cpus {cpus:g} is below the kernel's smallest CFS quota: enforced as {quota / CFS_PERIOD_US:g}"
    return None


def instance_name(root: Path) -> str:
    """The daemon's own level under ``nucleus/``: its root as ``systemd-escape --path`` writes it
    (``/var/lib/nucleus`` -> ``var-lib-nucleus``, a ``-`` in a name -> ``\\x2d``), so every root has its
    own name; a very long one is shortened to a digest (a cgroup name has at most 255 bytes)."""
    text = str(root.resolve()).strip("/")
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "_." else "-" if c == "/"
                  else "".join(f"\\x{b:02x}" for b in c.encode()) for c in text) or "-"
    if out.startswith("."):
        out = "\\x2e" + out[1:]
    return out if len(out) <= 200 else "root-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _remove_empty_parents(group: Path, instance: str | None) -> None:
    """The last one out removes the daemon's level and ``nucleus/`` (busy while others are in them)."""
    for parent in (group.parent, group.parent.parent) if instance else (group.parent,):
        try:
            parent.rmdir()
        except OSError:
            return


def _remove_group(group: Path) -> None:
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cgroup.not_removed", group=str(group), error=str(exc))
                return
        with contextlib.suppress(OSError, ValueError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.02)
    log.warning("cgroup.not_removed", group=str(group), error="still busy after killing its processes")


def join_prefix(procs: list[Path]) -> list[str]:
    """argv words that put the process in these groups, then ``exec`` the words after them."""
    if not procs:
        return []
    script = "".join(
        f'echo $$ > "${i + 1}" || {{ echo "nucleus: cannot join cgroup ${i + 1}" >&2; exit 125; }}; '
        for i in range(len(procs))
    ) + f"shift {len(procs)}; exec \"$@\""
    return ["/bin/sh", "-c", script, "nucleus-cgroup", *(str(p) for p in procs)]
