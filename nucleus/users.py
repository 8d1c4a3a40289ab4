"""Who the daemon runs as, and who may reach it: checks made before anything starts.

nucleus has no component users (Greengrass's ``runWith``/``posixUser``): every step runs as the
daemon's own user. So the two questions an operator running it as a non-root user meets are
"may this user run a daemon at this root?" and "may the daemon give its sockets to
``ipc.socket_group``?". Both are answered here with one line naming the path or the setting,
instead of a ``PermissionError`` traceback from deep inside the start-up.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from nucleus.errors import NucleusError
from nucleus.paths import Paths

# The root itself is owner-only; a socket group gets search (not list) permission on it.
ROOT_MODE = 0o700
ROOT_MODE_WITH_SOCKET_GROUP = 0o710


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _who(uid: int) -> str:
    return f"{user_name(uid)} (uid {uid})"


def _private_parts(paths: Paths) -> Iterable[Path]:
    """The folders the daemon chmods or writes in at start."""
    yield paths.root
    yield from (paths.run_dir, paths.db_dir, paths.config_dir, paths.clients_dir, paths.logs_dir,
                paths.work_dir, paths.packages_dir)


def check_root_access(root: Path) -> None:
    """NucleusError, naming the path and both users, if this user cannot run a daemon at ``root``.

    The daemon chmods the root and its private folders at every start, which only their owner
    may do: a root first used by root and then by a service user (or the reverse, with ``sudo``)
    fails there otherwise, with a traceback.
    """
    euid = os.geteuid()
    if euid == 0:
        return
    paths = Paths.at(root)
    for part in _private_parts(paths):
        try:
            owner = part.stat().st_uid
        except FileNotFoundError:
            continue
        except PermissionError:
            raise NucleusError(
                f"this daemon would run as {_who(euid)}, which may not reach it; run it as the "
                f"root's owner or choose another --root", path=part,
            ) from None
        if owner != euid:
            raise NucleusError(
                f"owned by {_who(owner)}, and this daemon would run as {_who(euid)}; run it as "
                f"{user_name(owner)}, or give the root to this user (chown -R {user_name(euid)} {root}), "
                f"or choose another --root", path=part,
            )
    settings_file = paths.root / "nucleus.yaml"
    if settings_file.exists() and not os.access(settings_file, os.R_OK):
        raise NucleusError(f"not readable by {_who(euid)}, which this daemon would run as", path=settings_file)
    if not paths.root.exists():
        parent = paths.root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise NucleusError(
                f"cannot create the root here: {parent} is not writable by {_who(euid)}; "
                "create the root for this user or choose another --root", path=root,
            )


def socket_group_id(name: str) -> int:
    """The gid of ``ipc.socket_group``; NucleusError if there is no such group or this process may
    not give a file to it (only root, or a member of the group, may)."""
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise NucleusError(f"no group named {name!r} on this device", field="ipc.socket_group") from None
    euid = os.geteuid()
    if euid != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise NucleusError(
            f"this daemon runs as {_who(euid)}, which is not a member of group {name!r}, so it cannot "
            f"give its sockets to that group; add it (usermod -aG {name} {user_name(euid)}) and start "
            "it again from a new login", field="ipc.socket_group",
        )
    return gid


def open_root_to_group(root: Path, gid: int, sockets: Iterable[Path]) -> list[Path]:
    """Let the socket group reach ``sockets`` in ``root`` (group ``gid``, mode 0710) and nothing else.

    A socket's own 0660 is not enough: connecting needs search permission on every directory
    above it, and the root is owner-only. Search without read lets members reach a name they
    know without listing the root; but every name in it is well known, and ``logs/``,
    ``packages/``, ``work/`` (0755) and ``nucleus.yaml`` (which may hold the broker password) are
    readable by others when created with the usual umask: behind a 0700 root that did not matter.
    So every other entry of the root loses its group and other permissions. Returns those changed.
    """
    keep = {Path(s).name for s in sockets}
    tightened: list[Path] = []
    for entry in root.iterdir():
        if entry.name in keep:
            continue
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
            continue
        entry.chmod(stat.S_IMODE(st.st_mode) & 0o700)
        tightened.append(entry)
    os.chown(root, -1, gid)
    root.chmod(ROOT_MODE_WITH_SOCKET_GROUP)
    return tightened
