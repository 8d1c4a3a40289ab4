"""A second, model-free alarm statistic next to a model's score: has the level or the spread of one
channel just changed? (card section ``shift``, off unless the builder was asked for it).

Why. A ``knn`` model with run-time learning judges the newest few samples by whether that course has
been seen before. A lasting change that is made of familiar-looking pieces escapes it: latency that
doubles among normal spikes (each window of the outage resembles a spike window the memory holds), a
cold spell that is a slow dip of a few degrees inside the range of the seasons, a new user whose
keystroke timings come from a wider distribution. What they share is that the last few samples no
longer look like the ones just before them, in mean or in spread. The statistic says exactly that:

    stat = max(|mean(recent) - mean(history)| / (sd(history) / sqrt(recent)),
               |log(sd(recent) / sd(history))| * sqrt(2 * recent))

the difference of the newest ``recent`` samples from the ``history`` samples before them, each in its
standard errors. It is judged like the model score (``alarm.AlarmState``: a normal fitted online to the
statistic's own recent values, alarm on entering a tail below ``tail_probability``), so a series where
it is always large (a daily cycle, a random walk) teaches the stage that large is normal, and only a
change beyond its own usual size alarms. The stage decides nothing until it has fitted that normal on
``estimation_windows`` values of its own: no prior from training is needed, and none would be right for
a statistic that depends on where in its cycle the training ended.

Pure numpy, no clock, no I/O. The detector keeps one per asset next to the model's ``AlarmState``
(``components/anomaly_detector/asset.py``) and raises one alarm for either, with one hold-off.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from components.anomaly.alarm import AlarmParams, AlarmState, Decision

# The dev-set choice (benchmarks/nab_dev_variants.py, docs/anomaly.md): 2 and 50 windows of 8 samples.
RECENT = 16
HISTORY = 400
TAIL_PROBABILITY = 1e-7


def shift_statistic(recent: npt.NDArray[np.float64], history: npt.NDArray[np.float64]) -> float:
    """How far ``recent`` samples are from the ``history`` before them, in standard errors (see above)."""
    m = len(recent)
    mr, mh = float(recent.mean()), float(history.mean())
    vr, vh = max(float(recent.var()), 1e-12), max(float(history.var()), 1e-12)
    level = abs(mr - mh) / math.sqrt(vh / m)
    spread = abs(0.5 * math.log(vr / vh)) * math.sqrt(2 * m)
    return max(level, spread)


class ShiftStage:
    """One channel's samples -> the shift statistic per window -> a decision once it has its own estimate."""

    def __init__(self, recent: int, history: int, params: AlarmParams) -> None:
        self.recent, self.history = recent, history
        self.params = params
        self.alarm = AlarmState(params)
        self._buf = np.zeros(recent + history, dtype=np.float64)
        self._filled = 0
        self._judged = 0

    @property
    def started(self) -> bool:
        return self._filled > 0

    def restart(self) -> None:
        """Samples are missing before the next ones (a gap, a restarted stream, a skipped window): the
        statistic must not compare across the hole, so it waits for ``recent + history`` new samples.
        The fitted normal of the statistic is kept: it describes the series, not the hole."""
        self._filled = 0

    def push(self, samples: npt.NDArray[np.floating]) -> Decision | None:
        """Append a window's new samples (oldest first); the decision on the statistic after them, or None
        while fewer than ``recent + history`` samples have been seen (the statistic is undefined)."""
        x = np.asarray(samples, dtype=np.float64).reshape(-1)[-len(self._buf):]
        k = len(x)
        if k:
            self._buf = np.roll(self._buf, -k)
            self._buf[-k:] = x
            self._filled = min(len(self._buf), self._filled + k)
        if self._filled < len(self._buf):
            return None
        stat = shift_statistic(self._buf[self.history:], self._buf[: self.history])
        decision = self.alarm.update(stat)
        self._judged += 1
        if self._judged <= self.params.estimation_windows:  # still on the placeholder prior: no opinion yet
            return Decision(False, False, decision.tail)
        return decision
