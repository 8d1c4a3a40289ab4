"""Which scored windows to keep for retraining: the ones the model was unsure about, plus a thin,
deterministic sample of normal ones (so retraining sees the current healthy state, not only edge
cases). A per-minute budget bounds the traffic whatever the data does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CaptureKind = Literal["low_confidence", "normal_sample"]


@dataclass(slots=True)
class CapturePolicy:
    low_confidence_below: float
    normal_every: int  # 0 = never
    max_per_minute: int
    _normals: int = 0
    _minute: float = -1.0
    _in_minute: int = 0

    def decide(self, *, is_anomaly: bool, confidence: float, now: float) -> CaptureKind | None:
        kind: CaptureKind | None = None
        if confidence < self.low_confidence_below:
            kind = "low_confidence"
        elif not is_anomaly and self.normal_every > 0:
            self._normals += 1
            if self._normals >= self.normal_every:
                self._normals = 0
                kind = "normal_sample"
        if kind is None:
            return None
        minute = now // 60.0
        if minute != self._minute:
            self._minute, self._in_minute = minute, 0
        if self._in_minute >= self.max_per_minute:
            return None
        self._in_minute += 1
        return kind
