"""The outbound spool: every message for the cloud, on disk, until the broker acknowledged it.

Greengrass keeps offline messages in 2.5 MB of memory and drops the oldest (nucleus issues #825,
#1775). Here they live in SQLite (WAL): bounded by bytes and count, with a per-message priority and
time-to-live, a documented overflow policy and durable counters of everything dropped.

Durability: a message is *acknowledged* to its publisher only after the transaction that holds it
committed — with ``durability="full"`` (the default) that commit is fsynced, so it survives power
loss; ``"normal"`` survives ``kill -9`` of the daemon but may lose the last commits on power loss.
Commits are grouped: all appends and PUBACK deletions that arrive while one commit runs go into the
next one, so one fsync covers hundreds of messages and concurrent publishers reach tens of
thousands of durable messages per second.

Message ids are ``<spool id>:<seq>``: the spool id is random, made when the file is created, and
seq is an AUTOINCREMENT key that SQLite never reuses, so an id is stable across restarts and
retransmissions — the cloud deduplicates on it.

One thread owns the connection (``SpoolStore`` is not thread-safe); :class:`Spool` is the asyncio
face that funnels every operation through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from cloud_sync.envelope import Kind, Record
from cloud_sync.errors import SpoolError, SpoolFullError
from cloud_sync.settings import Overflow
from cloud_sync.sqlite import Database

log = structlog.get_logger("cloud_sync.spool")

COUNTERS = ("accepted", "delivered", "dropped_overflow", "dropped_expired", "rejected_full",
            "rejected_disk_full")
EVICTION_LOG_INTERVAL_S = 10.0
RESERVE_CHECK_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class NewMessage:
    topic: str
    payload: bytes
    kind: Kind
    qos: int = 1
    retain: bool = False
    priority: int = 0
    ttl_s: float | None = None

    @property
    def size(self) -> int:
        return len(self.payload) + len(self.topic)


@dataclass(frozen=True, slots=True)
class SpoolLimits:
    max_bytes: int = 512 * 1024 * 1024
    max_messages: int = 2_000_000
    overflow: Overflow = "drop_lowest_priority"
    durability: str = "full"
    reserve_bytes: int = 1024 * 1024
    min_free_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpoolStats:
    spool_id: str
    messages: int
    bytes: int
    oldest: float | None
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"spool_id": self.spool_id, "messages": self.messages, "bytes": self.bytes,
                "oldest": self.oldest, **self.counters}


AppendResult = str | SpoolFullError

_SCHEMA_VERSION = "1"
# What SQLite says of a file that is not (or no longer) a spool database: moved aside, not fatal.
_CORRUPT = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})
_SALVAGE_PROBES = 24  # attempts to read on past unreadable pages of a corrupt spool
_SALVAGE_CHUNK = 1000


class SpoolStore:
    """Blocking SQLite spool; use it from one thread only (``Spool`` does)."""

    def __init__(self, path: Path, limits: SpoolLimits = SpoolLimits(), *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.limits = limits
        self._clock = clock
        self._last_eviction_log = -EVICTION_LOG_INTERVAL_S
        self._unlogged_evictions = 0
        self.quarantined: tuple[Path, str] | None = None
        self.quarantines = 0  # how many times this process moved a corrupt file aside
        self._seq_high = 0  # the highest seq handed out (AUTOINCREMENT's high mark)
        self.salvaged = 0
        try:
            row = self._open()
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode not in _CORRUPT:
                raise SpoolError(f"cannot open the spool {self.path}: {exc}", path=self.path) from exc
            row = self._recover(exc, at_start=True)
        self.count = int(row[0])
        self.bytes = int(row[1])
        self._page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._reserve_checked = -RESERVE_CHECK_INTERVAL_S
        self._ensure_reserve()

    def _recover(self, exc: sqlite3.DatabaseError, *, at_start: bool = False) -> tuple[int, int]:
        """The spool file is corrupt: move it aside, start a new one with what can still be read.

        At start, or when a read or write finds a damaged page the open did not touch (an index
        page, say): a spool that fails every write would otherwise refuse every message, and leave
        its publishers waiting, until someone deletes the file."""
        log.error("spool.corrupt", path=str(self.path), error=str(exc), at_start=at_start)
        counted = dict(getattr(self, "counters", {}))
        with contextlib.suppress(sqlite3.Error, AttributeError):
            self._conn.close()
        moved = self._quarantine()
        try:
            floor = 0 if at_start else self._seq_high
            self._open()
            self.salvaged = self._salvage(moved, floor)
            if not at_start:  # what this process counted is the truth; the old file's may be unreadable
                self.counters = counted
                self._conn.executemany(
                    "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = ?",
                    [(k, v, v) for k, v in counted.items()])
            count, nbytes = self._conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        except sqlite3.Error as again:
            raise SpoolError(f"cannot open the spool {self.path}: {again}", path=self.path) from again
        self.quarantined = (moved, str(exc))
        self.quarantines += 1
        return int(count), int(nbytes)

    def _open(self) -> tuple[int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        sync = "FULL" if self.limits.durability == "full" else "NORMAL"
        self._conn.execute(f"PRAGMA synchronous={sync}")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._db = Database(self._conn)
        self._create()
        self.spool_id = self._meta("spool_id")
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.counters.update({str(k): int(v) for k, v in self._conn.execute("SELECT name, value FROM counters")})
        count, nbytes = self._conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        self._seq_high = int(self._conn.execute(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0])
        return int(count), int(nbytes)

    def _quarantine(self) -> Path:
        """Move a corrupt spool file (with its WAL) aside, so that a new spool can start.

        Refusing to start would silence the device for good: no uplink, no device status, no fleet
        deployment to repair it, and every new message for the cloud refused. The old file is kept
        whole, for ``sqlite3 FILE .recover``, and the move is logged and reported as SPOOL_ERROR."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.rename(target.with_name(target.name + suffix))
            self.path.rename(target)
        except OSError as exc:
            raise SpoolError(f"the spool file is corrupt and cannot be moved aside: {exc.strerror or exc}",
                             path=self.path) from exc
        log.error("spool.quarantined", path=str(self.path), moved_to=str(target))
        return target

    def _salvage(self, old: Path, floor: int = 0) -> int:
        """Copy the messages that can still be read from a corrupt spool into the new one.

        They keep their seq, and the new spool takes the old spool id, so their ids do not change:
        the cloud still drops a copy it had received before the corruption. Reading stops at a page
        SQLite cannot read and resumes past it (a few probes further on); what is left unread stays
        in the moved file. Best effort: a file whose header is gone gives nothing. Rows are copied
        in chunks, so a spool of hundreds of MB is never held in memory. ``floor``: the highest seq
        this process handed out; new seqs start above it, so that a PUBACK of an old message in
        flight can never delete a salvaged one that took its seq."""
        try:
            src = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
        except sqlite3.Error:
            return 0
        spool_id: str | None = None
        seq_high = copied = 0
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            with contextlib.suppress(sqlite3.Error):
                found = src.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()
                high = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
                # The old id is kept only with the highest seq it handed out: a new message must never
                # get the id of an unreadable one the cloud may have received (it would be dropped there).
                if found and high:
                    spool_id, seq_high = str(found[0]), int(high[0])
            if spool_id is None and floor:
                conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('messages', ?)", (floor,))
            insert = ("INSERT INTO messages(seq, topic, payload, kind, qos, retain, priority, created, expires,"
                      " size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
            buffer: list[tuple[Any, ...]] = []

            def flush() -> None:
                # new ids when the old ones cannot be told apart safely from lost ones
                conn.executemany(insert, buffer if spool_id is not None else [(None, *r[1:]) for r in buffer])
                buffer.clear()

            read = start = probes = 0
            while probes < _SALVAGE_PROBES:
                try:
                    for r in src.execute(
                            "SELECT seq, topic, payload, kind, qos, retain, priority, created, expires, size"
                            " FROM messages WHERE seq > ? ORDER BY seq", (start,)):
                        buffer.append(tuple(r))
                        read = start = int(r[0])
                        copied += 1
                        if len(buffer) >= _SALVAGE_CHUNK:
                            flush()
                    break
                except sqlite3.Error:
                    probes += 1
                    start += 2 ** probes  # past the page that failed, further each time
            flush()
            if spool_id is not None:
                seq_high = max(seq_high, read)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'spool_id'", (spool_id,))
                conn.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
                conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('messages', ?)", (seq_high,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        finally:
            src.close()
        if spool_id is not None:
            self.spool_id = spool_id
        self._seq_high = max(floor, seq_high, int(conn.execute(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0]))
        log.warning("spool.salvaged", messages=copied, path=str(self.path), source=str(old), spool_id=self.spool_id)
        return copied

    # --- the disk reserve ---------------------------------------------------------------------------------
    # On a full disk SQLite cannot even record a deletion (the WAL must grow), so a spool that filled
    # the disk could never drain. A reserve file next to the database is given up the moment a
    # delivery cannot be recorded, and made again once the disk has room.
    def _ensure_reserve(self) -> None:
        size = self.limits.reserve_bytes
        if size <= 0 or self._reserve.exists():
            return
        now = time.monotonic()
        if now - self._reserve_checked < RESERVE_CHECK_INTERVAL_S:
            return
        self._reserve_checked = now
        try:
            if shutil.disk_usage(self._reserve.parent).free < 4 * size:
                return
            with self._reserve.open("wb") as f:
                f.write(b"\0" * size)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()

    def _disk_low(self) -> bool:
        """Refuse new messages before the disk is full, so that deliveries can still be recorded."""
        floor = self.limits.min_free_bytes
        if floor <= 0:
            return False
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return False
        if free >= floor:
            return False
        # SQLite keeps the file's size after deletions and fills its free pages before it grows the
        # file: those pages are room too. Without them, a spool that filled the disk during an outage
        # refused every new message for good, even once its backlog was delivered.
        try:
            pages = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        except sqlite3.Error:
            return True
        return free + pages * self._page_size < floor

    def _release_reserve(self) -> bool:
        try:
            self._reserve.unlink()
        except OSError:
            return False
        log.warning("spool.reserve_released", path=str(self._reserve), bytes=self.limits.reserve_bytes)
        return True

    def _create(self) -> None:
        db = self._db
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if "meta" not in db.table_names():
                db["meta"].create({"key": str, "value": str}, pk="key")
                db["counters"].create({"name": str, "value": int}, pk="name")
                self._conn.execute(
                    "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
                    " payload BLOB NOT NULL, kind TEXT NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
                    " priority INTEGER NOT NULL, created REAL NOT NULL, expires REAL, size INTEGER NOT NULL)")
                db["messages"].create_index(["priority", "seq"], index_name="messages_by_priority")
                self._conn.execute("CREATE INDEX messages_by_expiry ON messages(expires) WHERE expires IS NOT NULL")
                self._conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                                       [("spool_id", secrets.token_hex(8)), ("schema", _SCHEMA_VERSION)])
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SpoolError(f"spool has no {key!r} in its meta table", path=self.path)
        return str(row[0])

    def message_id(self, seq: int) -> str:
        return f"{self.spool_id}:{seq}"

    # --- writes ---------------------------------------------------------------------------------------
    def apply(self, appends: Sequence[NewMessage], acks: Sequence[int] = ()) -> list[AppendResult]:
        """Delete acknowledged seqs and append new messages in one durable transaction.

        Returns one result per append: its message id, or the SpoolFullError that refused it.
        On a full disk the appends are refused (``reason="disk_full"``), the deletions retried alone,
        and nothing already spooled is touched.
        """
        if not (appends and self._disk_low()):
            try:
                results = self._apply_or_recover(appends, acks)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise SpoolError(f"spool write failed: {exc}", path=self.path) from exc
                if not appends:
                    if self._release_reserve() or len(acks) > 16:
                        try:
                            for i in range(0, len(acks), 16):  # small transactions need less WAL
                                self._apply((), acks[i:i + 16])
                        except sqlite3.OperationalError as again:
                            raise SpoolFullError("disk full: cannot record deliveries", path=self.path,
                                                 reason="disk_full") from again
                        return []
                    raise SpoolFullError("disk full: cannot record deliveries", path=self.path,
                                         reason="disk_full") from exc
            else:
                if appends:
                    self._ensure_reserve()
                return results
        log.error("spool.disk_full", path=str(self.path), refused=len(appends))
        refused = SpoolFullError(f"disk full: spool {self.path} cannot take more messages", path=self.path,
                                 reason="disk_full")
        self._bump({"rejected_disk_full": len(appends)})
        if acks:
            try:
                self.apply((), acks)
            except SpoolError as exc:
                log.error("spool.ack_failed", path=str(self.path), error=str(exc))  # noqa: TRY400
        return [refused] * len(appends)

    def _apply_or_recover(self, appends: Sequence[NewMessage], acks: Sequence[int]) -> list[AppendResult]:
        try:
            return self._apply(appends, acks)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode not in _CORRUPT:
                raise SpoolError(f"spool write failed: {exc}", path=self.path) from exc
            self.count, self.bytes = self._recover(exc)
        try:  # once, on the new file
            return self._apply(appends, acks)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"spool write failed: {exc}", path=self.path) from exc

    def _bump(self, delta: dict[str, int]) -> None:
        """Count outside a failed transaction (best effort: the disk may still be full)."""
        for k, v in delta.items():
            self.counters[k] = self.counters.get(k, 0) + v
        with contextlib.suppress(sqlite3.Error):
            self._conn.executemany(
                "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                [(k, v, v) for k, v in delta.items()])

    def _apply(self, appends: Sequence[NewMessage], acks: Sequence[int]) -> list[AppendResult]:
        conn = self._conn
        now = self._clock()
        delta: dict[str, int] = {}
        count, nbytes = self.count, self.bytes
        results: list[AppendResult] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if acks:
                freed = self._delete(acks)
                count -= freed[0]
                nbytes -= freed[1]
                delta["delivered"] = freed[0]
            limits = self.limits
            inserted: dict[int, int] = {}  # seq -> index in results
            for msg in appends:
                size = msg.size
                if size > limits.max_bytes:  # no eviction could make room: say so, not "spool full (0 messages)"
                    results.append(SpoolFullError(
                        f"message of {size} bytes (payload and topic) is larger than the whole spool "
                        f"(spool_max_bytes {limits.max_bytes})", path=self.path, topic=msg.topic, reason="spool_full"))
                    delta["rejected_full"] = delta.get("rejected_full", 0) + 1
                    continue
                if (limits.overflow == "reject_new" and (
                        count + 1 > limits.max_messages or nbytes + size > limits.max_bytes)):
                    results.append(SpoolFullError(
                        f"spool full ({count} messages, {nbytes} bytes; overflow policy {limits.overflow})",
                        path=self.path, topic=msg.topic, reason="spool_full"))
                    delta["rejected_full"] = delta.get("rejected_full", 0) + 1
                    continue
                expires = now + msg.ttl_s if msg.ttl_s is not None else None
                cur = conn.execute(
                    "INSERT INTO messages(topic, payload, kind, qos, retain, priority, created, expires, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (msg.topic, msg.payload, msg.kind, msg.qos, int(msg.retain), msg.priority, now, expires, size))
                seq = int(cur.lastrowid or 0)
                self._seq_high = max(self._seq_high, seq)
                inserted[seq] = len(results)
                results.append(self.message_id(seq))
                count += 1
                nbytes += size
            if count > limits.max_messages or nbytes > limits.max_bytes:
                count, nbytes = self._evict(count, nbytes, inserted, results, delta=delta, now=now)
            accepted = sum(1 for r in results if isinstance(r, str))
            if accepted:
                delta["accepted"] = accepted
            delta = {k: v for k, v in delta.items() if v}
            if delta:
                conn.executemany(
                    "INSERT INTO counters(name, value) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET value = value + ?",
                    [(k, v, v) for k, v in delta.items()])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self.count, self.bytes = count, nbytes
        for k, v in delta.items():
            self.counters[k] = self.counters.get(k, 0) + v
        return results

    def _delete(self, seqs: Sequence[int]) -> tuple[int, int]:
        n = b = 0
        for i in range(0, len(seqs), 500):
            chunk = list(seqs[i:i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"DELETE FROM messages WHERE seq IN ({marks}) RETURNING size", chunk).fetchall()
            n += len(rows)
            b += sum(int(r[0]) for r in rows)
        return n, b

    def _evict(self, count: int, nbytes: int, inserted: dict[int, int], results: list[AppendResult],
               *, delta: dict[str, int], now: float) -> tuple[int, int]:
        """Make room by the overflow policy; expired messages go first. Never silent: counted and logged."""
        limits = self.limits
        rows = self._conn.execute("DELETE FROM messages WHERE expires IS NOT NULL AND expires <= ? RETURNING seq, size",
                                  (now,)).fetchall()
        for seq, size in rows:
            count -= 1
            nbytes -= int(size)
            self._refuse(int(seq), inserted, results, delta, "dropped_expired")
        order = "seq" if limits.overflow == "drop_oldest" else "priority, seq"
        evicted = 0
        while count > limits.max_messages or nbytes > limits.max_bytes:
            need = max(count - limits.max_messages, 1)
            victims = self._conn.execute(f"SELECT seq, size FROM messages ORDER BY {order} LIMIT ?",
                                         (min(max(need, 64), 10_000),)).fetchall()
            if not victims:
                break
            chosen: list[int] = []
            for seq, size in victims:
                if count <= limits.max_messages and nbytes <= limits.max_bytes:
                    break
                chosen.append(int(seq))
                count -= 1
                nbytes -= int(size)
            self._delete_unchecked(chosen)
            for seq in chosen:
                if self._refuse(seq, inserted, results, delta, "dropped_overflow"):
                    evicted += 1
        if evicted:
            self._unlogged_evictions += evicted
            mono = time.monotonic()
            if mono - self._last_eviction_log >= EVICTION_LOG_INTERVAL_S:
                log.warning("spool.evicted", count=self._unlogged_evictions, policy=limits.overflow,
                            messages=count, bytes=nbytes, path=str(self.path))
                self._last_eviction_log = mono
                self._unlogged_evictions = 0
        return count, nbytes

    def _delete_unchecked(self, seqs: list[int]) -> None:
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            self._conn.execute(f"DELETE FROM messages WHERE seq IN ({','.join('?' * len(chunk))})", chunk)

    def _refuse(self, seq: int, inserted: dict[int, int], results: list[AppendResult], delta: dict[str, int],
                counter: str) -> bool:
        """Account one removed row; a message evicted in the very transaction that added it is refused."""
        index = inserted.pop(seq, None)
        if index is None:
            delta[counter] = delta.get(counter, 0) + 1
            return True
        topic = None
        results[index] = SpoolFullError(
            f"spool full (overflow policy {self.limits.overflow}): the message has the lowest priority",
            path=self.path, topic=topic, reason="spool_full")
        delta["rejected_full"] = delta.get("rejected_full", 0) + 1
        return False

    # --- reads ---------------------------------------------------------------------------------------------
    def peek(self, after_seq: int, limit: int) -> list[Record]:
        """Up to ``limit`` live messages with seq > after_seq, oldest first; expired ones are purged."""
        now = self._clock()
        query = ("SELECT seq, topic, payload, kind, qos, retain, priority, created, expires FROM messages"
                 " WHERE seq > ? ORDER BY seq LIMIT ?")
        try:
            rows = self._conn.execute(query, (after_seq, limit)).fetchall()
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode not in _CORRUPT:
                raise SpoolError(f"spool read failed: {exc}", path=self.path) from exc
            self.count, self.bytes = self._recover(exc)
            try:
                rows = self._conn.execute(query, (after_seq, limit)).fetchall()
            except sqlite3.Error as again:
                raise SpoolError(f"spool read failed: {again}", path=self.path) from again
        out: list[Record] = []
        expired: list[int] = []
        for seq, topic, payload, kind, qos, retain, priority, created, expires in rows:
            if expires is not None and expires <= now:
                expired.append(int(seq))
                continue
            out.append(Record(int(seq), self.message_id(int(seq)), topic, bytes(payload), kind, int(qos),
                              bool(retain), int(priority), float(created)))
        if expired:
            self._purge(expired)
        return out

    def _purge(self, seqs: list[int]) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            n, b = self._delete(seqs)
            self._conn.execute(
                "INSERT INTO counters(name, value) VALUES ('dropped_expired', ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + ?", (n, n))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            log.error("spool.purge_failed", path=str(self.path), error=str(exc))  # noqa: TRY400
            return
        self.count -= n
        self.bytes -= b
        self.counters["dropped_expired"] = self.counters.get("dropped_expired", 0) + n
        log.info("spool.expired", count=n, path=str(self.path))

    def all_ids(self) -> list[str]:
        """Every spooled message id (tests and tools)."""
        return [self.message_id(int(r[0])) for r in self._conn.execute("SELECT seq FROM messages ORDER BY seq")]

    def stats(self) -> SpoolStats:
        oldest = self._conn.execute("SELECT min(created) FROM messages").fetchone()[0]
        return SpoolStats(self.spool_id, self.count, self.bytes, oldest, dict(self.counters))

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()


@dataclass(slots=True)
class _Pending:
    appends: list[tuple[NewMessage, asyncio.Future[AppendResult]]] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    ack_waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Spool:
    """The asyncio face of the spool: group commit through one worker thread.

    ``append`` returns once the message is durable (the id) or raises ``SpoolFullError``;
    ``ack`` returns once the deletion is durable. ``appended`` is set on every commit that added
    messages, so the uplink waits on it instead of polling.
    """

    def __init__(self, path: Path, limits: SpoolLimits = SpoolLimits(), *,
                 clock: Callable[[], float] = time.time,
                 on_quarantine: Callable[[Path, str, int], None] | None = None) -> None:
        self.path = Path(path)
        self._limits = limits
        self._on_quarantine = on_quarantine  # (where the corrupt file went, why, messages kept)
        self._quarantines_told = 0
        self._clock = clock
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._store: SpoolStore | None = None
        self._pending = _Pending()
        self._writer: asyncio.Task[None] | None = None
        self._stats: SpoolStats | None = None
        self._closed = False
        self.appended = asyncio.Event()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._exec, lambda: SpoolStore(self.path, self._limits,
                                                                                  clock=self._clock))
        self._check_quarantine(self._store)
        self._stats = await loop.run_in_executor(self._exec, self._store.stats)
        if self._stats.messages:
            self.appended.set()
        log.info("spool.opened", path=str(self.path), spool_id=self._store.spool_id,
                 messages=self._stats.messages, bytes=self._stats.bytes)

    @property
    def spool_id(self) -> str:
        return self._require().spool_id

    def _check_quarantine(self, store: SpoolStore) -> None:
        """Tell ``on_quarantine`` once per corrupt file this process moved aside."""
        if store.quarantines > self._quarantines_told and store.quarantined is not None:
            self._quarantines_told = store.quarantines
            if self._on_quarantine is not None:
                self._on_quarantine(store.quarantined[0], store.quarantined[1], store.salvaged)

    @property
    def salvaged(self) -> int:
        """How many messages were read back from a corrupt spool file (see ``quarantined``)."""
        return self._store.salvaged if self._store is not None else 0

    @property
    def quarantined(self) -> tuple[Path, str] | None:
        """(where a corrupt spool file was moved, what SQLite said of it) if open() had to move one."""
        return self._store.quarantined if self._store is not None else None

    def _require(self) -> SpoolStore:
        if self._store is None or self._closed:
            raise SpoolError("spool is not open", path=self.path)
        return self._store

    async def append(self, message: NewMessage) -> str:
        result = (await self.append_many([message]))[0]
        if isinstance(result, SpoolFullError):
            raise result
        return result

    async def append_many(self, messages: Sequence[NewMessage]) -> list[AppendResult]:
        self._require()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in messages]
        self._pending.appends.extend(zip(messages, futures, strict=True))
        self._kick()
        return list(await asyncio.gather(*futures))

    async def ack(self, seqs: Sequence[int]) -> None:
        self._require()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.acks.extend(seqs)
        self._pending.ack_waiters.append(fut)
        self._kick()
        await fut

    async def peek(self, after_seq: int, limit: int) -> list[Record]:
        store = self._require()
        try:
            records = await asyncio.get_running_loop().run_in_executor(self._exec, store.peek, after_seq, limit)
        finally:
            self._check_quarantine(store)
        self._stats = replace(self._stats or store.stats(), messages=store.count, bytes=store.bytes,
                              counters=dict(store.counters))
        return records

    async def refresh_stats(self) -> SpoolStats:
        store = self._require()
        self._stats = await asyncio.get_running_loop().run_in_executor(self._exec, store.stats)
        return self._stats

    def stats(self) -> SpoolStats:
        if self._stats is None:
            raise SpoolError("spool is not open", path=self.path)
        return self._stats

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain(), name="spool-writer")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        store = self._require()
        while self._pending.appends or self._pending.acks:
            batch, self._pending = self._pending, _Pending()
            messages = [m for m, _ in batch.appends]
            try:
                results = await loop.run_in_executor(self._exec, store.apply, messages, batch.acks)
            except Exception as caught:  # every publisher must get an answer, never wait forever
                exc = caught if isinstance(caught, SpoolError) else SpoolError(
                    f"spool write failed: {caught}", path=self.path)
                self._check_quarantine(store)
                for _, fut in batch.appends:
                    if not fut.done():
                        fut.set_exception(exc)
                for w in batch.ack_waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            self._check_quarantine(store)
            for (_, fut), result in zip(batch.appends, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
            for w in batch.ack_waiters:
                if not w.done():
                    w.set_result(None)
            prev = self._stats
            self._stats = SpoolStats(store.spool_id, store.count, store.bytes,
                                     prev.oldest if prev is not None else None, dict(store.counters))
            if any(isinstance(r, str) for r in results):
                self.appended.set()

    async def close(self) -> None:
        """Finish pending commits, checkpoint and close; idempotent."""
        if self._closed:
            return
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        self._closed = True
        store = self._store
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(self._exec, store.close)
        self._exec.shutdown(wait=True)
        log.info("spool.closed", path=str(self.path))
