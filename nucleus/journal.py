"""The deployment journal: the queue, every stage, and the committed component set, in SQLite.

Written ahead of every action so that ``kill -9`` at any moment leaves enough on disk to
finish the story after the next start: the committed set changes only in the same
transaction that marks a deployment finished, so after a crash the daemon either starts
the old set (and rolls back what was half-applied, using the configuration snapshot taken
before the first component was touched) or the new one — never a mix. sqlite-utils gives
us the schema helpers; WAL + ``synchronous=FULL`` make each commit durable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from nucleus.sqlite import Database, sqlite_utils


class DeploymentStatus(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED_NO_STATE_CHANGE = "FAILED_NO_STATE_CHANGE"
    FAILED_ROLLBACK_COMPLETE = "FAILED_ROLLBACK_COMPLETE"
    FAILED_ROLLBACK_NOT_REQUESTED = "FAILED_ROLLBACK_NOT_REQUESTED"
    FAILED_ROLLBACK_FAILED = "FAILED_ROLLBACK_FAILED"
    CANCELED = "CANCELED"

    @property
    def finished(self) -> bool:
        return self not in (DeploymentStatus.QUEUED, DeploymentStatus.IN_PROGRESS)


class Stage(StrEnum):
    """Stages of one deployment, in order. Recovery after a crash looks at the last one."""

    QUEUED = "queued"
    RESOLVING = "resolving"
    PREPARING = "preparing"  # fetch + verify artifacts: nothing running is touched yet
    NOTIFYING = "notifying"  # asking components whether they want to defer
    APPLYING = "applying"  # the first running component may be touched from here on
    AWAITING_RESTART = "awaiting_restart"  # bootstrap asked for a nucleus restart
    STARTING = "starting"
    SETTLING = "settling"
    ROLLING_BACK = "rolling_back"
    DONE = "done"


@dataclass(slots=True)
class ActiveSet:
    """What the device should run: the root components per group and the resolved versions."""

    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    # per component, the runWith deployments set ({posixUser, systemResourceLimits}; nucleus/run_with.py)
    run_with: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        data: dict[str, Any] = {"groups": self.groups, "components": self.components}
        if self.run_with:
            data["run_with"] = self.run_with
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ActiveSet:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(groups=dict(data.get("groups", {})), components=dict(data.get("components", {})),
                   run_with=dict(data.get("run_with", {})))


@dataclass(slots=True)
class DeploymentRecord:
    id: str
    group: str
    status: DeploymentStatus
    stage: Stage
    created_at: float
    updated_at: float
    request: dict[str, Any]
    reason: str | None = None
    previous: dict[str, Any] | None = None  # {"active": ActiveSet json, "configs": {...}}
    target: dict[str, Any] | None = None  # {"active": ..., "changed": [...], "removed": [...]}
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-component progress

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "status": str(self.status),
            "stage": str(self.stage),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "components": self.components,
        }


_SCHEMA_VERSION = 1

# Finished deployments kept, with their events: ``nucleus deployments`` shows the newest 50, the
# store's cleanup looks back 20, and a fleet deployment id is remembered by cloud_sync for 256
# (``KEEP_DEPLOYMENTS``), so the journal's "was this id applied?" backstop reaches as far.
# Greengrass keeps a bounded local history too (ListLocalDeployments: the last 10).
KEEP_FINISHED = 256


class Journal:
    """Sole owner of ``db/nucleus.db``. Thread-safe: the daemon calls it from worker threads.

    Every finished deployment beyond the newest ``keep_finished`` is deleted with its events when
    another one finishes: a device deployed to daily for years must not carry every request (recipe
    texts included) it ever got. Queued and in-progress deployments are never pruned.
    """

    def __init__(self, path: Path, *, keep_finished: int = KEEP_FINISHED) -> None:
        if keep_finished < 1:
            raise ValueError("keep_finished must be at least 1")
        self._keep_finished = keep_finished
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db = sqlite_utils.Database(conn)
        self._db.enable_wal()
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        self._create()

    def _create(self) -> None:
        with self._lock, self._db.atomic():
            if "deployments" not in self._db.table_names():
                self._db.table("deployments").create(
                    {
                        "seq": int,
                        "id": str,
                        "grp": str,
                        "status": str,
                        "stage": str,
                        "created_at": float,
                        "updated_at": float,
                        "request": str,
                        "reason": str,
                        "previous": str,
                        "target": str,
                        "components": str,
                    },
                    pk="seq",
                )
                self._db.table("deployments").create_index(["id"], unique=True)
                self._db.table("deployments").create_index(["status"])
            if "events" not in self._db.table_names():
                self._db.table("events").create(
                    {"seq": int, "deployment_id": str, "ts": float, "component": str, "message": str},
                    pk="seq",
                )
                self._db.table("events").create_index(["deployment_id"])
            if "state" not in self._db.table_names():
                self._db.table("state").create({"key": str, "value": str}, pk="key")
                self._db.table("state").insert({"key": "schema_version", "value": str(_SCHEMA_VERSION)})

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Database]:
        with self._lock, self._db.atomic() as db:
            yield db

    # --- committed state -------------------------------------------------------------
    def active(self) -> ActiveSet:
        with self._lock:
            rows = list(self._db.query("select value from state where key = 'active'"))
        return ActiveSet.from_json(rows[0]["value"] if rows else None)

    def _set_active(self, db: Database, active: ActiveSet) -> None:
        db.table("state").upsert({"key": "active", "value": active.to_json()}, pk="key")

    # --- deployments -----------------------------------------------------------------
    def enqueue(self, deployment_id: str, group: str, request: Mapping[str, Any]) -> DeploymentRecord:
        now = time.time()
        with self._tx() as db:
            db.table("deployments").insert(
                {
                    "id": deployment_id,
                    "grp": group,
                    "status": DeploymentStatus.QUEUED.value,
                    "stage": Stage.QUEUED.value,
                    "created_at": now,
                    "updated_at": now,
                    "request": json.dumps(request),
                    "reason": None,
                    "previous": None,
                    "target": None,
                    "components": "{}",
                }
            )
        record = self.get(deployment_id)
        assert record is not None
        return record

    def get(self, deployment_id: str) -> DeploymentRecord | None:
        with self._lock:
            rows = list(self._db.query("select * from deployments where id = ?", [deployment_id]))
        return _record(rows[0]) if rows else None

    def recent(self, limit: int = 50) -> list[DeploymentRecord]:
        with self._lock:
            rows = list(self._db.query("select * from deployments order by seq desc limit ?", [limit]))
        return [_record(r) for r in rows]

    def queued(self) -> list[DeploymentRecord]:
        with self._lock:
            rows = list(
                self._db.query("select * from deployments where status = 'QUEUED' order by seq asc")
            )
        return [_record(r) for r in rows]

    def in_progress(self) -> list[DeploymentRecord]:
        with self._lock:
            rows = list(
                self._db.query("select * from deployments where status = 'IN_PROGRESS' order by seq asc")
            )
        return [_record(r) for r in rows]

    def update(
        self,
        deployment_id: str,
        *,
        stage: Stage | None = None,
        status: DeploymentStatus | None = None,
        reason: str | None = None,
        previous: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
        components: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated_at": time.time()}
        if stage is not None:
            values["stage"] = stage.value
        if status is not None:
            values["status"] = status.value
        if reason is not None:
            values["reason"] = reason
        if previous is not None:
            values["previous"] = json.dumps(previous)
        if target is not None:
            values["target"] = json.dumps(target)
        if components is not None:
            values["components"] = json.dumps(components)
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            db.execute(f"update deployments set {sets} where id = ?", [*values.values(), deployment_id])

    def finish(
        self,
        deployment_id: str,
        status: DeploymentStatus,
        *,
        reason: str | None = None,
        active: ActiveSet | None = None,
        components: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Mark a deployment finished and, in the same transaction, commit the new active set."""
        values: dict[str, Any] = {
            "updated_at": time.time(),
            "status": status.value,
            "stage": Stage.DONE.value,
        }
        if reason is not None:
            values["reason"] = reason
        if components is not None:
            values["components"] = json.dumps(components)
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            db.execute(f"update deployments set {sets} where id = ?", [*values.values(), deployment_id])
            # The snapshot taken at APPLYING (every component's configuration, replaced recipes) is what
            # a recovery or a rollback of this deployment restores; once it is finished only the set it
            # replaced is read again (the store's cleanup). Kept whole, every row of the history carried
            # a copy of the device's whole configuration.
            db.execute("update deployments set previous = json_object('active', json_extract(previous, '$.active')) "
                       "where id = ? and previous is not null", [deployment_id])
            # Likewise the recipe texts of the request: read to run it, never once it has ended (the store
            # holds the recipes of what runs); the source names stay, for whoever reads the history.
            row = db.execute("select request from deployments where id = ?", [deployment_id]).fetchone()
            if row is not None and (trimmed := _without_recipe_texts(row[0])) is not None:
                db.execute("update deployments set request = ? where id = ?", [trimmed, deployment_id])
            if active is not None:
                self._set_active(db, active)
            self._prune(db)

    def _prune(self, db: Database) -> None:
        """Delete the finished deployments older than the newest ``keep_finished``, and their events."""
        unfinished = ("QUEUED", "IN_PROGRESS")
        old = [r[0] for r in db.execute(
            "select id from deployments where status not in (?, ?) order by seq desc limit -1 offset ?",
            [*unfinished, self._keep_finished]).fetchall()]
        for start in range(0, len(old), 500):  # SQLite's limit on bound parameters
            chunk = old[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            db.execute(f"delete from events where deployment_id in ({marks})", chunk)
            db.execute(f"delete from deployments where id in ({marks})", chunk)

    # --- progress events -----------------------------------------------------------------
    def add_event(self, deployment_id: str, message: str, component: str | None = None) -> None:
        with self._tx() as db:
            db.table("events").insert(
                {"deployment_id": deployment_id, "ts": time.time(), "component": component, "message": message}
            )

    def events(self, deployment_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return list(
                self._db.query(
                    "select seq, ts, component, message from events where deployment_id = ? and seq > ? "
                    "order by seq",
                    [deployment_id, after_seq],
                )
            )


def _without_recipe_texts(request: str | None) -> str | None:
    """The request JSON with each recipe's ``text`` dropped, or None if it has none to drop."""
    data = _loads(request)
    recipes = data.get("recipes") if isinstance(data, dict) else None
    if not isinstance(recipes, list) or not any(isinstance(r, dict) and "text" in r for r in recipes):
        return None
    data["recipes"] = [{k: v for k, v in r.items() if k != "text"} if isinstance(r, dict) else r for r in recipes]
    return json.dumps(data)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _record(row: Mapping[str, Any]) -> DeploymentRecord:
    return DeploymentRecord(
        id=row["id"],
        group=row["grp"],
        status=DeploymentStatus(row["status"]),
        stage=Stage(row["stage"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        request=_loads(row["request"]) or {},
        reason=row["reason"],
        previous=_loads(row["previous"]),
        target=_loads(row["target"]),
        components=_loads(row["components"]) or {},
    )
