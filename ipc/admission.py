"""Admission of connections that have not authenticated yet, shared by both IPC front ends.

Until its HELLO (native) or CONNECT (Greengrass) is accepted a connection is anonymous: any local
process allowed to open the socket can hold one for the whole handshake timeout. The servers'
connection limit (10,000) is shared with every authenticated component, so a process opening
sockets and never speaking could fill it and lock out real components, the CLI and a protective
action's component with it. Anonymous connections therefore get a bound of their own, per peer
uid (SO_PEERCRED) and in all, far below the connection limit.

Over a bound, an *older* anonymous connection (of that uid; over the total bound, of the uid
holding the most) is closed to make room, not the new one: refusing newcomers would let a flood
that keeps its sockets open refuse every newcomer, real components of the same uid included, until
the timeout. The one closed is the oldest that has not said anything (no byte received or waiting
in its socket); a real client writes its HELLO as soon as it connects, so while a flood of silent
sockets goes on it is not the one closed, even if the daemon has not read its HELLO yet. Closes come in
bursts; one warning starts a burst (naming the uid and pid) and one line ends it with the count.
The totals are in :meth:`Admission.stats` (``nucleus status``, key ``ipc``).

The bounds must hold below the process's descriptor limit, or they never engage: with the soft
``RLIMIT_NOFILE`` of 1024 that most shells and systemd units give, a flood of a thousand silent
sockets made ``accept`` fail with EMFILE before the per-uid bound of 1,024 was reached, asyncio
logged every failed accept with a traceback (hundreds of thousands of lines a second), and real
clients waited for the flood's handshake timeout. So the soft limit is raised to the hard one, and
the bounds are a quarter (in all) and an eighth (per uid) of the limit when it is still low.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import resource
import socket
import struct
import termios
from typing import Any, Final, Protocol

import structlog

log = structlog.get_logger("ipc.admission")

#: A fifth of the servers' 10,000 connections; per uid, room for a thousand components of one user
#: starting at once (each is anonymous only until its HELLO is read).
DEFAULT_MAX_ANONYMOUS: Final = 2048
DEFAULT_MAX_ANONYMOUS_PER_UID: Final = 1024
#: How many of the oldest anonymous connections are asked whether they are speaking before one is closed.
SHED_SCAN: Final = 16
#: A HELLO or CONNECT is a token and a name: a frame above this before authentication is refused,
#: so an anonymous connection buffers at most this much (not the 16 MiB an authenticated one may send).
MAX_ANONYMOUS_FRAME: Final = 16 * 1024
BURST_QUIET_S: Final = 10.0
#: The bounds never go below these, however few descriptors the process has.
MIN_ANONYMOUS: Final = 16
_UCRED: Final = struct.Struct("3i")


class Anonymous(Protocol):
    """A connection still in its handshake, as admission sees it."""

    def shed(self, reason: str) -> None:
        """Close this connection (it has not authenticated) to make room for a newer one."""
        ...

    def speaking(self) -> bool:
        """True if the peer has sent something (read, or waiting in the socket)."""
        ...


def has_pending_bytes(sock: Any) -> bool:
    """Bytes wait in ``sock`` that the daemon has not read yet (a HELLO on its way).

    ``sock`` is what a transport's ``get_extra_info("socket")`` gives (asyncio's wrapper, which
    refuses recv): the count comes from FIONREAD on its descriptor."""
    if sock is None:
        return False
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return True  # closed under us: its connection_lost is on its way; as good a victim as any
    return int.from_bytes(raw, "little", signed=True) > 0


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` after raising it to the hard limit (what a server should do: the
    soft limit is a default for programs that do not expect many descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def peer_credentials(sock: socket.socket | None) -> tuple[int | None, int | None]:
    """(pid, uid) of the peer of a Unix socket, as the kernel reports them; (None, None) if unknown."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None, None
    pid, uid, _gid = _UCRED.unpack(raw)
    return (pid or None), uid


