"""The spool as an operator meets it after something went wrong (docs/cloud-sync.md, "A corrupt
spool file"): a spool file that is not a database any more must not silence the device."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.errors import SpoolFullError
from cloud_sync.spool import NewMessage, Spool, SpoolLimits, SpoolStore

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


def test_the_readable_part_of_a_corrupt_spool_is_kept_with_its_ids(tmp_path: Path) -> None:
    """A damaged page in the middle: the messages before and after it are read back into the new
    spool with the same ids, and a new message never takes the id of one that was lost."""
    path = tmp_path / "spool.db"
    store = SpoolStore(path)
    ids = store.apply([NewMessage("t", f"m{i}".encode().ljust(300, b"."), "t") for i in range(1000)])
    spool_id = store.spool_id
    store.close()
    with path.open("r+b") as f:
        f.seek(4096 * 20)
        f.write(b"\xa5" * 4096)  # one leaf of the messages table
    store = SpoolStore(path)
    assert store.quarantined is not None and "malformed" in store.quarantined[1]
    assert store.spool_id == spool_id
    kept = store.all_ids()
    assert store.salvaged == len(kept) == store.count and 900 < len(kept) < 1000
    assert set(kept) < set(ids) and kept[0] == ids[0] and kept[-1] == ids[-1]
    [new] = store.apply([NewMessage("t", b"after", "t")])
    assert isinstance(new, str) and new not in ids
    store.close()


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
    assert "moved to" in error["message"] and "with the 0 messages that could still be read" in error["message"]
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


def test_a_spool_that_filled_the_disk_takes_messages_again_once_drained(small_fs: Path) -> None:
    """The spool itself filled the disk (an outage): once the backlog is delivered, it must take new
    messages. It refused them for good: SQLite keeps the file's size after deletions, so the free
    space of the filesystem stayed under spool_min_free_bytes although the spool was empty."""
    limits = SpoolLimits(durability="normal", reserve_bytes=256 * 1024, min_free_bytes=1024 * 1024)
    store = SpoolStore(small_fs / "spool.db", limits)
    accepted: list[str] = []
    refused: SpoolFullError | None = None
    for i in range(2000):  # bounded: 6 MiB holds far fewer than 2000 messages of 4 KiB
        [result] = store.apply([NewMessage("t", str(i).encode().ljust(4096, b"."), "t")])
        if isinstance(result, SpoolFullError):
            refused = result
            break
        accepted.append(result)
    assert refused is not None and refused.reason == "disk_full" and len(accepted) > 100
    for _ in range(100):  # bounded drain, as the uplink does it: deliveries in batches
        batch = [r.seq for r in store.peek(0, 200)]
        if not batch:
            break
        store.apply([], batch)
    assert store.count == 0
    again = store.apply([NewMessage("t", b"after the outage".ljust(4096, b"."), "t") for _ in range(50)])
    assert all(isinstance(r, str) for r in again), again[:1]
    store.close()


def test_a_message_larger_than_the_spool_says_so(tmp_path: Path) -> None:
    """It was refused as 'spool full (0 messages, 0 bytes ...)', which sends an operator looking for a
    backlog that does not exist."""
    store = SpoolStore(tmp_path / "spool.db", SpoolLimits(max_bytes=4096))
    [refused] = store.apply([NewMessage("t", b"x" * 5000, "t")])
    assert isinstance(refused, SpoolFullError) and refused.reason == "spool_full"
    assert refused.message == ("message of 5001 bytes (payload and topic) is larger than the whole spool "
                               "(spool_max_bytes 4096)")
    assert store.counters["rejected_full"] == 1
    store.close()


def test_sync_status_prints_the_forwarders_local_drops(daemon_factory: Any) -> None:
    """The doc promises that `nucleus sync status` prints every drop counter; messages a forward
    rule's local queue dropped (never spooled) were only in --json."""
    from nucleus.cli import _fmt_sync

    d = daemon_factory("drops")
    info = _sync_status(d)
    assert info["forwarder"]["local_dropped"] == 0
    assert "forward_queue=0" in d.cli("sync", "status").stdout
    info["forwarder"]["local_dropped"] = 7  # what a flooded rule reports; the printing is the point
    assert "forward_queue=7" in _fmt_sync(info)


