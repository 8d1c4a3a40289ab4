"""Training data: CSV files (optionally gzip) and recorded bus data (.npz), as channel-major segments.

A segment is a stretch of contiguous samples ``(C, n)``; windows never span two segments, so a gap in
a recording or rows removed by a label filter never produce a window that did not exist.

Recording format (``.npz``, written by :func:`save_recording`): ``channels`` (str array),
``data`` float32 ``(C, n)``, ``rate_hz`` (scalar, NaN if unknown), ``segment_starts`` (int array of
sample indices where a new contiguous run begins; ``[0]`` if none) and ``segment_t0`` (epoch seconds
of each segment's first sample, NaN if unknown; absent in older recordings; with the rate it gives
every sample's time). A recorder that stores ``sensors/<asset>/raw`` batches starts a new segment at
every sequence gap.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from components.anomaly.errors import TrainingError


@dataclass(slots=True)
class Dataset:
    channels: list[str]
    segments: list[npt.NDArray[np.float64]]  # each (C, n)
    rate_hz: float | None
    sources: list[str]
    # Epoch seconds of each sample, per segment (calendar features need them); None = not known.
    times: list[npt.NDArray[np.float64]] | None = field(default=None)
    # CSV columns left out because their first data cell is not a number (a blank cell there too): said
    # by the builder, since a sensor column that starts empty was otherwise dropped without a word
    skipped_columns: list[str] = field(default_factory=list)
    # rows (samples) left out for a missing or non-finite value: they end a segment; the builder says how many
    nonfinite_rows: int = 0

    @property
    def rows(self) -> int:
        return sum(s.shape[1] for s in self.segments)


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name (it was, and a card
    # whose channel is "\ufeffvib_x" drops every bus batch as missing_channel)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _runs(mask: npt.NDArray[np.bool_] | np.bool_) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], mask, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(change[::2], change[1::2], strict=True)]


def _epoch(text: str) -> float:
    """A timestamp cell: epoch seconds, or ISO 8601 (without a zone it is taken as UTC)."""
    try:
        return float(text)
    except ValueError:
        t = datetime.fromisoformat(text.strip())
        return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def load_csv(path: Path, channels: list[str] | None = None, *, label_column: str | None = None,
             normal_values: tuple[str, ...] = ("0",), row_range: tuple[int, int] | None = None,
             time_column: str | None = None) -> Dataset:
    """Numeric columns as channels (``timestamp``-like text columns are skipped). With
    ``label_column``, only rows whose label is one of ``normal_values`` are kept, as segments. With
    ``time_column``, each row's time (ISO 8601 or epoch seconds) is kept for calendar features."""
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader)
            rows = list(reader)
    except (OSError, StopIteration, UnicodeDecodeError, csv.Error, EOFError) as exc:
        # EOFError: a .gz cut short (a copy that did not finish) raised it as a traceback
        why = "the gzip stream ends early (a truncated file?)" if isinstance(exc, EOFError) else str(exc)
        raise TrainingError(f"cannot read CSV: {why}", path=path) from exc
    while rows and not rows[-1]:  # blank lines at the end (editors add them) are not rows of no cells
        rows.pop()
    if row_range is not None:
        rows = rows[row_range[0]:row_range[1]]
    if not rows:
        raise TrainingError("CSV has no data rows", path=path)
    cols = {name.strip(): i for i, name in enumerate(header)}
    names = [h.strip() for h in header]
    twice = {n for n in names if names.count(n) > 1}  # cols kept the last of them, dropping the other unseen
    skipped: list[str] = []
    if channels is None:
        if len(rows[0]) < len(header):  # the cells are matched to the header by position
            raise TrainingError(f"line {2 + (row_range or (0, 0))[0]} has {len(rows[0])} cells, fewer than the "
                                f"header's {len(header)}", path=path)
        channels = []
        for name, i in cols.items():
            if name in (label_column, time_column):
                continue
            try:
                float(rows[0][i])
            except ValueError:
                skipped.append(name)
                continue
            channels.append(name)
    if not channels:
        hint = (" (one column whose name holds ';' or a tab: the file is not comma-separated)"
                if len(cols) == 1 and any(d in header[0] for d in ";\t") else "")
        raise TrainingError(f"no numeric column in the first data row (columns {list(cols)}){hint}; name the "
                            "channels with --channels", path=path, field="channels")
    missing = [c for c in channels if c not in cols]
    if missing:
        raise TrainingError(f"CSV has no columns {missing} (has {list(cols)})", path=path, field="channels")
    if used_twice := sorted(twice & {*channels, label_column, time_column}):
        raise TrainingError(f"the header names {', '.join(repr(n) for n in used_twice)} more than once; rename "
                            "the columns so each is one column", path=path, field="channels")
    data = _channel_matrix(rows, [cols[c] for c in channels], channels, path, first_row=2 + (row_range or (0, 0))[0])
    keep = np.isfinite(data).all(axis=0)
    nonfinite = int((~keep).sum())
    if label_column is not None:
        if label_column not in cols:
            raise TrainingError(f"no label column {label_column!r}", path=path, field="label_column")
        labels = np.array([r[cols[label_column]].strip() for r in rows])
        normal = np.isin(labels, list(normal_values))
        if not normal.any():
            seen = sorted(set(labels.tolist()))
            shown = ", ".join(repr(v) for v in seen[:10]) + (f" ... ({len(seen)} values)" if len(seen) > 10 else "")
            raise TrainingError(f"no row of label column {label_column!r} has the value "
                                f"{' or '.join(repr(v) for v in normal_values)}; its values are {shown}",
                                path=path, field="normal_value")
        keep &= normal
    runs = _runs(keep)
    times = None
    if time_column is not None:
        if time_column not in cols:
            raise TrainingError(f"no time column {time_column!r} (has {list(cols)})", path=path, field="time_column")
        try:
            stamps = np.array([_epoch(r[cols[time_column]]) for r in rows], dtype=np.float64)
        except (ValueError, IndexError) as exc:
            raise TrainingError(f"time column {time_column!r}: {exc}", path=path, field="time_column") from exc
        runs = _split_at_time_gaps(runs, stamps, path, time_column, first_line=2 + (row_range or (0, 0))[0])
        times = [stamps[a:b] for a, b in runs]
    segments = [data[:, a:b] for a, b in runs]
    return Dataset(list(channels), segments, None, [str(path)], times, skipped_columns=skipped,
                   nonfinite_rows=nonfinite)


