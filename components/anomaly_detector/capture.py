"""Which scored windows to keep for retraining: the ones the model was unsure about, plus a thin,
deterministic sample of normal ones (so retraining sees the current healthy state, not only edge
cases). A per-minute budget bounds the traffic whatever the data does.

Everything is counted per asset. With one shared count, three turbines whose windows arrive in turn
and a ``normal_every`` divisible by three had every normal sample taken from the same turbine, and one
asset whose model is unsure all the time spent the whole minute's budget, so the others' retraining
data stopped: the budget is per asset (a device with N assets sends at most N x ``max_per_minute``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

CaptureKind = Literal["low_confidence", "normal_sample"]


@dataclass(slots=True)
class CapturePolicy:
    low_confidence_below: float
    normal_every: int  # 0 = never
    max_per_minute: int  # per asset
    _normals: Counter[str] = field(default_factory=Counter)
    _minute: dict[str, float] = field(default_factory=dict)
    _in_minute: Counter[str] = field(default_factory=Counter)

    def decide(self, *, asset: str, is_anomaly: bool, confidence: float, now: float) -> CaptureKind | None:
        kind: CaptureKind | None = None
        if confidence < self.low_confidence_below:
            kind = "low_confidence"
        elif not is_anomaly and self.normal_every > 0:
            self._normals[asset] += 1
            if self._normals[asset] >= self.normal_every:
                self._normals[asset] = 0
                kind = "normal_sample"
        if kind is None:
            return None
        minute = now // 60.0
        if minute != self._minute.get(asset):
            self._minute[asset], self._in_minute[asset] = minute, 0
        if self._in_minute[asset] >= self.max_per_minute:
            return None
        self._in_minute[asset] += 1
        return kind
