"""Owner-only Unix socket listeners, shared by every IPC front end (native and Greengrass).

The permissions are the security boundary before any token is checked, so they are set with
no window in which the socket is world-connectable (umask during bind), and a stale socket
left by a crashed daemon is replaced only if nobody answers on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from ipc.admission import descriptor_limit

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL


def remove_stale(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse if something else is there or listening."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink()  # nobody listening: left over from a crash
        return
    finally:
        probe.close()
    raise FileExistsError(f"another server is already listening on {path}")


def check_socket_path(path: Path) -> None:
    """ValueError if ``path`` cannot be a Unix socket's address (too long for ``sun_path``)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is {len(os.fsencode(path))} bytes, longer than the "
                         f"{MAX_SOCKET_PATH} bytes a Unix socket allows")


def bind_unix(path: Path, *, mode: int, group: str | None) -> socket.socket:
    """A bound socket at ``path`` with ``mode`` (and group); cleaned up if anything fails."""
    check_socket_path(path)
    remove_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is world-connectable
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    try:
        path.chmod(mode)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock


async def listen_unix(
    path: Path,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    mode: int,
    group: str | None,
    backlog: int | None = None,
) -> asyncio.AbstractServer:
    """Bind ``path`` (mode ``mode``, optional group) and serve ``protocol_factory`` connections.

    asyncio accepts up to ``backlog`` connections in one go before any of them reaches its
    protocol, so before admission (ipc/admission.py) can close the surplus of a flood: the default
    backlog is a sixteenth of the descriptor limit (at most 4096), so that a burst accepted on both
    sockets cannot run the daemon out of descriptors (EMFILE) on its own.
    """
    if backlog is None:
        backlog = max(64, min(4096, descriptor_limit() // 16))
    sock = bind_unix(path, mode=mode, group=group)
    try:
        return await asyncio.get_running_loop().create_unix_server(protocol_factory, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # noqa: ASYNC240 - one unlink of a socket file on a failed start
        raise


async def shut_down(server: asyncio.AbstractServer, path: Path, tasks: list[asyncio.Task[None]]) -> None:
    """The common end of a front end's close(): cancel its tasks (bounded), stop listening, unlink."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5.0)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # noqa: ASYNC240 - one unlink of the socket file at shutdown
