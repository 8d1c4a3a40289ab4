"""One asset's judgement state under one model: the alarm policy, for a learning ``knn`` model the
run-time memory, for a card with a ``shift`` section the level/spread-change stage, and for one whose
alarm section has ``rearm`` the re-arm gate (``components/anomaly/alarm.py``). All belong to
the model they were started with: a swapped-in model starts fresh (its scores are in other units, and
what the old model's memory learnt is not in the new card).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from components.anomaly.alarm import AlarmMode, AlarmParams, AlarmState, Decision, Rearm
from components.anomaly.novelty import OnlineMemory
from components.anomaly.shift import ShiftStage
from components.anomaly_detector.scoring import LoadedModel


@dataclass(slots=True, frozen=True)
class Judged:
    score: float
    decision: Decision
    # Per feature, the squared difference to the remembered window that set the score (the model's
    # own contributions explain it otherwise): what made this window as far as it is.
    contributions: npt.NDArray[np.float64] | None = None


@dataclass(slots=True)
class AssetState:
    model: LoadedModel
    alarm: AlarmState
    memory: OnlineMemory | None
    shift: ShiftStage | None = None
    shift_channel: int = 0
    rearm: Rearm | None = None
    _since_alarm: int = -1  # windows since the last alarm of either stage (with a shift stage); -1 = none

    @classmethod
    def start(cls, model: LoadedModel, *, mode: AlarmMode | None = None, holdoff_windows: int | None = None,
              tail_probability: float | None = None) -> AssetState:
        params = model.alarm_params(mode=mode, holdoff_windows=holdoff_windows, tail_probability=tail_probability)
        online = model.card.online
        memory = OnlineMemory(online, model.extractor.n_features) if online is not None else None
        rearm = Rearm(params) if params.rearms else None
        spec = model.card.shift
        if spec is None or params.mode != "likelihood":  # a threshold override turns the stage off with the likelihood
            return cls(model, AlarmState(params), memory, rearm=rearm)
        channel = model.card.channels.index(spec.channel) if spec.channel is not None else 0
        stage = ShiftStage(spec.recent, spec.history, AlarmParams(
            mode="likelihood", holdoff_windows=params.holdoff_windows, tail_probability=spec.tail_probability,
            averaging_windows=1, history_windows=params.history_windows, estimation_windows=params.estimation_windows,
            reestimation_windows=params.reestimation_windows))
        return cls(model, AlarmState(params), memory, stage, channel, rearm)

    def judge(self, score: float, features: npt.NDArray[np.float32],
              window: npt.NDArray[np.floating] | None = None, follows: bool = True) -> Judged:
        """The window's final score (the model's, or its distance to the nearest remembered window if
        that is nearer) and the alarm decision on it; then the window is remembered. ``window`` (channels
        x samples, the raw window) feeds the shift stage, if the card has one (it needs the samples);
        ``follows`` False says samples are missing before it (``Window.follows``)."""
        residual = None
        if self.memory is not None:
            z = self.model.standardize(features)
            remembered, diff = self.memory.nearest(z)
            if remembered < score and diff is not None:
                score, residual = remembered, diff * diff
            self.memory.observe(z)
        decision = self.alarm.update(score)
        if self.shift is None:
            if self.rearm is not None:
                decision = Decision(decision.is_anomaly, self.rearm.gate(score, decision), decision.tail)
            return Judged(score, decision, residual)
        if window is None:
            raise ValueError(f"model {self.model.component} has a shift stage: judge() needs the window's samples")
        row = np.asarray(window)[self.shift_channel]
        # The first window's samples are all new; after it, each window adds ``hop`` samples, unless
        # samples are missing before it: then the stage starts its samples over (never across a hole).
        if not follows:
            self.shift.restart()
        shifted = self.shift.push(row[-self.model.card.hop:] if self.shift.started else row)
        shift_alarm = shifted is not None and shifted.alarm
        if self.rearm is not None:  # one gate for both stages: either's alarm disarms both
            anomalous = decision.is_anomaly or (shifted is not None and shifted.is_anomaly)
            return Judged(score, Decision(anomalous, self.rearm.gate(score, decision, shift_alarm), decision.tail),
                          residual)
        fired = decision.alarm or shift_alarm
        # One event, one alarm: either stage's alarm starts the same hold-off for both.
        alarm = fired and not (0 <= self._since_alarm < self.alarm.params.holdoff_windows)
        if alarm:
            self._since_alarm = 0
        elif self._since_alarm >= 0:
            self._since_alarm += 1
        anomalous = decision.is_anomaly or (shifted is not None and shifted.is_anomaly)
        return Judged(score, Decision(anomalous, alarm, decision.tail), residual)
