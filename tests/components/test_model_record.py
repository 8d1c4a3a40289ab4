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
from components.model_builder.cli import main
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


def test_recorder_segments_where_a_batch_follows_a_time_gap() -> None:
    """seq runs on across a jump in the samples' times (lost MQTT messages, a replay starting over); the
    ingest marks the batch follows_gap, and a training window must not join the two sides either."""
    rec = Recorder()
    for seq in range(4):
        b = batch(seq, value=seq)
        if seq == 2:
            b["t0"] += 60.0
            b["follows_gap"] = True
        rec.add(b)
    assert rec.gaps == 1 and rec.segment_starts == [0, 200] and rec.segment_t0[1] == T0 + 0.2 + 60.0


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


def test_record_without_a_daemon_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Recording from a socket nothing answers on, or with a token file that is not there, ended in a
    ConnectionClosed or FileNotFoundError traceback; each is one line naming the socket or the file."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "run" / "cli.token").write_text("stale")
    argv = ["record", "--topic", "sensors/t/raw", "--seconds", "1", "--out", str(tmp_path / "r.npz"),
            "--socket", str(root / "ipc.sock"), "--token-file", str(root / "run" / "cli.token")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: socket: cannot connect to {root / 'ipc.sock'}")
    assert not (tmp_path / "r.npz").exists()
    assert main([*argv[:9], "--token-file", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --token-file {tmp_path / 'nope'}: No such file")
    assert main([*argv[:3], "--seconds", "0", *argv[5:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --seconds: must be > 0" in err


def test_nucleus_model_record_without_a_daemon(tmp_path: Path) -> None:
    """Through the nucleus CLI (which fills in --socket and --token-file from --root): the same one-line
    "no daemon" error as every other command, naming where it looked and how to start one."""
    root = tmp_path / "nodaemon"
    proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(root), "model", "record", "--topic",
                           "sensors/t/raw", "--seconds", "1", "--out", str(tmp_path / "r.npz")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"nucleus: no nucleus daemon: no socket at {root.resolve() / 'ipc.sock'}")
    assert proc.stderr.rstrip().endswith(f"start one with: nucleus run --root {root.resolve()}")


@pytest.mark.slow
def test_record_with_a_refused_token_is_one_line(daemon: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("not-a-token\n")
    assert main(["record", "--topic", "sensors/t/raw", "--batches", "1", "--out", str(tmp_path / "r.npz"),
                 "--socket", str(daemon.root / "ipc.sock"), "--token-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {daemon.root / 'ipc.sock'}: token: the daemon refused the IPC token")
    assert err.count("\n") == 1 and not (tmp_path / "r.npz").exists()
