"""Bounds a daemon left running for months must keep: found by benchmarks/soak.py, each shown here
with a small count and a small retention instead of a long soak."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon import write_recipe

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


def _artifact(directory: Path, name: str) -> list[dict[str, Any]]:
    file = directory / name
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(name.encode() * 1000)
    return [{"URI": file.as_uri(), "Digest": base64.b64encode(hashlib.sha256(file.read_bytes()).digest()).decode()}]


def _stored_versions(root: Path, name: str, expected: set[str]) -> set[str]:
    """The versions with artifacts in the store, once they are ``expected`` (the cleanup follows the
    outcome the CLI prints) or after a bounded wait."""
    folder = root / "packages" / "artifacts" / name
    found: set[str] = set()
    for _ in range(100):
        found = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if found == expected:
            break
        time.sleep(0.1)
    return found


@pytest.mark.slow
def test_failed_versions_do_not_pile_up_in_the_store(daemon: Any, short_tmp: Path) -> None:
    """Each failing version's artifacts were kept until some later deployment succeeded: a device sent
    failing versions (a bad rollout, retried with new builds) kept every one of them on disk."""
    d = short_tmp / "r"
    run = "exec sleep 600"
    for version in ("1.0.0", "1.0.1"):  # keep_versions 1: 1.0.0 is kept for a rollback of 1.0.1
        daemon.cli("deploy", str(write_recipe(d, "test.App", version, run=run, artifacts=_artifact(d, f"a-{version}"))))
    for i in range(1, 5):  # rolled back at install
        bad = write_recipe(d, "test.App", f"2.0.{i}", run=run, install="exit 3", artifacts=_artifact(d, f"a-2.0.{i}"))
        assert daemon.cli("deploy", str(bad), check=False).returncode == 1
    # A rolled-back deployment does not count as one of the kept ones: its "previous" is what runs.
    assert _stored_versions(daemon.root, "test.App", {"1.0.0", "1.0.1"}) == {"1.0.0", "1.0.1"}
    # Fails before anything changes (a dependency nobody has): its fetched artifacts go too.
    missing = write_recipe(d, "test.App", "3.0.0", run=run, artifacts=_artifact(d, "a-3.0.0"),
                           deps={"test.Nowhere": {"VersionRequirement": ">=1.0.0"}})
    assert daemon.cli("deploy", str(missing), check=False).returncode == 1
    # Kept as asked (do-nothing): the failed version runs, and the one before stays for a rollback.
    kept = write_recipe(d, "test.App", "4.0.0", run="exit 3", artifacts=_artifact(d, "a-4.0.0"))
    assert daemon.cli("deploy", "--failure-policy", "do-nothing", str(kept), check=False).returncode == 1
    assert _stored_versions(daemon.root, "test.App", {"1.0.1", "4.0.0"}) == {"1.0.1", "4.0.0"}
    assert daemon.components()["test.App"]["version"] == "4.0.0"


def test_a_finished_deployment_keeps_neither_the_configuration_snapshot_nor_the_recipe_texts(tmp_path: Path) -> None:
    """The snapshot a rollback restores held every component's configuration, and the request every recipe's
    text; kept in every finished row of the history, 256 deployments of a device with 200 KB of
    configuration would hold 50 MB."""
    db = tmp_path / "nucleus.db"
    journal = Journal(db)
    try:
        before = ActiveSet(components={"A": "1.0.0", "B": "1.0.0"})
        snapshot = {"active": before.to_json(), "configs": {"A": {"table": "x" * 100_000}},
                    "recipes": {"A@1.0.0": {"ComponentName": "A"}}, "artifacts": []}
        request = {"group": "g", "recipes": [{"source": "/r/A-1.0.0.yaml", "format": "yaml", "text": "y" * 50_000}]}
        for did in ("running", "done"):
            journal.enqueue(did, "g", request)
            journal.update(did, previous=snapshot)
        journal.finish("done", DeploymentStatus.FAILED_ROLLBACK_COMPLETE, active=before)
        done = journal.get("done")
        assert done is not None and done.previous == {"active": before.to_json()}
        assert ActiveSet.from_json(done.previous["active"]).components == before.components
        assert done.request == {"group": "g", "recipes": [{"source": "/r/A-1.0.0.yaml", "format": "yaml"}]}
        running = journal.get("running")  # still in progress: a restart restores from it and re-reads its recipes
        assert running is not None and running.previous == snapshot and running.request == request
    finally:
        journal.close()
    conn = sqlite3.connect(db)
    try:
        sizes = conn.execute("select length(previous), length(request) from deployments where id = 'done'").fetchone()
        assert sizes[0] < 200 and sizes[1] < 200
    finally:
        conn.close()
