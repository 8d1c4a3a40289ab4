"""The audit log: durable settings, round trips, restored states, and survival of kill -9 mid-write."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from components.protective_action.audit import AuditLog, Outcome
from components.protective_action.policy import Decision, State


def decision(i: int, asset: str = "t1", state: State = State.LATCHED) -> Decision:
    return Decision(f"d{i}", asset, 1000.0 + i, state, State.NORMAL, ("engage_brake",), ("pitch_to_feather",),
                    f"reason {i}", (f"e{i}a", f"e{i}b"), (1.5, 2.5))


def test_wal_and_full_synchronous(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.db")
    assert log._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    log.record(decision(1), durable=False)
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL for the intent only
    log.record_outcomes("d1", [Outcome("engage_brake", True, "ok", 0.0, 0.0)])
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    log.close()


def test_decisions_and_outcomes_round_trip(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    log.record(decision(1))
    log.record_outcomes("d1", [Outcome("engage_brake", True, "simulated", 1001.0, 0.0001)])
    log.record(decision(2, state=State.NORMAL), [Outcome("engage_brake", False, "exited 3", 1002.0, 0.2)])
    rows = log.decisions()
    assert [r["decision_id"] for r in rows] == ["d1", "d2"]
    r = rows[0]
    assert (r["asset"], r["state"], r["previous"], r["action"]) == ("t1", "latched", "normal", "engage_brake")
    assert r["actions"] == ["engage_brake"] and r["suppressed"] == ["pitch_to_feather"]
    assert r["event_ids"] == ["e1a", "e1b"] and r["scores"] == [1.5, 2.5] and r["reason"] == "reason 1"
    assert log.outcomes("d1")[0]["ok"] == 1 and log.outcomes("d2")[0]["detail"] == "exited 3"
    log.close()


def test_last_state_per_asset_survives_reopen(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    log.record(decision(1, "a", State.LATCHED))
    log.record(decision(2, "b", State.SAFE_STATE))
    log.record(decision(3, "a", State.NORMAL))
    log.record(decision(4, "b", State.LATCHED))
    log.close()
    again = AuditLog(tmp_path / "audit.db")
    assert again.last_states() == {"a": State.NORMAL, "b": State.LATCHED}
    assert len(again.decisions("a")) == 2
    again.close()


WRITER = """
    import sys
    from components.protective_action.audit import AuditLog
    from components.protective_action.policy import Decision, State
    log = AuditLog(__import__("pathlib").Path(sys.argv[1]))
    i = 0
    while True:
        # every other commit is a write-ahead intent (no fsync): it too must survive kill -9
        log.record(Decision(f"d{i}", "t1", 0.0, State.TRIPPED, State.NORMAL, (), (), "burst", (), ()),
                   durable=i % 2 == 0)
        print(f"d{i}", flush=True)  # acknowledged only after the commit returned
        i += 1
"""


def test_nothing_acknowledged_is_lost_on_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(db)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    acked = []
    deadline = time.monotonic() + 30
    while len(acked) < 300 and time.monotonic() < deadline:
        acked.append(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    acked.extend(line.strip() for line in proc.stdout.read().splitlines())
    assert len(acked) >= 300
    conn = sqlite3.connect(db)
    stored = {r[0] for r in conn.execute("SELECT decision_id FROM decisions")}
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    missing = [a for a in acked if a and a not in stored]
    assert missing == [], json.dumps(missing[:5])


def test_a_state_this_version_does_not_know_is_restored_as_the_safe_state(tmp_path: Path) -> None:
    """A log written by a newer version may end on a state this one does not know: the component failed
    at start (ValueError), until BROKEN. It is read as safe_state, which only a reset leaves."""
    log = AuditLog(tmp_path / "audit.db")
    log.record(decision(1, "t1"))
    log.record(decision(2, "t2"))
    log._conn.execute("UPDATE decisions SET state = 'maintenance' WHERE asset = 't2'")
    assert log.last_states() == {"t1": State.LATCHED, "t2": State.SAFE_STATE}
    log.close()