class Admission:
    """Bounds anonymous connections per peer uid and in all; one instance serves both sockets."""

    def __init__(self, *, max_anonymous: int | None = None, max_anonymous_per_uid: int | None = None,
                 burst_quiet_s: float = BURST_QUIET_S) -> None:
        if max_anonymous is None or max_anonymous_per_uid is None:  # below the descriptor limit (see above)
            fds = descriptor_limit()
            if max_anonymous is None:
                max_anonymous = max(MIN_ANONYMOUS, min(DEFAULT_MAX_ANONYMOUS, fds // 4))
            if max_anonymous_per_uid is None:
                max_anonymous_per_uid = max(MIN_ANONYMOUS, min(DEFAULT_MAX_ANONYMOUS_PER_UID, fds // 8))
        self.max_anonymous = max(1, max_anonymous)
        self.max_anonymous_per_uid = max(1, min(max_anonymous_per_uid, self.max_anonymous))
        self.burst_quiet_s = burst_quiet_s
        self._by_uid: dict[int | None, dict[Anonymous, int | None]] = {}  # oldest first; value: pid
        self._count = 0
        self.counters = {"anonymous_shed": 0, "handshake_timeouts": 0, "handshakes_refused": 0}
        self._burst: dict[int | None, int] = {}
        self._burst_refused = 0
        self._burst_end: asyncio.TimerHandle | None = None

    @property
    def anonymous(self) -> int:
        return self._count

    def admit(self, conn: Anonymous, uid: int | None, pid: int | None) -> None:
        """Count ``conn`` as anonymous; close the oldest ones over a bound."""
        held = self._by_uid.setdefault(uid, {})
        held[conn] = pid
        self._count += 1
        if len(held) > self.max_anonymous_per_uid:
            self._shed_oldest(uid, "anonymous connections of this uid over the bound")
        if self._count > self.max_anonymous:
            greediest = max(self._by_uid, key=lambda u: len(self._by_uid[u]))
            self._shed_oldest(greediest, "anonymous connections over the bound")

    def done(self, conn: Anonymous, uid: int | None) -> None:
        """``conn`` authenticated or closed: it no longer counts."""
        held = self._by_uid.get(uid)
        if held is not None and held.pop(conn, _MISSING) is not _MISSING:
            self._count -= 1
            if not held:
                del self._by_uid[uid]

    def handshake_timed_out(self, uid: int | None, pid: int | None, timeout: float) -> None:
        """Counted, and logged once per burst like a shed connection (a flood times out together)."""
        self.counters["handshake_timeouts"] += 1
        self._note_burst(uid, pid, f"no handshake within {timeout} s")

    def refused(self, uid: int | None, pid: int | None) -> bool:
        """A handshake refused before authentication (an unknown token, a bad HELLO or CONNECT, a
        protocol error): counted, and True for the one refusal the caller should log, the first while
        no burst is going on. A process trying token after token, or a flood of bad handshakes, got a
        warning per connection (a thousand lines for a thousand connects, as fast as it could
        connect); now the rest of a burst is in its closing line (``refused``)."""
        self.counters["handshakes_refused"] += 1
        first = not self._burst
        self._burst_refused += 1
        self._note_burst(uid, pid, "handshake refused", log_first=False)
        return first

    def stats(self) -> dict[str, Any]:
        return {"anonymous": self._count, "max_anonymous": self.max_anonymous,
                "max_anonymous_per_uid": self.max_anonymous_per_uid, **self.counters}

    def _shed_oldest(self, uid: int | None, why: str) -> None:
        held = self._by_uid[uid]
        victim, pid = next(iter(held.items()))
        for i, (conn, conn_pid) in enumerate(held.items()):
            if i >= SHED_SCAN:
                break
            if not conn.speaking():
                victim, pid = conn, conn_pid
                break
        self.done(victim, uid)
        self.counters["anonymous_shed"] += 1
        self._note_burst(uid, pid, why)
        victim.shed(f"closed before authenticating: {why} (max {self.max_anonymous_per_uid} per uid, "
                    f"{self.max_anonymous} in all)")

    def _note_burst(self, uid: int | None, pid: int | None, why: str, *, log_first: bool = True) -> None:
        first = not self._burst
        self._burst[uid] = self._burst.get(uid, 0) + 1
        if first and log_first:
            log.warning("ipc.anonymous_connections_closed", uid=uid, pid=pid, reason=why,
                        max_per_uid=self.max_anonymous_per_uid, max_total=self.max_anonymous,
                        note="further closes are counted until the burst ends")
        loop = asyncio.get_running_loop()
        if self._burst_end is not None:
            self._burst_end.cancel()
        self._burst_end = loop.call_later(self.burst_quiet_s, self._end_burst)

    def _end_burst(self) -> None:
        self._burst_end = None
        burst, self._burst = self._burst, {}
        refused, self._burst_refused = self._burst_refused, 0
        log.warning("ipc.anonymous_burst_ended", closed=sum(burst.values()), refused=refused,
                    by_uid={str(u): n for u, n in sorted(burst.items(), key=lambda kv: -kv[1])[:10]})

    def close(self) -> None:
        if self._burst_end is not None:
            self._burst_end.cancel()
            self._end_burst()


_MISSING: Final[Any] = object()
