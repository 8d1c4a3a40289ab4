"""Bounds a daemon left running for months must keep: found by benchmarks/soak.py, each shown here
with a small count and a small retention instead of a long soak."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nucleus.journal import KEEP_FINISHED, ActiveSet, DeploymentStatus, Journal


def _rows(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        return (conn.execute("select count(*) from deployments").fetchone()[0],
                conn.execute("select count(*) from events").fetchone()[0])
    finally:
        conn.close()


def test_the_journal_keeps_a_bounded_history_of_finished_deployments(tmp_path: Path) -> None:
    db = tmp_path / "nucleus.db"
    journal = Journal(db, keep_finished=5)
    try:
        journal.enqueue("waiting", "g", {"n": -1})  # queued before all the others: never pruned
        statuses = [DeploymentStatus.SUCCEEDED, DeploymentStatus.FAILED_ROLLBACK_COMPLETE,
                    DeploymentStatus.FAILED_NO_STATE_CHANGE]
        for i in range(30):
            did = f"d{i}"
            journal.enqueue(did, "g", {"n": i, "recipes": ["x" * 1000]})
            journal.add_event(did, "queued")
            journal.add_event(did, "applying", "A")
            journal.finish(did, statuses[i % 3], active=ActiveSet(components={"A": f"1.0.{i}"}))
        kept = [r.id for r in journal.recent(limit=100)]
        assert kept == ["d29", "d28", "d27", "d26", "d25", "waiting"]
        assert journal.get("d24") is None and journal.events("d24") == []
        assert [e["message"] for e in journal.events("d29")] == ["queued", "applying"]
        assert [r.id for r in journal.queued()] == ["waiting"]
        assert journal.active().components == {"A": "1.0.29"}
    finally:
        journal.close()
    assert _rows(db) == (6, 10)


def test_the_daemon_default_history_bound_holds(tmp_path: Path) -> None:
    """The default the daemon opens its journal with: KEEP_FINISHED, not every deployment ever run."""
    db = tmp_path / "nucleus.db"
    journal = Journal(db)
    try:
        for i in range(KEEP_FINISHED + 20):
            journal.enqueue(f"d{i}", "g", {"n": i})
            journal.finish(f"d{i}", DeploymentStatus.SUCCEEDED)
    finally:
        journal.close()
    assert _rows(db)[0] == KEEP_FINISHED
