"""CSV replay: recorded data (plain or gzipped CSV) turned into regular batches, streamed.

Two shapes of file are common and both are handled: a timestamp column plus values (NAB:
``timestamp,value``, 5-minute steps) and values only, one row per sample at a known rate (the
gearbox recordings: ``a1,a2,a3,a4``, rate given in the configuration). The file is read lazily,
so a recording larger than memory replays as well as a small one.

A batch is a run of rows with one regular step: a timestamp gap (a step more than 1.5x the
batch's first step, or a step backwards) ends the batch, so a consumer that trusts
``t0 + i / rate_hz`` is never told a wrong time. Unparseable, missing or non-finite cells (``inf``,
``1e400``, ``NaN``) become NaN and are counted — the detector decides what a NaN window means, the
replay does not invent values — and each count is reported (``on_problem``) when it passes 1, 10,
100, ... with the file and line, so a bad file is seen while it loops, not only when it ends.
Pacing (real time or accelerated) is the service's job; this module has no clock.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from components.sensor_ingest.batch import Batch
from components.sensor_ingest.problems import ProblemReport, log_due

_TIMESTAMP_NAMES = ("timestamp", "time", "ts", "datetime", "date")


class ReplayError(Exception):
    """The file cannot be replayed; names the file and what is wrong with it."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(slots=True)
class ReplayStats:
    rows: int = 0
    bad_values: int = 0  # cells that were empty, not numbers or not finite (became NaN)
    short_rows: int = 0  # rows with fewer cells than the header (the missing ones became NaN)
    long_rows: int = 0  # rows with more cells than the header (the extra ones were ignored)
    bad_timestamps: int = 0  # rows skipped because their timestamp did not parse
    gaps: int = 0  # irregular steps that ended a batch early
    passes: int = 0  # completed passes over the file (loop)
    extra: dict[str, int] = field(default_factory=dict)


UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def number_unit(value: float) -> str:
    """The unit of an epoch number by its size: a time since 1973 is above 1e11 only in ms (to 5138),
    above 1e14 only in µs, above 1e17 only in ns. Relative times (from 0) cannot be told apart: for
    those the configuration says the unit."""
    v = abs(value)
    return "ns" if v >= 1e17 else "us" if v >= 1e14 else "ms" if v >= 1e11 else "s"


