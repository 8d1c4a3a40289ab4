"""Sliding windows over one asset's batch stream, with every input defect counted, never guessed at.

Pure (no I/O, no clock). Defined behaviour per defect, each counted under its key:

* ``duplicate`` / ``out_of_order`` -- a batch whose ``seq`` is not after the last accepted one is
  dropped; the window continues.
* ``restart`` -- the producer started over: a new ``stream`` id, or (from a producer that sends none)
  a lower ``seq`` with a later ``t0`` than the last accepted batch (an old batch arriving late has an
  earlier one). The partial window is discarded and numbering follows the new stream; without
  this a restarted ingest's batches were all dropped as ``out_of_order`` until its ``seq`` caught up,
  while the stream looked alive to the fail-safe.
* ``interleaved`` -- a restart back to the stream the last restart left: two producers publish for
  this asset (two ingests configured with the same ``asset``). Handled as a restart, so no window
  ever completes; counted apart because no real restart goes back to an old stream id.
* ``gap`` -- ``seq`` jumped: samples are missing, so the partial window is discarded (a window never
  spans missing data) and windowing restarts with this batch. The count is the number of missing
  batches.
* ``time_gap`` -- ``seq`` is consecutive but the producer says samples are missing before this batch
  (``follows_gap: true``: the ingest saw a jump in the samples' own times, or a replay started over):
  handled as a ``gap``, one per such batch. Without it a window joined the two sides of the jump.
* ``missing_channel`` -- the batch lacks a channel the model needs: dropped, window restarted.
* ``malformed`` -- a field is missing or of the wrong type (``seq`` not a whole number; ``t0`` or
  ``rate_hz`` not a finite number, ``rate_hz`` not positive), or data is not a 2-D array of numbers
  (integer or float: text, complex, boolean or structured arrays are not samples) matching ``channels``
  (names: strings):
  dropped, window restarted. Without the checks a text array stopped the detector (one publisher's
  bad batch ended every asset's scoring), text of digits and booleans were scored as numbers, complex
  samples lost their imaginary part, and a NaN ``rate_hz`` passed the rate check.
* ``rate_mismatch`` -- the batch's ``rate_hz`` differs from the model's by more than 1 %: dropped,
  window restarted (features in Hz bands would be wrong). A model whose card states no rate takes
  any, but a batch whose rate differs from the buffered batches' is handled the same way, so a
  window never mixes two rates (the next batch at the new rate starts a fresh window).
* ``nan`` -- a completed window holds NaN/inf: the window is not scored.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# dtype kinds that are samples: signed and unsigned integers, floats (not bool, complex, text, objects, records)
_NUMERIC = frozenset("iuf")


@dataclass(slots=True, frozen=True)
class Window:
    data: npt.NDArray[np.float32]  # (C, window), channel order of the model
    seq_first: int
    seq_last: int
    t_end: float  # time of the last sample
    # its newest ``hop`` samples directly follow the previous window's (no reset, no skipped window between)
    follows: bool = False


@dataclass(slots=True)
class _Batch:
    seq: int
    start: int  # global index of its first sample
    n: int
    t0: float
    rate: float


@dataclass(slots=True)
class Windower:
    channels: list[str]
    window: int
    hop: int
    rate_hz: float | None = None
    skipped: Counter[str] = field(default_factory=Counter)
    # per kind, what the last such batch was like (logged with the count: "rate_mismatch" alone did not say
    # which rate came, or which channel was missing)
    why: dict[str, str] = field(default_factory=dict)
    last_seq: int | None = None
    last_stream: str | None = None
    replaced_stream: str | None = None  # the stream the last restart left (a return to it: ``interleaved``)
    last_t0: float | None = None
    _buf: npt.NDArray[np.float32] = field(init=False)
    _base: int = 0  # global index of _buf[:, 0]
    _last_end: int | None = None  # global index of the last sample of the last window handed out
    _batches: deque[_Batch] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._buf = np.zeros((len(self.channels), 0), dtype=np.float32)

    def reset(self) -> None:
        """Forget buffered samples (not the sequence position)."""
        self._base += self._buf.shape[1]
        self._buf = np.zeros((len(self.channels), 0), dtype=np.float32)
        self._batches.clear()
        self._last_end = None

    def reconfigure(self, channels: list[str], window: int, hop: int, rate_hz: float | None) -> None:
        """Adopt a new model's windowing; buffered samples carry over when the channels are the same, so
        a model swap does not cost a window."""
        if channels != self.channels:
            self.channels = list(channels)
            self.reset()
        self.window, self.hop, self.rate_hz = window, hop, rate_hz

    def push(self, batch: dict[str, Any]) -> list[Window]:
        try:
            raw_seq, t0, rate = batch["seq"], float(batch["t0"]), float(batch["rate_hz"])
            names = list(batch["channels"])
            data = batch["data"]
        except (KeyError, TypeError, ValueError):
            raw_seq, t0, rate, names, data = None, 0.0, 0.0, [], None
        if (isinstance(raw_seq, bool) or not isinstance(raw_seq, int | np.integer) or not math.isfinite(t0)
                or not math.isfinite(rate) or rate <= 0):
            self.skipped["malformed"] += 1
            self.why["malformed"] = (f"seq {repr(raw_seq)[:40]}, t0 {t0!r}, rate_hz {rate!r}: seq must be a whole "
                                     "number, t0 finite, rate_hz finite and > 0" if raw_seq is not None else
                                     "lacks seq, t0, rate_hz, channels or data, or one is not a number")
            self.reset()
            # its seq, if that is sound and next, still counts as seen: the dropped batch is 'malformed',
            # not also a one-batch 'gap' when the next one arrives
            seq_field = batch.get("seq") if isinstance(batch, dict) else None
            stream_field = batch.get("stream") if isinstance(batch, dict) else None
            if (self.last_seq is not None and isinstance(seq_field, int) and not isinstance(seq_field, bool)
                    and seq_field == self.last_seq + 1
                    and (None if stream_field is None else str(stream_field)) == self.last_stream):
                self.last_seq = seq_field
            return []
        seq = int(raw_seq)
        stream = batch.get("stream")
        stream = str(stream) if stream is not None else None
        if self.last_seq is not None and (
                (stream is not None and self.last_stream is not None and stream != self.last_stream)
                or (stream is None and seq < self.last_seq and self.last_t0 is not None and t0 > self.last_t0)):
            back = stream is not None and stream == self.replaced_stream
            self.skipped["interleaved" if back else "restart"] += 1
            self.replaced_stream = self.last_stream
            self.last_seq = None
            self.reset()
        self.last_stream = stream
        if self.last_seq is not None and seq <= self.last_seq:
            self.skipped["duplicate" if seq == self.last_seq else "out_of_order"] += 1
            return []
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.skipped["gap"] += seq - self.last_seq - 1
            self.reset()
        elif self.last_seq is not None and batch.get("follows_gap") is True:
            self.skipped["time_gap"] += 1
            self.reset()
        self.last_seq = seq
        self.last_t0 = t0
        if (not isinstance(data, np.ndarray) or data.dtype.kind not in _NUMERIC or data.ndim != 2
                or data.shape[0] != len(names) or data.shape[1] == 0 or not all(isinstance(n, str) for n in names)):
            self.skipped["malformed"] += 1
            self.why["malformed"] = (f"data {type(data).__name__} {getattr(data, 'dtype', '')} of shape "
                                     f"{getattr(data, 'shape', None)} for {len(names)} channel name(s): a 2-D "
                                     "integer or float array, one row per channel, is expected")
            self.reset()
            return []
        # A model without a rate (built from a CSV without --rate-hz) takes any rate, but one window never
        # mixes two: it used to, and its features (bands by bin, t_end) mixed two time scales unnoticed.
        expected = self.rate_hz if self.rate_hz is not None else self._batches[-1].rate if self._batches else None
        if expected is not None and abs(rate - expected) > 0.01 * expected:
            self.skipped["rate_mismatch"] += 1
            self.why["rate_mismatch"] = (f"rate_hz {rate:g}, the model's {expected:g}" if self.rate_hz is not None
                                         else f"rate_hz {rate:g} after {expected:g} in the same window")
            self.reset()
            return []
        try:
            rows = [names.index(c) for c in self.channels]
        except ValueError:
            self.skipped["missing_channel"] += 1
            self.why["missing_channel"] = (f"lacks {[c for c in self.channels if c not in names]} (has {names})")
            self.reset()
            return []
        block = data[rows] if rows != list(range(len(names))) else data
        n = block.shape[1]
        start = self._base + self._buf.shape[1]
        self._batches.append(_Batch(seq, start, n, t0, rate))
        self._buf = np.concatenate([self._buf, block.astype(np.float32, copy=False)], axis=1)
        out: list[Window] = []
        end = self.window
        while end <= self._buf.shape[1]:
            win = self._buf[:, end - self.window:end]
            g0, g1 = self._base + end - self.window, self._base + end - 1
            first = last = None
            for b in self._batches:
                if first is None and b.start <= g0 < b.start + b.n:
                    first = b
                if b.start <= g1 < b.start + b.n:
                    last = b
                    break
            assert first is not None and last is not None
            if np.isfinite(win).all():
                follows = self._last_end is not None and g1 - self._last_end == self.hop
                out.append(Window(win.copy(), first.seq, last.seq, last.t0 + (g1 - last.start) / last.rate, follows))
                self._last_end = g1
            else:
                self.skipped["nan"] += 1
            end += self.hop
        drop = end - self.window
        if drop > 0:
            self._buf = self._buf[:, drop:]
            self._base += drop
            while self._batches and self._batches[0].start + self._batches[0].n <= self._base:
                self._batches.popleft()
        return out
