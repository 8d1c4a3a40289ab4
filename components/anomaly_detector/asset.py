"""One asset's judgement state under one model: the alarm policy and, for a learning ``knn`` model,
the run-time memory. Both belong to the model they were started with: a swapped-in model starts
fresh (its scores are in other units, and what the old model's memory learnt is not in the new card).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from components.anomaly.alarm import AlarmMode, AlarmState, Decision
from components.anomaly.novelty import OnlineMemory
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

    @classmethod
    def start(cls, model: LoadedModel, *, mode: AlarmMode | None = None, holdoff_windows: int | None = None,
              tail_probability: float | None = None) -> AssetState:
        params = model.alarm_params(mode=mode, holdoff_windows=holdoff_windows, tail_probability=tail_probability)
        online = model.card.online
        memory = OnlineMemory(online, model.extractor.n_features) if online is not None else None
        return cls(model, AlarmState(params), memory)

    def judge(self, score: float, features: npt.NDArray[np.float32]) -> Judged:
        """The window's final score (the model's, or its distance to the nearest remembered window if
        that is nearer) and the alarm decision on it; then the window is remembered."""
        residual = None
        if self.memory is not None:
            z = self.model.standardize(features)
            remembered, diff = self.memory.nearest(z)
            if remembered < score and diff is not None:
                score, residual = remembered, diff * diff
            self.memory.observe(z)
        return Judged(score, self.alarm.update(score), residual)
