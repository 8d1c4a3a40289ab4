"""The spool on its own: ids, bounds and overflow policies, TTL, durable counters, a full disk."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cloud_sync.errors import SpoolFullError
from cloud_sync.spool import NewMessage, Spool, SpoolLimits, SpoolStore
from cloud_sync.uplink import Backoff

pytestmark = pytest.mark.timeout(60)


def m(i: int, priority: int = 0, size: int = 10, ttl_s: float | None = None) -> NewMessage:
    return NewMessage("t", str(i).encode().ljust(size, b"."), "t", priority=priority, ttl_s=ttl_s)


def payload_ids(store: SpoolStore) -> list[int]:
    return [int(r.payload.rstrip(b".")) for r in store.peek(0, 10_000)]


def test_ids_are_stable_and_never_reused(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db")
    ids = store.apply([m(0), m(1), m(2)])
    assert all(isinstance(i, str) for i in ids)
    assert len(set(ids)) == 3
    spool_id = store.spool_id
    store.apply([], [store.peek(0, 10)[-1].seq])  # deliver the newest
    store.close()
    store = SpoolStore(tmp_path / "s.db")
    assert store.spool_id == spool_id
    assert store.all_ids() == ids[:2]
    new = store.apply([m(3)])[0]
    assert new not in ids  # AUTOINCREMENT: the seq of a delivered message is never handed out again
    assert store.counters["accepted"] == 4 and store.counters["delivered"] == 1  # durable counters
    store.close()


def test_drop_lowest_priority_evicts_lowest_then_oldest_and_refuses_lower_newcomers(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(max_messages=4, overflow="drop_lowest_priority"))
    store.apply([m(0, 1), m(1, 0), m(2, 5), m(3, 0)])
    assert isinstance(store.apply([m(4, 1)])[0], str)
    assert payload_ids(store) == [0, 2, 3, 4]  # the oldest of the lowest priority (1) went
    assert store.counters["dropped_overflow"] == 1
    refused = store.apply([m(5, 0)])[0]  # lower than everything spooled but the remaining 0
    assert isinstance(refused, str)
    assert payload_ids(store) == [0, 2, 4, 5]
    store.apply([m(6, 9), m(7, 9), m(8, 9)])
    assert payload_ids(store) == [2, 6, 7, 8]
    late = store.apply([m(9, 0)])[0]
    assert isinstance(late, SpoolFullError) and late.reason == "spool_full"
    assert store.counters["rejected_full"] == 1
    assert store.count == 4
    store.close()


def test_drop_oldest_ignores_priority(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(max_messages=3, overflow="drop_oldest"))
    store.apply([m(0, 9), m(1, 0), m(2, 0)])
    assert isinstance(store.apply([m(3, 0)])[0], str)
    assert payload_ids(store) == [1, 2, 3]
    assert store.counters["dropped_overflow"] == 1
    same_batch = store.apply([m(4), m(5), m(6), m(7)])  # evicted in the transaction that added it: refused
    assert isinstance(same_batch[0], SpoolFullError) and store.counters["rejected_full"] == 1
    assert payload_ids(store) == [5, 6, 7]
    store.close()


def test_reject_new_keeps_what_is_spooled(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(max_messages=2, overflow="reject_new"))
    results = store.apply([m(0), m(1), m(2, priority=200)])
    assert isinstance(results[2], SpoolFullError)
    assert payload_ids(store) == [0, 1]
    assert store.counters["rejected_full"] == 1
    store.close()


def test_byte_bound_and_a_message_larger_than_the_spool(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(max_bytes=5000, overflow="drop_oldest"))
    store.apply([m(i, size=999) for i in range(10)])  # 1,000 B with the topic
    assert store.bytes <= 5000
    assert payload_ids(store) == [5, 6, 7, 8, 9]
    huge = store.apply([m(99, size=6000)])[0]
    assert isinstance(huge, SpoolFullError)
    assert payload_ids(store) == [5, 6, 7, 8, 9]
    store.close()


def test_expired_messages_are_purged_on_read_and_first_evicted(tmp_path: Path) -> None:
    now = [1000.0]
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(max_messages=3), clock=lambda: now[0])
    store.apply([m(0, ttl_s=5), m(1), m(2, ttl_s=50)])
    now[0] += 10
    store.apply([m(3, priority=0)])  # full: the expired message goes, not a live one
    assert store.counters["dropped_expired"] == 1 and store.counters["dropped_overflow"] == 0
    now[0] += 100
    assert payload_ids(store) == [1, 3]
    assert store.counters["dropped_expired"] == 2
    store.close()


def test_backoff_doubles_up_to_the_cap_with_jitter_below_the_base() -> None:
    b = Backoff(1.0, 30.0, 0.0)
    assert [b.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 1
    j = Backoff(1.0, 30.0, 0.5, random.Random(7))
    delays = [j.next() for _ in range(6)]
    assert all(0.5 * base <= d <= base for d, base in zip(delays, [1, 2, 4, 8, 16, 30], strict=True))
    assert len(set(delays)) == 6


async def test_group_commit_orders_concurrent_appends(tmp_path: Path) -> None:
    import asyncio

    spool = Spool(tmp_path / "s.db")
    await spool.open()
    results = await asyncio.gather(*[spool.append(m(i)) for i in range(500)])
    seqs = [int(r.rsplit(":", 1)[1]) for r in results]
    assert seqs == sorted(seqs)  # call order is spool order
    assert spool.stats().messages == 500
    await spool.close()


# --- a full disk ---------------------------------------------------------------------------------------
def _limit_pages(store: SpoolStore, extra_pages: int) -> None:
    """SQLite's own max_page_count: the database returns SQLITE_FULL exactly as on a full disk."""
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count={pages + extra_pages}")


def _fill_until_refused(store: SpoolStore) -> list[str]:
    accepted: list[str] = []
    for i in range(5000):
        r = store.apply([m(i, size=2000)])[0]
        if isinstance(r, SpoolFullError):
            assert r.reason == "disk_full"
            assert store.counters["rejected_disk_full"] == 1
            assert accepted, "nothing fitted before the disk filled"
            assert store.all_ids() == accepted  # nothing already spooled was lost
            return accepted
        accepted.append(r)
    raise AssertionError("the disk never filled")


def test_page_limit_full_refuses_new_messages_and_keeps_old_ones(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s.db", SpoolLimits(min_free_bytes=0))
    _limit_pages(store, 200)
    _fill_until_refused(store)
    store.apply([], [r.seq for r in store.peek(0, 100)])  # deliveries are recorded
    assert isinstance(store.apply([m(7, size=100)])[0], str)  # and free pages take new messages
    store.close()


def test_real_full_filesystem(small_fs: Path) -> None:
    """Another file fills the disk: new messages are refused, old ones kept, deliveries recorded, then it resumes."""
    filler = small_fs / "other-process.log"
    filler.write_bytes(b"x" * (3 * 1024 * 1024))
    limits = SpoolLimits(durability="normal", reserve_bytes=256 * 1024, min_free_bytes=1024 * 1024)
    store = SpoolStore(small_fs / "s.db", limits)
    accepted = _fill_until_refused(store)
    delivered = [r.seq for r in store.peek(0, 200)]
    store.apply([], delivered)  # the floor left room to record deliveries
    assert store.all_ids() == accepted[len(delivered):]
    filler.unlink()
    assert isinstance(store.apply([m(1, size=100)])[0], str)
    store.close()
    reopened = SpoolStore(small_fs / "s.db", limits)
    assert reopened.count == len(reopened.all_ids()) == len(accepted) - len(delivered) + 1
    reopened.close()