def _split_at_time_gaps(runs: list[tuple[int, int]], stamps: npt.NDArray[np.float64], path: Path, column: str,
                        first_line: int) -> list[tuple[int, int]]:
    """Rows whose times jump (more than 1.5 steps of the file's typical spacing: rows missing, a logger
    that stopped) end a segment, as a sequence gap ends one in a recording and a time_gap in the
    detector: windows spanned them. Times that do not increase are refused, naming the line."""
    steps = np.diff(stamps)
    if (bad := np.flatnonzero(~(steps > 0))).size:  # NaN compares false too
        i = int(bad[0]) + 1
        raise TrainingError(f"time column {column!r} does not increase at line {first_line + i} "
                            f"({float(stamps[i - 1])!r} then {float(stamps[i])!r}): sort the rows by time or drop "
                            "duplicates",
                            path=path, field="time_column")
    if not steps.size:
        return runs
    breaks = set((np.flatnonzero(steps > 1.5 * float(np.median(steps))) + 1).tolist())
    out: list[tuple[int, int]] = []
    for a, b in runs:
        cuts = [a, *sorted(x for x in breaks if a < x < b), b]
        out.extend(itertools.pairwise(cuts))
    return out


def _cell(text: str) -> float:
    return float(text) if text.strip() else math.nan


def _channel_matrix(rows: list[list[str]], idx: list[int], channels: list[str], path: Path,
                    first_row: int) -> npt.NDArray[np.float64]:
    """The channels' values as floats, channel-major. A cell that is not a number names its column, its
    line in the file and its text: channels are chosen from the first row, so a column that turns to
    text further down (a status word, a unit) would otherwise fail with no hint where."""
    try:
        return np.array([[float(r[i]) for i in idx] for r in rows], dtype=np.float64).T
    except (ValueError, IndexError):
        pass
    try:  # empty cells are missing samples (NaN: the row is left out, as the ingest's replay does with them)
        return np.array([[_cell(r[i]) for i in idx] for r in rows], dtype=np.float64).T
    except (ValueError, IndexError):
        pass
    for n, r in enumerate(rows):
        if len(r) <= max(idx):
            raise TrainingError(f"line {first_row + n} has {len(r)} cells, fewer than the header", path=path)
        for c, i in zip(channels, idx, strict=True):
            try:
                _cell(r[i])
            except ValueError:
                raise TrainingError(f"channel column {c!r}, line {first_row + n}: {r[i]!r} is not a number "
                                    "(pick the columns with --channels)", path=path, field="channels") from None
    raise AssertionError("unreachable: every cell parsed on the second pass")


def save_recording(path: Path, channels: list[str], data: npt.NDArray[np.floating], rate_hz: float | None,
                   segment_starts: list[int] | None = None, *, segment_t0: list[float] | None = None) -> None:
    starts = segment_starts or [0]
    if segment_t0 is not None and len(segment_t0) != len(starts):
        raise TrainingError(f"{len(segment_t0)} segment times for {len(starts)} segments", path=path)
    np.savez_compressed(path, channels=np.array(channels), data=np.asarray(data, dtype=np.float32),
                        rate_hz=np.float64(rate_hz if rate_hz is not None else np.nan),
                        segment_starts=np.array(starts, dtype=np.int64),
                        segment_t0=np.array(segment_t0 if segment_t0 is not None else [np.nan] * len(starts),
                                            dtype=np.float64))


