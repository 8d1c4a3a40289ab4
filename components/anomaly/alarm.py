"""From a stream of model scores to alarms: a fixed threshold, or a tail probability of the recent
score distribution (the "anomaly likelihood" of Numenta's HTM detector), with a refractory period.

Why a likelihood. A threshold placed once, from a few hundred held-out training windows, cannot
hold a false-alarm rate of 1e-3 or less: the quantile it needs is beyond the data, and any drift of
the score's level or spread after training turns into a stream of alarms. Estimating the score's
distribution online, from the scores the detector itself has just produced, keeps the alarm rate
where it was chosen while the process drifts, and expresses the threshold as a probability
(``tail_probability``) instead of a score in model units.

The estimator follows nupic's ``anomaly_likelihood`` with its documented defaults: the raw score is
averaged over the last ``averaging_windows`` (10) windows; a normal distribution is fitted to the
averaged scores of the last ``history_windows`` (8640, "a month of 5-minute records"), re-fitted
every ``reestimation_windows`` (100) windows once ``estimation_windows`` (100) are known; the alarm
level is a tail probability of 1e-5 (nupic's ``redThreshold`` 0.99999). Until the detector has its
own estimate it uses the prior the builder fitted on the held-out training windows, so a freshly
loaded model is never blind. Differences from nupic: the tail is one-sided (a score lower than usual
is not an anomaly: higher = more anomalous is the contract of every model here), and the spread has
a floor of a tenth of the prior's so a flat stretch cannot make the slightest blip "impossible".

Why a refractory period. An anomaly is an event, not a row: once the averaged score is in the red
zone, the next windows repeat the same evidence (nupic's ``_filterLikelihoods`` reports only the
entry into the red zone for the same reason). ``holdoff_windows`` additionally suppresses a new alarm
for that many windows after one, so an event that flickers in and out of the red zone is reported
once. ``is_anomaly`` keeps the unfiltered per-window decision (what debounce policies downstream
count); ``alarm`` is the filtered one.

Why re-arm after quiet (:class:`Rearm`, optional, likelihood mode). A fixed hold-off is either too short
for a noisy normal that keeps ringing after an alarm (busy CPU, keystroke timing: one event, many
alarms) or too long for the next real event. With a re-arm policy, an alarm disarms the detector until
the stream has been quiet (no window with a tail probability below ``rearm_quiet_tail``) for
``rearm_quiet_windows`` windows in a row; while disarmed, only a window in the red zone whose score is
above ``rearm_ratio`` x the score of the alarm that disarmed it alarms (something clearly worse than
the event already reported), outside the hold-off. Chosen on the synthetic development set
(docs/anomaly.md, "Re-arm after quiet").

Pure: numpy and math only, no clock, no I/O; the detector keeps one :class:`AlarmState` per asset.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

AlarmMode = Literal["threshold", "likelihood"]
# nupic's anomaly_likelihood defaults (see above); the card, the builder and its CLI take them from here.
TAIL_PROBABILITY = 1e-5
AVERAGING_WINDOWS = 10
HISTORY_WINDOWS = 8640
ESTIMATION_WINDOWS = 100
REESTIMATION_WINDOWS = 100
STD_FLOOR_OF_PRIOR = 0.1


@dataclass(slots=True, frozen=True)
class AlarmParams:
    """The alarm policy as the detector applies it (the card's ``alarm`` section, after config overrides)."""

    mode: AlarmMode = "threshold"
    threshold: float = math.inf  # score threshold (mode "threshold")
    holdoff_windows: int = 0
    tail_probability: float = TAIL_PROBABILITY
    averaging_windows: int = AVERAGING_WINDOWS
    history_windows: int = HISTORY_WINDOWS
    estimation_windows: int = ESTIMATION_WINDOWS
    reestimation_windows: int = REESTIMATION_WINDOWS
    prior_mean: float = 0.0
    prior_std: float = 1.0
    # Re-arm after quiet (likelihood mode; None = the fixed hold-off alone). See the module docstring.
    rearm_quiet_tail: float | None = None
    rearm_quiet_windows: int = 0
    rearm_ratio: float = math.inf  # inf: no exception while disarmed

    @property
    def rearms(self) -> bool:
        return self.mode == "likelihood" and self.rearm_quiet_tail is not None


@dataclass(slots=True, frozen=True)
class Decision:
    is_anomaly: bool  # this window on its own: score >= threshold, or averaged score in the red zone
    alarm: bool  # the event: first anomalous window after a quiet one and outside the hold-off
    tail: float | None  # P(averaged score >= this one) under the current estimate (mode "likelihood")


def tail_probability(x: float, mean: float, std: float) -> float:
    """One-sided normal tail P(X >= x); 1.0 at or below the mean."""
    if x <= mean:
        return 1.0
    return 0.5 * math.erfc((x - mean) / (std * math.sqrt(2.0)))


def moving_average(scores: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over up to ``n`` scores (shorter at the start), as the online state computes it."""
    c = np.cumsum(np.asarray(scores, dtype=np.float64))
    out = c.copy()
    if len(c) > n:
        out[n:] = c[n:] - c[:-n]
    counts = np.minimum(np.arange(1, len(c) + 1), n)
    return out / counts


@dataclass(slots=True)
class AlarmState:
    """One asset's stream of scores -> decisions."""

    params: AlarmParams
    _recent: deque[float] = field(default_factory=deque)
    _recent_sum: float = 0.0
    _history: deque[float] = field(init=False)
    _seen: int = 0
    _mean: float = 0.0
    _std: float = 1.0
    _was_anomalous: bool = False
    _since_alarm: int = -1  # windows since the last alarm; -1 = none yet

    def __post_init__(self) -> None:
        self._history = deque(maxlen=max(1, self.params.history_windows))
        self._mean = self.params.prior_mean
        self._std = max(self.params.prior_std, 1e-12)

    @property
    def estimate(self) -> tuple[float, float]:
        return self._mean, self._std

    def update(self, score: float) -> Decision:
        p = self.params
        tail: float | None = None
        if p.mode == "likelihood":
            self._recent.append(score)
            self._recent_sum += score
            if len(self._recent) > p.averaging_windows:
                self._recent_sum -= self._recent.popleft()
            avg = self._recent_sum / len(self._recent)
            tail = tail_probability(avg, self._mean, self._std)
            anomalous = tail < p.tail_probability
            self._history.append(avg)
            self._seen += 1
            if self._seen >= p.estimation_windows and (self._seen - p.estimation_windows) % p.reestimation_windows == 0:
                self._refit()
        else:
            anomalous = score >= p.threshold
        alarm = anomalous and not self._was_anomalous if p.mode == "likelihood" else anomalous
        if alarm and 0 <= self._since_alarm < p.holdoff_windows and not p.rearms:  # Rearm keeps the hold-off then
            alarm = False
        self._was_anomalous = anomalous
        if alarm:
            self._since_alarm = 0
        elif self._since_alarm >= 0:
            self._since_alarm += 1
        return Decision(anomalous, alarm, tail)

    def _refit(self) -> None:
        h = np.fromiter(self._history, dtype=np.float64, count=len(self._history))
        self._mean = float(h.mean())
        floor = max(STD_FLOOR_OF_PRIOR * self.params.prior_std, 1e-12)
        self._std = max(float(h.std()), floor)


@dataclass(slots=True)
class Rearm:
    """The re-arm gate (module docstring): takes the likelihood's red-zone entries, and any other stage's
    alarms (the shift stage), only while armed. Quiet and the exception are judged on the model's own
    score and tail. Used with an :class:`AlarmState` of the same params (which then leaves the hold-off
    to this gate)."""

    params: AlarmParams
    _armed: bool = True
    _calm: int = 0
    _reference: float = math.inf
    _since: int = 1 << 62

    def gate(self, score: float, decision: Decision, other_alarm: bool = False) -> bool:
        p = self.params
        assert p.rearm_quiet_tail is not None
        self._since += 1
        if self._armed:
            if decision.alarm or other_alarm:
                self._fire(score)
                return True
            return False
        if decision.is_anomaly and score > p.rearm_ratio * self._reference and self._since >= p.holdoff_windows:
            self._fire(score)
            return True
        tail = 1.0 if decision.tail is None else decision.tail
        self._calm = 0 if tail < p.rearm_quiet_tail else self._calm + 1
        if self._calm >= p.rearm_quiet_windows:
            self._armed = True
        return False

    def _fire(self, score: float) -> None:
        self._armed, self._calm, self._reference, self._since = False, 0, score, 0
