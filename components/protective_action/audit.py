"""The audit log: every protective decision and its outcome, in a local SQLite file.

Durability is the point, so the file runs in WAL mode with ``synchronous=FULL``: a commit returns
only after the WAL is fsync'ed, and a committed decision survives ``kill -9`` and power loss. The
service commits a decision *before* it acknowledges it on the bus, so anything a listener has
seen acknowledged is in this file. The one exception is the write-ahead *intent* (see
:meth:`AuditLog.record`): written before the actuator is called, without waiting for the fsync
(which costs 0.3 ms at the median and over 10 ms at p99 on a busy disk), and made durable by the
outcome's commit right after the action, before anything is acknowledged. Automatic checkpoints
are off (one could land on the fast intent write and fsync there); :meth:`record_outcomes` and
durable :meth:`record` calls checkpoint every ``CHECKPOINT_EVERY`` commits instead, on the audit
worker. One connection, used by one thread at a time, hence ``check_same_thread`` off; since the
assets' decisions are applied side by side (the intent on the event loop, outcomes on the audit
worker), a lock makes "one at a time" hold.

sqlite-utils creates the schema and serves the reads; the two hot inserts are plain SQL because
sqlite-utils' ``insert`` introspects the table on every call, which costs more than the insert.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from components.protective_action.policy import Decision, State


def _sqlite_utils() -> ModuleType:
    """sqlite-utils without its optional numpy import (~20 MB this component has no use for)."""
    hidden = [name for name in ("numpy", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import numpy` raise ImportError
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                del sys.modules[name]
    return sqlite_utils


class AuditError(Exception):
    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"audit log {path}: {message}")
        self.path = path


@dataclass(slots=True, frozen=True)
class Outcome:
    action: str
    ok: bool
    detail: str
    started_at: float  # wall clock
    duration_s: float


CHECKPOINT_EVERY = 256


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # one statement sequence on the connection at a time
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._full = True
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._durable_commits = 0
            db = _sqlite_utils().Database(self._conn)
            db["decisions"].create({
                "decision_id": str, "asset": str, "ts": float, "state": str, "previous": str, "action": str,
                "actions": str, "suppressed": str, "reason": str, "event_ids": str, "scores": str,
            }, pk="decision_id", if_not_exists=True)
            db["outcomes"].create({
                "decision_id": str, "action": str, "ok": int, "detail": str, "started_at": float,
                "duration_s": float,
            }, pk=("decision_id", "action"), foreign_keys=[("decision_id", "decisions")], if_not_exists=True)
            db["decisions"].create_index(["asset", "ts"], if_not_exists=True)
        except (sqlite3.Error, OSError) as exc:  # OSError: its directory cannot be made
            raise AuditError(path, str(exc)) from exc
        self._db = db

    def close(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._conn.close()

    def _sync(self, full: bool) -> None:
        if full != self._full:
            self._conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._full = full

    def record(self, d: Decision, outcomes: Sequence[Outcome] = (), *, durable: bool = True,
               replace: bool = False) -> None:
        """Commit a decision (and outcomes already known).

        ``durable=True`` returns after the WAL is fsync'ed. ``durable=False`` (the write-ahead
        intent) returns once the commit is written to the OS — it survives ``kill -9`` of this
        process, not a power cut — and the next durable commit fsyncs it along with its own rows.
        ``replace=True`` (a decision recorded late) replaces its intent if that one made it: the row
        moves to the end, where a restart looks for the asset's state.
        """
        with self._lock:
            self._record(d, outcomes, durable, replace)

    def _record(self, d: Decision, outcomes: Sequence[Outcome], durable: bool, replace: bool = False) -> None:
        self._sync(durable)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute(
                f"INSERT {'OR REPLACE ' if replace else ''}INTO decisions (decision_id, asset, ts, state, previous, "
                "action, actions, suppressed, "
                "reason, event_ids, scores) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (d.decision_id, d.asset, d.ts, d.state.value, d.previous.value, d.actions[0] if d.actions else None,
                 json.dumps(d.actions), json.dumps(d.suppressed), d.reason, json.dumps(d.event_ids),
                 json.dumps(d.scores)))
            self._insert_outcomes(d.decision_id, outcomes)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        if durable:
            self._after_durable_commit()

    def _after_durable_commit(self) -> None:
        self._durable_commits += 1
        if self._durable_commits % CHECKPOINT_EVERY == 0:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def record_outcomes(self, decision_id: str, outcomes: Sequence[Outcome]) -> None:
        """Commit outcomes durably (and with them every earlier non-durable commit)."""
        with self._lock:
            self._sync(True)
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                self._insert_outcomes(decision_id, outcomes)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            self._after_durable_commit()

    def _insert_outcomes(self, decision_id: str, outcomes: Sequence[Outcome]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO outcomes (decision_id, action, ok, detail, started_at, duration_s) "
            "VALUES (?,?,?,?,?,?)",
            [(decision_id, o.action, int(o.ok), o.detail, o.started_at, o.duration_s) for o in outcomes])

    # --- reads ----------------------------------------------------------------------------------
    def decisions(self, asset: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, args = ("asset = ?", [asset]) if asset is not None else (None, [])
        with self._lock:
            rows = list(self._db["decisions"].rows_where(where, args, order_by="rowid desc", limit=limit))
        out = []
        for r in rows:
            for key in ("actions", "suppressed", "event_ids", "scores"):
                r[key] = json.loads(r[key])
            out.append(r)
        out.reverse()
        return out

    def outcomes(self, decision_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._db["outcomes"].rows_where("decision_id = ?", [decision_id]))

    def last_states(self) -> dict[str, State]:
        """The state each asset was left in: a latch or a safe state survives a restart. A state this
        version does not know (a log written by a newer one) is read as ``safe_state``: it needs a
        reset, the one way out that cannot be wrong."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT asset, state FROM decisions WHERE rowid IN (SELECT max(rowid) FROM decisions GROUP BY asset)"
            ).fetchall()
        known = {s.value for s in State}
        return {asset: State(state) if state in known else State.SAFE_STATE for asset, state in rows}