def load_recording(path: Path) -> Dataset:
    what = "not a nucleus recording (.npz with channels, data, rate_hz, segment_starts)"
    try:
        opened = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        # np.load reads a file that is no archive at all as a pickle, and then says pickles are refused
        raise TrainingError(f"{what}: {'not an .npz archive' if 'pickled' in str(exc) else exc}", path=path) from exc
    if not isinstance(opened, np.lib.npyio.NpzFile):
        raise TrainingError(f"{what}: one .npy array, not an .npz archive", path=path)
    try:
        with opened as z:
            channels = [str(c) for c in z["channels"]]
            raw = z["data"]
            rate = float(z["rate_hz"])
            starts = [int(s) for s in z["segment_starts"]]
            t0s = [float(t) for t in z["segment_t0"]] if "segment_t0" in z.files else None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise TrainingError(f"{what}: {exc}", path=path) from exc
    if raw.dtype.kind not in "iuf":  # text of digits would parse; it is not what the recorder writes
        raise TrainingError(f"recording data are {raw.dtype} values, not numbers", path=path, field="data")
    data = np.asarray(raw, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != len(channels):
        raise TrainingError(f"recording data shape {data.shape} does not match {len(channels)} channels", path=path)
    if not (np.isnan(rate) or (np.isfinite(rate) and rate > 0)):
        raise TrainingError(f"recording rate_hz {rate:g} is not a sample rate (> 0, or NaN for unknown)", path=path,
                            field="rate_hz")
    if bad := [s for s in starts if not 0 <= s < max(data.shape[1], 1)]:
        raise TrainingError(f"recording segment_starts {bad} lie outside its {data.shape[1]} samples", path=path,
                            field="segment_starts")
    timed = bool(t0s is not None and len(t0s) == len(starts) and not np.isnan(rate) and np.isfinite(t0s).all())
    first_t0 = dict(zip(starts, t0s, strict=True)) if timed and t0s is not None else {}
    bounds = [*sorted(set(starts) | {0}), data.shape[1]]
    segments: list[npt.NDArray[np.float64]] = []
    times: list[npt.NDArray[np.float64]] = []
    for a, b in itertools.pairwise(bounds):
        seg = data[:, a:b]
        keep = np.isfinite(seg).all(axis=0)
        runs = _runs(keep)
        segments.extend(seg[:, x:y] for x, y in runs)
        if timed:
            t = first_t0.get(a, np.nan) + np.arange(b - a) / rate
            times.extend(t[x:y] for x, y in runs)
    timed = timed and all(bool(np.isfinite(t).all()) for t in times)
    return Dataset(channels, segments, None if np.isnan(rate) else rate, [str(path)], times if timed else None,
                   nonfinite_rows=int((~np.isfinite(data).all(axis=0)).sum()))


def merge(datasets: list[Dataset], channels: list[str] | None) -> Dataset:
    if not datasets:
        raise TrainingError("no training data given")
    want = channels or datasets[0].channels
    segments: list[npt.NDArray[np.float64]] = []
    rates = {d.rate_hz for d in datasets if d.rate_hz is not None}
    if len(rates) > 1:
        raise TrainingError(f"training files have different sample rates {sorted(rates)}")
    for d in datasets:
        missing = [c for c in want if c not in d.channels]
        if missing:
            raise TrainingError(f"{d.sources[0]} lacks channels {missing}", path=d.sources[0], field="channels")
        rows = [d.channels.index(c) for c in want]
        segments.extend(s[rows] for s in d.segments)
    timed = all(d.times is not None for d in datasets)
    times = [t for d in datasets for t in (d.times or [])] if timed else None
    return Dataset(list(want), segments, rates.pop() if rates else None, [s for d in datasets for s in d.sources],
                   times, skipped_columns=list(dict.fromkeys(c for d in datasets for c in d.skipped_columns)),
                   nonfinite_rows=sum(d.nonfinite_rows for d in datasets))


def windows(dataset: Dataset, window: int, hop: int) -> npt.NDArray[np.float64]:
    """All windows ``(W, C, window)`` in time order (views where possible), none spanning two segments."""
    parts = [sliding_window_view(s, window, axis=1)[:, ::hop].transpose(1, 0, 2)
             for s in dataset.segments if s.shape[1] >= window]
    if not parts:
        raise TrainingError(f"no segment is as long as one window ({window} samples)", field="window")
    return np.concatenate(parts, axis=0)


def window_ends(dataset: Dataset, window: int, hop: int) -> npt.NDArray[np.float64] | None:
    """The time of each window's last sample, in the order of :func:`windows`; None without times."""
    if dataset.times is None:
        return None
    return np.concatenate([t[window - 1::hop][: (len(t) - window) // hop + 1]
                           for t in dataset.times if len(t) >= window])