def _corrupt_index(path: Path) -> None:
    """Overwrite the root page of the priority index: the open (which reads the table) does not see
    it, the next write does."""
    _corrupt_root_page(path, "messages_by_priority")


def _corrupt_root_page(path: Path, name: str) -> None:
    """Fill the root page of table or index ``name`` of a closed SQLite file with garbage."""
    con = sqlite3.connect(path)
    [(root,)] = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchall()
    [(page_size,)] = con.execute("PRAGMA page_size").fetchall()
    con.close()
    with path.open("r+b") as f:
        f.seek((int(root) - 1) * int(page_size))
        f.write(b"\xa5" * int(page_size))


async def test_corruption_found_by_a_write_moves_the_spool_aside_and_the_publisher_gets_its_id(
        tmp_path: Path) -> None:
    """A damaged page the open did not read (an index) made every write fail with SQLite's raw
    error: the group-commit task died on it, and the publishers of that batch waited forever."""
    path = tmp_path / "spool.db"
    store = SpoolStore(path)
    ids = store.apply([NewMessage("t", f"m{i}".encode().ljust(300, b"."), "t") for i in range(500)])
    store.close()
    _corrupt_index(path)
    spool = Spool(path)
    await spool.open()
    assert spool.quarantined is None  # the open did not notice
    new = await asyncio.wait_for(spool.append(NewMessage("t", b"after", "t")), 10)
    assert new not in ids
    assert spool.quarantined is not None and "malformed" in spool.quarantined[1] and spool.salvaged == 500
    assert (await spool.refresh_stats()).messages == 501
    assert spool.stats().counters["accepted"] == 501  # the counters of this process carried over
    await spool.close()
    reopened = SpoolStore(path)
    assert reopened.all_ids() == [*ids, new] and reopened.quarantined is None
    reopened.close()


async def test_the_service_hears_of_every_corrupt_file_moved_aside(tmp_path: Path) -> None:
    """The SPOOL_ERROR entry of the device status comes from this callback, at start and later."""
    path = tmp_path / "spool.db"
    store = SpoolStore(path)
    store.apply([NewMessage("t", b"x" * 300, "t") for _ in range(200)])
    store.close()
    _corrupt_index(path)
    told: list[tuple[Path, str, int]] = []
    spool = Spool(path, on_quarantine=lambda moved, why, kept: told.append((moved, why, kept)))
    await spool.open()
    assert told == []
    await asyncio.wait_for(spool.append(NewMessage("t", b"after", "t")), 10)
    [(moved, why, kept)] = told
    assert moved.name.startswith("spool.db.corrupt-") and "malformed" in why and kept == 200
    await spool.close()


def test_runtime_recovery_without_the_old_spool_id_never_reuses_a_seq_in_flight(tmp_path: Path) -> None:
    """When the old spool id cannot be read, the salvaged messages get new ids; those must start
    above every seq this process handed out, or a PUBACK of an old message still in flight
    (acked by seq) would delete a salvaged message that took its seq before it was ever sent."""
    path = tmp_path / "spool.db"
    store = SpoolStore(path)
    store.apply([NewMessage("t", f"m{i}".encode(), "t") for i in range(300)])
    store.close()
    _corrupt_root_page(path, "meta")
    store = SpoolStore.__new__(SpoolStore)  # as the running process had it: seq 300 handed out
    store.path, store.limits, store._clock = path, SpoolLimits(), time.time
    store.counters, store.quarantines, store._seq_high, store.salvaged = {}, 0, 300, 0
    store._conn = sqlite3.connect(":memory:")
    store.count, store.bytes = store._recover(sqlite3.DatabaseError("database disk image is malformed"))
    seqs = [r.seq for r in store.peek(0, 1000)]
    assert store.salvaged == len(seqs) == 300 and min(seqs) > 300
    store._apply((), list(range(1, 301)))  # the PUBACKs of the old messages in flight
    assert store.count == 300
    store.close()
