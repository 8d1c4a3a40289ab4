"""`nucleus model record`: bus batches → a training recording, segmented at sequence gaps."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.anomaly.errors import TrainingError
from components.model_builder.data import load_recording, save_recording, window_ends
from components.model_builder.record import Recorder
from ipc import Client

T0 = 1_795_000_000.0  # epoch seconds of batch 0; batch k starts k * 100 samples / 1 kHz later


def batch(seq: int, n: int = 100, value: float = 0.0, channels: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    data = np.full((len(channels), n), value, dtype=np.float32)
    data[0] += np.arange(n, dtype=np.float32)
    return {"asset": "t", "seq": seq, "t0": T0 + seq * n / 1000.0, "rate_hz": 1000.0, "channels": list(channels),
            "data": data}


def test_recorder_segments_at_gaps_and_refuses_a_changed_layout(tmp_path: Path) -> None:
    rec = Recorder()
    for seq in (0, 1, 2, 5, 6):  # 3 and 4 were lost
        rec.add(batch(seq, value=seq))
    assert rec.gaps == 1 and rec.samples == 500 and rec.segment_starts == [0, 300]
    with pytest.raises(TrainingError, match="channels"):
        rec.add(batch(7, channels=("a",)))
    rec.save(tmp_path / "r.npz")
    ds = load_recording(tmp_path / "r.npz")
    assert ds.channels == ["a", "b"] and ds.rate_hz == 1000.0
    assert [s.shape[1] for s in ds.segments] == [300, 200]
    # Each sample's time survives the gap (for calendar features): segment 2 starts at batch 5's t0.
    assert ds.times is not None
    np.testing.assert_allclose(ds.times[0][[0, 299]], [T0, T0 + 0.299])
    np.testing.assert_allclose(ds.times[1][[0, 199]], [T0 + 0.5, T0 + 0.699])
    ends = window_ends(ds, 100, 100)
    assert ends is not None and len(ends) == 5 and ends[3] == pytest.approx(T0 + 0.599)  # 3 + 2 windows
    with pytest.raises(TrainingError, match="no batches"):
        Recorder().save(tmp_path / "empty.npz")


def test_recordings_without_times_still_load(tmp_path: Path) -> None:
    """Recordings written before segment_t0 existed (or with unknown times) train as before, without times."""
    data = np.zeros((1, 50), np.float32)
    np.savez_compressed(tmp_path / "old.npz", channels=np.array(["a"]), data=data, rate_hz=np.float64(10.0),
                        segment_starts=np.array([0]))
    assert load_recording(tmp_path / "old.npz").times is None
    save_recording(tmp_path / "unknown.npz", ["a"], data, 10.0)
    assert load_recording(tmp_path / "unknown.npz").times is None
    with pytest.raises(TrainingError, match="2 segment times for 1 segments"):
        save_recording(tmp_path / "bad.npz", ["a"], data, 10.0, [0], segment_t0=[1.0, 2.0])


@pytest.mark.slow
def test_nucleus_model_record_through_the_daemon(daemon: Any, tmp_path: Path) -> None:
    out = tmp_path / "healthy.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nucleus", "--root", str(daemon.root), "model", "record",
         "--topic", "sensors/t/raw", "--batches", "12", "--seconds", "60", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert "recording sensors/t/raw" in proc.stdout.readline()
        token = (daemon.root / "run" / "cli.token").read_text().strip()

        async def publish() -> None:
            async with Client(daemon.root / "ipc.sock", token) as c:
                for seq in [*range(6), *range(8, 14)]:  # a gap of two batches in the middle
                    await c.publish("sensors/t/raw", batch(seq, value=seq), confirm=True)

        asyncio.run(publish())
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "recorded 12 batches, 1200 samples x 2 channels" in stdout and "1 gap(s)" in stdout
    ds = load_recording(out)
    assert [s.shape[1] for s in ds.segments] == [600, 600]
