"""Who the daemon runs as, who its components run as, and who may reach it.

By default every step runs as the daemon's own user. A root daemon may instead run components
as a component user (``run_with_default.posix_user``, Greengrass's ``runWithDefault.posixUser``):
then that user must reach its work folder, its artifacts and the sockets, and nothing else of
the root. The questions an operator meets ("may this user run a daemon at this root?", "may the
daemon give its sockets to ``ipc.socket_group``?", "does that component user exist?") are
answered here with one line naming the path or the setting, instead of a ``PermissionError``
traceback from deep inside the start-up.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
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


def open_root_to_group(root: Path, gid: int, sockets: Iterable[Path], shared: Iterable[Path] = ()) -> list[Path]:
    """Let the socket group reach ``sockets`` in ``root`` (group ``gid``, mode 0710) and nothing else.

    A socket's own 0660 is not enough: connecting needs search permission on every directory
    above it, and the root is owner-only. Search without read lets members reach a name they
    know without listing the root; but every name in it is well known, and ``logs/``,
    ``packages/``, ``work/`` (0755) and ``nucleus.yaml`` (which may hold the broker password) are
    readable by others when created with the usual umask: behind a 0700 root that did not matter.
    So every other entry of the root loses its group and other permissions, except ``shared``
    ones, whose modes the caller sets (:func:`open_to_component_user`). Returns those changed.
    """
    keep = {Path(s).name for s in (*sockets, *shared)}
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


# --- the component user (run_with_default.posix_user) ---------------------------------------
POSIX_USER_FIELD = "run_with_default.posix_user"


@dataclass(frozen=True, slots=True)
class ComponentUser:
    """The user and group a root daemon runs (unprivileged) steps as."""

    user: str
    uid: int
    group: str
    gid: int
    home: str

    def in_group(self, gid: int) -> bool:
        """Whether its steps carry ``gid``: the run group, or one of the user's groups (steps get
        them with ``setpriv --init-groups``, as ``sudo -u`` gives them under Greengrass)."""
        if gid in (self.gid, pwd.getpwuid(self.uid).pw_gid):
            return True
        try:
            return self.user in grp.getgrgid(gid).gr_mem
        except KeyError:
            return False

    def __str__(self) -> str:
        return f"{self.user}:{self.group}"


def _lookup_user(name: str, field: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if name.isdigit():  # "useradd --system 4242" would make a user named 4242, with another uid
            raise NucleusError(f"no user with uid {name} on this device (create one, e.g. useradd --system "
                               f"--uid {name} NAME, or name another)", field=field) from None
        raise NucleusError(f"no user {name!r} on this device (create it, e.g. useradd --system {name}, "
                           "or name another)", field=field) from None


def _lookup_group(name: str, field: str) -> grp.struct_group:
    try:
        return grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except KeyError:
        if name.isdigit():
            raise NucleusError(f"no group with gid {name} on this device (create one, e.g. groupadd --system "
                               f"--gid {name} NAME, or name another)", field=field) from None
        raise NucleusError(f"no group {name!r} on this device (create it, e.g. groupadd --system {name}, "
                           "or name another)", field=field) from None


def component_user(posix_user: str | None, *, field: str = POSIX_USER_FIELD) -> ComponentUser | None:
    """The component user ``posix_user`` (``user`` or ``user:group``) names; None when unset.

    NucleusError naming the setting when the user or group does not exist, when this daemon is
    not root (only root may switch users: a service-user daemon would run every step as itself
    anyway, which the operator did not ask for), or when ``setpriv`` is missing (it switches).
    """
    if posix_user is None:
        return None
    euid = os.geteuid()
    if euid != 0:
        raise NucleusError(
            f"this daemon runs as {_who(euid)}, not root, so it cannot run components as another user; "
            "remove the setting (components then run as the daemon's user) or start the daemon as root",
            field=field,
        )
    user_part, _, group_part = posix_user.partition(":")
    entry = _lookup_user(user_part, field)
    group = _lookup_group(group_part, field) if group_part else grp.getgrgid(entry.pw_gid)
    if shutil.which("setpriv") is None:
        raise NucleusError("setpriv (util-linux) is needed to run components as another user and is not "
                           "on PATH", field=field)
    return ComponentUser(entry.pw_name, entry.pw_uid, group.gr_name, group.gr_gid, entry.pw_dir)


def socket_group_for(socket_group: str | None, user: ComponentUser | None) -> str | None:
    """The group the sockets (and the root) are given: ``ipc.socket_group``, else the component
    user's group, whose steps must connect. NucleusError if the component user is not in the
    socket group: its components could not reach the bus."""
    if user is None or socket_group is None:
        return socket_group if user is None else user.group
    gid = socket_group_id(socket_group)
    if not user.in_group(gid):
        raise NucleusError(
            f"components run as {user.user}, which is not a member of ipc.socket_group {socket_group!r}, so "
            f"they could not reach the IPC sockets; add it (usermod -aG {socket_group} {user.user}) or "
            f"use {socket_group!r} as its group ({user.user}:{socket_group})", field=POSIX_USER_FIELD,
        )
    return socket_group


def open_to_component_user(paths: Paths, user: ComponentUser) -> None:
    """Let the component group reach ``packages/`` (artifacts only) and ``work/``, search only.

    Called after :func:`open_root_to_group` made the root 0710: the component user gets through
    the root as a member of its group, and through these two with its own group. Recipes and the
    staging folder become owner-only: a member could read them otherwise.
    """
    for shared in (paths.packages_dir, paths.artifacts_dir, paths.unarchived_dir, paths.work_dir):
        shared.mkdir(parents=True, exist_ok=True)
        os.chown(shared, 0, user.gid)
        shared.chmod(ROOT_MODE_WITH_SOCKET_GROUP)
    for private in (paths.recipes_dir, paths.staging_dir):
        private.mkdir(parents=True, exist_ok=True)
        private.chmod(ROOT_MODE)
    for entry in paths.packages_dir.iterdir():  # anything else a later layout adds stays closed
        if entry not in (paths.artifacts_dir, paths.unarchived_dir) and not entry.is_symlink():
            entry.chmod(stat.S_IMODE(entry.lstat().st_mode) & 0o700)


def give_work_folder(work: Path, user: ComponentUser) -> None:
    """The component's work folder is its user's (0700). A folder a root-run component filled
    before the setting was turned on is handed over whole, or the component could not write in it."""
    work.mkdir(parents=True, exist_ok=True)
    st = work.stat()
    if st.st_uid != user.uid or st.st_gid != user.gid:
        for dirpath, dirnames, filenames in os.walk(work):
            for name in (*dirnames, *filenames):
                os.lchown(Path(dirpath) / name, user.uid, user.gid)
        os.chown(work, user.uid, user.gid)
    work.chmod(0o700)


def can_search(user: ComponentUser, path: Path) -> bool:
    """Whether ``user`` (its run group and its groups) may pass through the folder ``path``."""
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if user.in_group(st.st_gid):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def unreachable(user: ComponentUser, paths: Paths) -> Path | None:
    """The first folder on the way to a component's work folder and artifacts (and the sockets)
    that ``user`` may not pass through; None if it reaches them all. A per-component user must reach
    what the device's component user reaches: the root opens only to that user's group."""
    for folder in (paths.root, paths.work_dir, paths.packages_dir, paths.artifacts_dir, paths.unarchived_dir):
        try:
            if not can_search(user, folder):
                return folder
        except FileNotFoundError:
            continue
    return None
