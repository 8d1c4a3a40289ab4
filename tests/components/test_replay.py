"""CSV replay: the shared NAB and gearbox files, gaps, bad cells, looping."""

from __future__ import annotations

import gzip
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from components.sensor_ingest.replay import CsvReplay, ReplayError, parse_timestamp

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
NAB = SHARED / "data" / "nab" / "data" / "realKnownCause"
GEARBOX = SHARED / "data" / "gearbox_fault_diagnosis"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path.resolve()} (a clone without ../shared)")
    return path


def test_nab_file_replays_as_regular_five_minute_batches() -> None:
    path = need(NAB / "machine_temperature_system_failure.csv")
    replay = CsvReplay(path, batch_size=288)
    assert replay.channels == ("value",) and replay.has_timestamps
    batches = list(replay.batches())
    assert sum(b.n_samples for b in batches) == 22695 == replay.stats.rows
    first = batches[0]
    assert first.t0 == parse_timestamp("2013-12-02 21:15:00")
    assert first.rate_hz == pytest.approx(1 / 300)
    assert first.data.dtype == np.float32 and first.data.shape == (1, 288)
    assert first.data[0, 0] == pytest.approx(73.967322, rel=1e-6)
    # The file steps back 55 minutes once (2014-01-06): that row starts a new batch instead of being
    # hidden inside one with a wrong time.
    assert replay.stats.gaps == 1
    back = next(i for i, (b, nxt) in enumerate(itertools.pairwise(batches))
                if nxt.t0 < b.t0 + b.n_samples / b.rate_hz)
    assert batches[back + 1].t0 == parse_timestamp("2014-01-07 02:00:00")
    assert replay.stats.bad_values == 0 and replay.stats.bad_timestamps == 0


def test_nab_gaps_split_batches() -> None:
    path = need(NAB / "machine_temperature_system_failure.csv")
    replay = CsvReplay(path, batch_size=100_000)
    batches = list(replay.batches())
    # Each irregular step becomes a batch boundary.
    assert len(batches) == replay.stats.gaps + 1
    assert all(b.rate_hz == pytest.approx(1 / 300) for b in batches if b.n_samples > 1)


def test_gearbox_gzip_replays_four_channels_at_configured_rate() -> None:
    path = need(GEARBOX / "h30hz0.csv.gz")
    replay = CsvReplay(path, batch_size=1024, rate_hz=2000.0)
    assert replay.channels == ("a1", "a2", "a3", "a4") and not replay.has_timestamps
    it = replay.batches()
    b0, b1 = next(it), next(it)
    assert b0.data.shape == (4, 1024) and b0.rate_hz == 2000.0
    assert b0.t0 == 0.0 and b1.t0 == pytest.approx(1024 / 2000)
    assert b0.data[:, 0] == pytest.approx([4.63671, 0.516978, -3.20594, 1.82241], rel=1e-6)
    total = 2 + sum(1 for _ in it)
    assert total == math.ceil(88832 / 1024)


def test_column_selection_and_renaming() -> None:
    path = need(GEARBOX / "b30hz50.csv.gz")
    replay = CsvReplay(path, batch_size=10, rate_hz=1000.0, columns=("a3", "a1"), channel_names=("vib_z", "vib_x"))
    b = next(replay.batches())
    assert b.channels == ("vib_z", "vib_x") and b.data.shape == (2, 10)


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    if name.endswith(".gz"):
        p.write_bytes(gzip.compress(text.encode()))
    else:
        p.write_text(text)
    return p


def test_bad_cells_become_nan_and_are_counted(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv", "ts,a,b\n0,1,2\n1,oops,3\n2,4\n3,,6\nnot-a-time,7,8\n4,9,10\n")
    replay = CsvReplay(p, batch_size=100)
    (b,) = list(replay.batches())
    assert b.rate_hz == 1.0 and b.t0 == 0.0
    np.testing.assert_array_equal(np.isnan(b.data), [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])
    s = replay.stats
    assert (s.bad_values, s.short_rows, s.bad_timestamps, s.rows) == (3, 1, 1, 6)


def test_backwards_or_irregular_time_starts_a_new_batch(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv.gz", "timestamp,v\n10,1\n11,2\n12,3\n20,4\n21,5\n15,6\n16,7\n")
    replay = CsvReplay(p, batch_size=100)
    batches = list(replay.batches())
    assert [(b.t0, b.n_samples) for b in batches] == [(10, 3), (20, 2), (15, 2)]
    assert replay.stats.gaps == 2
    # seq will be consecutive across each jump: the batch says it, so no window joins both sides
    assert [b.follows_gap for b in batches] == [False, True, True]


def test_loop_continues_time_past_the_end(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv", "a\n1\n2\n3\n4\n")
    replay = CsvReplay(p, batch_size=2, rate_hz=10.0, loop=True)
    it = replay.batches()
    batches = [next(it) for _ in range(5)]
    assert [b.t0 for b in batches] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert replay.stats.passes == 2
    # time continues, the data do not (sample 4 is followed by sample 1 again): the wrap is a gap
    assert [b.follows_gap for b in batches] == [False, False, True, False, True]


def test_unusable_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        CsvReplay(tmp_path / "missing.csv", batch_size=1)
    with pytest.raises(ReplayError, match="empty"):
        CsvReplay(write(tmp_path, "e.csv", ""), batch_size=1)
    with pytest.raises(ReplayError, match="rateHz"):
        CsvReplay(write(tmp_path, "n.csv", "a,b\n1,2\n"), batch_size=1)
    with pytest.raises(ReplayError, match="columns"):
        CsvReplay(write(tmp_path, "c.csv", "a,b\n1,2\n"), batch_size=1, rate_hz=1, columns=("z",))


def test_iso_and_epoch_timestamps() -> None:
    assert parse_timestamp("1700000000.5") == 1700000000.5
    assert parse_timestamp("2014-07-01 00:30:00") == 1404174600.0
    assert parse_timestamp("2014-07-01T00:30:00+02:00") == 1404174600.0 - 7200
