"""kill -9 of a real writer process during heavy writes and during a flush: nothing acknowledged is lost,
and a message arrives twice only if its delivery was not yet recorded when the process died."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sync_testkit import Collector, Mosquitto, assert_ordered_first_arrivals

from cloud_sync.envelope import encode_payload
from cloud_sync.spool import NewMessage, SpoolStore

pytestmark = pytest.mark.timeout(90)

WORKER = Path(__file__).with_name("spool_worker.py")
REPO = Path(__file__).resolve().parents[2]


def spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)


def test_kill_during_heavy_writes_loses_no_acknowledged_message(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    acked: dict[str, int] = {}
    for _ in range(3):
        proc = spawn("write", str(path))
        assert proc.stdout is not None
        seen = 0
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # read until a few thousand acknowledgements, then kill mid-stream
            parts = line.split()
            if len(parts) == 3 and parts[0] == "A":
                acked[parts[1]] = int(parts[2])
                seen += 1
            if seen >= 3000 or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
        for line in rest.splitlines():  # lines written before the kill are acknowledged too
            parts = line.split()
            if len(parts) == 3 and parts[0] == "A":
                acked[parts[1]] = int(parts[2])
        assert seen >= 3000, "the writer was too slow to be killed during heavy writes"
    store = SpoolStore(path)
    records = {r.id: r for r in store.peek(0, 1_000_000)}
    missing = set(acked) - set(records)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:3]}"
    for mid, i in acked.items():
        assert records[mid].payload.rstrip(b".") == str(i).encode()
    assert store.count == len(records)  # the counters agree with the rows after recovery
    store.close()


async def test_kill_during_flush_three_times_zero_loss_and_only_unrecorded_duplicates(
        broker: Mosquitto, tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    store = SpoolStore(path)
    payload, kind = encode_payload({"x": 1})
    ids = store.apply([NewMessage(f"k/{i % 3}", payload, kind) for i in range(30_000)])
    store.close()
    all_ids = {str(i) for i in ids}
    collector = Collector(broker.port)
    await collector.start()
    allowed_duplicates: set[str] = set()
    for kill in range(3):
        proc = spawn("flush", str(path), broker.url)
        target = len(set(collector.ids)) + 4000
        deadline = time.monotonic() + 30
        while len(set(collector.ids)) < target:
            assert time.monotonic() < deadline, f"flush {kill} made no progress"
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        n = -1
        while n != len(collector.ids):  # let what was already on the wire land
            n = len(collector.ids)
            await asyncio.sleep(0.3)
        still_spooled = set(SpoolStore(path).all_ids())
        received = set(collector.ids)
        assert all_ids - still_spooled <= received, "a message was deleted from the spool without delivery"
        allowed_duplicates |= received & still_spooled
        assert still_spooled, "the flush finished before the kill; nothing was tested"
    proc = spawn("flush", str(path), broker.url)
    try:
        await collector.wait_ids(all_ids, timeout=40)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    counts = Counter(collector.ids)
    duplicates = {i for i, c in counts.items() if c > 1}
    assert duplicates <= allowed_duplicates, "a message whose delivery was recorded arrived again"
    assert set(counts) == all_ids
    assert_ordered_first_arrivals(collector.by_topic)
    await collector.stop()
