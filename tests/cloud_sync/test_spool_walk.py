"""The spool as an operator meets it after something went wrong (docs/cloud-sync.md, "A corrupt
spool file"): a spool file that is not a database any more must not silence the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.spool import NewMessage, SpoolStore

pytestmark = pytest.mark.timeout(60)


def _spool_with(path: Path, n: int) -> str:
    store = SpoolStore(path)
    store.apply([NewMessage("t", f"m{i}".encode(), "t") for i in range(n)])
    spool_id = store.spool_id
    store.close()
    return spool_id


def test_corrupt_spool_is_moved_aside_and_a_new_one_starts(tmp_path: Path) -> None:
    path = tmp_path / "db" / "spool.db"
    old_id = _spool_with(path, 5)
    with path.open("r+b") as f:  # the header gone: "file is not a database"
        f.write(b"\xa5" * 100)
    damaged = path.read_bytes()

    store = SpoolStore(path)
    assert store.quarantined is not None
    moved, why = store.quarantined
    assert moved.parent == path.parent and moved.name.startswith("spool.db.corrupt-")
    assert "not a database" in why
    assert moved.read_bytes() == damaged  # kept whole, for whoever wants to look into it
    assert store.count == 0 and store.spool_id != old_id  # a new spool: new ids cannot collide
    assert isinstance(store.apply([NewMessage("t", b"new", "t")])[0], str)
    store.close()
    reopened = SpoolStore(path)
    assert reopened.quarantined is None and reopened.count == 1
    reopened.close()


def _sync_status(d: Any) -> dict[str, Any]:
    return json.loads(d.cli("sync", "status", "--json").stdout)  # type: ignore[no-any-return]


def test_daemon_with_a_corrupt_spool_keeps_spooling_and_says_so(daemon_factory: Any) -> None:
    """It started with the spool 'unavailable': no uplink, no device status, no fleet deployment to
    repair it, every cloud.publish refused, and `nucleus sync status` printed 'None messages'."""
    d = daemon_factory("corrupt", start=False)
    (d.root / "db").mkdir()
    (d.root / "db" / "spool.db").write_bytes(b"not a database, just text\n" * 400)
    d.start()
    info = _sync_status(d)
    assert info["spool"]["messages"] == 0
    [error] = [e for e in info["errors"] if e["code"] == "SPOOL_ERROR"]
    assert f"the spool file {d.root / 'db' / 'spool.db'} was corrupt" in error["message"]
    assert "moved to" in error["message"]
    assert list((d.root / "db").glob("spool.db.corrupt-*"))
    text = d.cli("sync", "status").stdout
    assert "backlog   0 messages" in text and "SPOOL_ERROR: the spool file" in text


def test_daemon_with_an_unopenable_spool_names_the_file(daemon_factory: Any) -> None:
    d = daemon_factory("unopenable", start=False)
    (d.root / "db" / "spool.db").mkdir(parents=True)  # not corrupt: nothing to move aside
    d.start()
    text = d.cli("sync", "status").stdout
    assert f"backlog   unavailable: cannot open the spool {d.root / 'db' / 'spool.db'}:" in text, text
    assert "None" not in text