def parse_timestamp(text: str, scale: float = 1.0) -> float:
    """Seconds from a number (times ``scale``: 1e-3 for milliseconds) or an ISO-8601 date-time (naive
    means UTC, as NAB's are)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):  # "inf", "nan": no time at all
            raise ValueError(f"{text!r} is not a time")
        return value * scale
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _open(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


class CsvReplay:
    """Reads a CSV file once (or forever, with ``loop``) as regular batches of ``batch_size`` rows."""

    def __init__(self, path: Path, *, batch_size: int, rate_hz: float | None = None,
                 columns: tuple[str, ...] | None = None, channel_names: tuple[str, ...] | None = None,
                 timestamp_column: str | None = "auto", timestamp_unit: str = "auto", loop: bool = False,
                 on_problem: ProblemReport | None = None) -> None:
        if not path.is_file():
            raise ReplayError(path, "not a file (a directory)" if path.is_dir() else "no such file")
        self.path = path
        self.batch_size = batch_size
        self.loop = loop
        self.stats = ReplayStats()
        self.on_problem = on_problem
        self._line = 0  # line of the file being read (the header is line 1), for the reports
        try:
            with _open(path) as f:
                reader = csv.reader(f)
                header = next(reader, None)
                # A header and nothing else would be accepted and then replay nothing, for ever silent.
                first_row = next((row for row in reader if row), None)
        except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:  # unreadable, not gzip, not text, ...
            raise ReplayError(path, f"cannot read the header row: {exc}") from exc
        if not header:
            raise ReplayError(path, "empty file (a header row is required)")
        if first_row is None:
            raise ReplayError(path, "no data rows after the header")
        header = [h.strip() for h in header]
        if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
            # Read as comma-separated, "a;b" is one column of text: every value would be NaN, for ever.
            raise ReplayError(path, f"the header is one column {header[0]!r:.60}: the file is not comma-separated")
        if timestamp_column == "auto":
            timestamp_column = next((h for h in header if h.lower() in _TIMESTAMP_NAMES), None)
        if timestamp_column is not None and timestamp_column not in header:
            raise ReplayError(path, f"timestamp column {timestamp_column!r} not in header {header}")
        self._ts_index = header.index(timestamp_column) if timestamp_column is not None else None
        # Epoch milliseconds read as seconds made a 1 kHz recording a 1 Hz one (rate_hz 1.0), silently.
        self.timestamp_unit = "s" if timestamp_unit == "auto" else timestamp_unit
        if timestamp_unit == "auto" and self._ts_index is not None and self._ts_index < len(first_row):
            with contextlib.suppress(ValueError):
                self.timestamp_unit = number_unit(float(first_row[self._ts_index]))
        if self.timestamp_unit not in UNIT_SCALE:
            raise ReplayError(path, f"timestamp unit {timestamp_unit!r} is not one of auto, {', '.join(UNIT_SCALE)}")
        self._scale = UNIT_SCALE[self.timestamp_unit]
        value_cols = [h for h in header if h != timestamp_column] if columns is None else list(columns)
        missing = [c for c in value_cols if c not in header]
        if missing or not value_cols:
            raise ReplayError(path, f"columns {missing or value_cols} not in header {header}")
        # A name twice in the header is two columns under one name: reading "the" column would take the
        # first for both channels and drop the other unseen.
        ambiguous = sorted({c for c in [*value_cols, timestamp_column] if c is not None and header.count(c) > 1})
        if ambiguous:
            raise ReplayError(path, f"columns {ambiguous} appear more than once in header {header}; rename them "
                                    "in the file (csv.channelNames renames channels, not columns)")
        self._indexes = [header.index(c) for c in value_cols]
        names = tuple(channel_names) if channel_names is not None else tuple(value_cols)
        if len(names) != len(value_cols):
            raise ReplayError(path, f"{len(names)} channel names for {len(value_cols)} columns")
        if len(set(names)) != len(names):
            raise ReplayError(path, f"channel names {list(names)} are not distinct (a consumer could not tell "
                                    "the channels apart)")
        self.channels = names
        if self._ts_index is None and (rate_hz is None or rate_hz <= 0):
            raise ReplayError(path, "no timestamp column, so rateHz must say the sampling rate")
        self.rate_hz = rate_hz
        self._width = len(header)

    @property
    def has_timestamps(self) -> bool:
        return self._ts_index is not None

    def batches(self) -> Iterator[Batch]:
        """Batches in file order; with ``loop`` the file restarts and time continues past its end."""
        offset = 0.0
        while True:
            last_t: float | None = None
            first_t: float | None = None
            for batch in self._one_pass():
                wrapped = first_t is None and self.stats.passes > 0  # the file starts over: not the next sample
                if first_t is None:
                    first_t = batch.t0
                last_t = batch.t0 + batch.duration_s
                yield dataclasses.replace(batch, t0=batch.t0 + offset, follows_gap=batch.follows_gap or wrapped)
            self.stats.passes += 1
            if not self.loop or first_t is None or last_t is None:
                return
            offset += last_t - first_t

    def _one_pass(self) -> Iterator[Batch]:
        n_ch = len(self._indexes)
        fallback_step = 1.0 / self.rate_hz if self.rate_hz else None
        with _open(self.path) as f:
            reader = csv.reader(f)
            next(reader, None)
            self._line = 1
            values: list[list[float]] = []
            times: list[float] = []
            step: float | None = None
            sample = 0
            after_gap = False  # the batch being filled starts after a gap in the timestamps
            for row in reader:
                self._line = reader.line_num
                if not row:
                    continue
                self.stats.rows += 1
                if len(row) < self._width:
                    self._problem("short_rows", f"{len(row)} cells for {self._width} columns (missing ones read "
                                                "as NaN)")
                elif len(row) > self._width:
                    self._problem("long_rows", f"{len(row)} cells for {self._width} columns (the extra ones "
                                               "are ignored)")
                t: float
                if self._ts_index is not None:
                    try:
                        t = parse_timestamp(row[self._ts_index], self._scale)
                    except (ValueError, IndexError, OverflowError):
                        cell = row[self._ts_index] if self._ts_index < len(row) else None
                        self._problem("bad_timestamps", f"timestamp {cell!r:.40} is not a time (row skipped)")
                        continue
                else:
                    assert self.rate_hz is not None
                    t = sample / self.rate_hz
                sample += 1
                if times:
                    dt = t - times[-1]
                    if step is None:
                        step = dt
                    if dt <= 0 or step <= 0 or not math.isclose(dt, step, rel_tol=0.5):
                        self._problem("gaps", f"time steps {dt:+g} s after a step of {step:g} s: the batch ends "
                                              "before this row")
                        yield self._batch(times, values, step if step and step > 0 else fallback_step, after_gap)
                        values, times, step, after_gap = [], [], None, True
                values.append(self._cells(row, n_ch))
                times.append(t)
                if len(times) >= self.batch_size:
                    yield self._batch(times, values, step if step is not None else fallback_step, after_gap)
                    values, times, after_gap = [], [], False
                    # keep `step`: the next batch continues the same regular series
            if times:
                yield self._batch(times, values, step if step is not None else fallback_step, after_gap)

    def _cells(self, row: list[str], n_ch: int) -> list[float]:
        out = [math.nan] * n_ch
        for j, i in enumerate(self._indexes):
            try:
                v = float(row[i])
            except (ValueError, IndexError):
                v = math.nan
            if math.isfinite(v):  # "inf", "1e400" (inf) and "NaN" are no more a reading than "x" is
                out[j] = v
            else:
                cell = row[i] if i < len(row) else None
                self._problem("bad_values", f"{self.channels[j]!r} is {cell!r:.40}, not a finite number "
                                            "(read as NaN)")
        return out

    def _problem(self, reason: str, detail: str) -> None:
        old = getattr(self.stats, reason)
        setattr(self.stats, reason, old + 1)
        if self.on_problem is not None and log_due(old, old + 1):
            self.on_problem(reason, detail, old + 1, f"{self.path}:{self._line}")

    def _batch(self, times: list[float], values: list[list[float]], step: float | None, after_gap: bool) -> Batch:
        data = np.asarray(values, dtype=np.float32).T.copy()
        if self._ts_index is None and self.rate_hz:  # no timestamps: the configured rate, exactly
            return Batch(times[0], self.rate_hz, self.channels, data, follows_gap=after_gap)
        if len(times) > 1 and times[-1] > times[0]:
            # The mean step of the batch, not its first: epoch times near 1.7e9 s carry ~2e-7 s of float
            # error, 0.02 % of a 1 ms step, which the first step alone passed on to rate_hz whole.
            step = (times[-1] - times[0]) / (len(times) - 1)
        if step is None or step <= 0:
            step = 1.0  # a single row with no neighbour: any rate is as true as another
        return Batch(times[0], 1.0 / step, self.channels, data, follows_gap=after_gap)
