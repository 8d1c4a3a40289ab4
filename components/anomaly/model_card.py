"""The model card: everything the detector needs to use a model, and what a reviewer needs to trust it.

Written by the builder as ``model_card.json`` next to ``model.onnx``; covered by the signature. The
detector derives its windowing (window/hop, channels), its features (spec), its input check
(``input.n_features`` must equal the spec's feature count and the ONNX input), and its decision
(threshold, confidence scale) from the card alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.anomaly import alarm
from components.anomaly import shift as shift_stage
from components.anomaly.errors import ModelCardError
from components.anomaly.features import FeatureSpec

CARD_FILE = "model_card.json"
MODEL_FILE = "model.onnx"
SIGNATURE_FILE = "model.sig"

ModelKind = Literal["isolation_forest", "pca", "autoencoder", "knn"]


class _Strict(BaseModel):
    """Unknown keys refused; so is NaN or infinity in any number (JSON's ``NaN``/``Infinity``/``1e999``
    parse): a card whose threshold is NaN loaded, and no score is ever >= NaN, so the model never
    alarmed; an infinite median made every confidence 0."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OnnxIO(_Strict):
    """The graph's interface: ``features`` float32 [N, F] in; ``score`` float32 [N] out (higher = more
    anomalous); optionally ``contributions`` float32 [N, F] (per-feature share of the score)."""

    input_name: str = "features"
    n_features: int = Field(gt=0)
    score_output: str = "score"
    contributions_output: str | None = None
    opset: int
    nodes: int = 0


class Threshold(_Strict):
    """How the alarm threshold was chosen, from training data only."""

    value: float
    method: Literal["quantile", "false_alarm_budget"]
    quantile: float = Field(gt=0, lt=1)
    margin: float = Field(default=1.0, gt=0)
    # value = median + spread_margin * (quantile score - median): a margin in units of the healthy
    # spread rather than of the score (bounded scores such as IsolationForest's cannot take x2).
    spread_margin: float | None = Field(default=None, gt=0)
    calibration_windows: int = Field(ge=1)
    false_alarms_per_hour: float | None = None


class ScoreScale(_Strict):
    """Where training scores sit, so the detector can say how sure it is: confidence is the distance
    from the threshold in units of (threshold - median training score), clipped to [0, 1]."""

    median: float
    p99: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> ScoreScale:
        if not self.median <= self.p99 <= self.max:
            raise ValueError(f"median {self.median:g} <= p99 {self.p99:g} <= max {self.max:g} does not hold")
        return self


class RearmSpec(_Strict):
    """Re-arm after quiet instead of the fixed hold-off alone (``components/anomaly/alarm.py``, Rearm):
    after an alarm, none until ``quiet_windows`` windows in a row had a tail probability of at least
    ``quiet_tail_probability``, except a red-zone window scoring above ``exception_ratio`` x the score of
    the alarm that disarmed it (None: no exception)."""

    quiet_tail_probability: float = Field(gt=0, lt=1)
    quiet_windows: int = Field(ge=1)
    exception_ratio: float | None = Field(default=None, gt=1)


class AlarmSpec(_Strict):
    """How scores become alarms (``components/anomaly/alarm.py``). Absent from older cards, which
    therefore keep the plain threshold with no hold-off.

    ``likelihood``: alarm when the tail probability of the averaged score, under a normal fitted
    online to the detector's recent averaged scores, falls below ``tail_probability``; ``prior_mean``
    and ``prior_std`` are that normal fitted on the builder's held-out (calibration) windows, used
    until the detector has ``estimation_windows`` of its own."""

    mode: Literal["threshold", "likelihood"] = "threshold"
    holdoff_windows: int = Field(default=0, ge=0)
    tail_probability: float = Field(default=alarm.TAIL_PROBABILITY, gt=0, lt=1)
    averaging_windows: int = Field(default=alarm.AVERAGING_WINDOWS, ge=1)
    history_windows: int = Field(default=alarm.HISTORY_WINDOWS, ge=1)
    estimation_windows: int = Field(default=alarm.ESTIMATION_WINDOWS, ge=1)
    reestimation_windows: int = Field(default=alarm.REESTIMATION_WINDOWS, ge=1)
    prior_mean: float = 0.0
    prior_std: float = Field(default=1.0, gt=0)
    rearm: RearmSpec | None = None

    @model_validator(mode="after")
    def _rearm_needs_likelihood(self) -> AlarmSpec:
        if self.rearm is not None and self.mode != "likelihood":
            raise ValueError("alarm.rearm needs alarm mode likelihood (quiet is a tail probability)")
        return self


ONLINE_CAPACITY = 20_000


class OnlineSpec(_Strict):
    """Run-time learning of a ``knn`` model (``components/anomaly/novelty.py``): the detector keeps, per
    asset, a memory of the windows it has scored, and a window's score is its distance to the nearest
    training prototype OR remembered window, whichever is nearer. A new regime is then reported when it
    starts, not for as long as it lasts. Absent = the model scores against its training prototypes only.

    ``exclude_windows``: a window enters the memory only after this many newer ones (the windows that
    share samples with it would otherwise be its own nearest neighbours); ``merge_radius``: a window
    nearer than this to a remembered one is not stored (the memory keeps the resolution of the typical
    neighbour spacing instead of every near-duplicate); ``capacity``: the oldest entries go beyond it."""

    capacity: int = Field(default=ONLINE_CAPACITY, ge=1)
    exclude_windows: int = Field(default=1, ge=0)
    merge_radius: float = Field(default=0.0, ge=0)


class ShiftSpec(_Strict):
    """A second alarm statistic next to the model's score (``components/anomaly/shift.py``): the newest
    ``recent`` samples of ``channel`` (None = the first channel) against the ``history`` samples before
    them, in mean and spread, judged by its own likelihood stage at ``tail_probability``. Absent = the
    model's score alone decides. The detector raises one alarm for either, with the card's hold-off."""

    channel: str | None = None
    recent: int = Field(default=shift_stage.RECENT, ge=2)
    history: int = Field(default=shift_stage.HISTORY, ge=2)
    tail_probability: float = Field(default=shift_stage.TAIL_PROBABILITY, gt=0, lt=1)


class FeatureStats(_Strict):
    """Training mean and spread per feature, exactly as the model standardizes them (a constant feature's
    spread is 1; calendar features are taken as they are: mean 0, spread 1). Used for contributions
    when the model gives none, and as the units of a knn model's run-time memory."""

    mean: list[float]
    std: list[float]


class TrainingSummary(_Strict):
    sources: list[str]
    rows: int = Field(ge=0)
    windows: int = Field(ge=0)
    fit_windows: int = Field(ge=0)
    calibration_windows: int = Field(ge=0)
    seed: int
    created_at: str
    label_filter: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ModelCard(_Strict):
    format: Literal["nucleus.model_card/1"] = "nucleus.model_card/1"
    component: str
    version: str
    kind: ModelKind
    description: str = ""
    channels: list[str] = Field(min_length=1)
    sample_rate_hz: float | None = Field(default=None, gt=0)
    window: int = Field(ge=4)
    hop: int = Field(ge=1)
    features: FeatureSpec
    feature_names: list[str]
    feature_stats: FeatureStats
    onnx: OnnxIO
    threshold: Threshold
    score_scale: ScoreScale
    training: TrainingSummary
    metrics: dict[str, float] = Field(default_factory=dict)
    alarm: AlarmSpec = Field(default_factory=AlarmSpec)
    online: OnlineSpec | None = None
    shift: ShiftSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        names = self.features.feature_names()
        if names != self.feature_names:
            raise ValueError("feature_names do not match the feature spec")
        if self.onnx.n_features != len(names):
            raise ValueError(f"onnx.n_features={self.onnx.n_features} but the feature spec gives {len(names)}")
        missing = [c for c in self.features.channels() if c not in self.channels]
        if missing:
            raise ValueError(f"feature spec uses channels {missing} that are not in channels")
        if not (len(self.feature_stats.mean) == len(self.feature_stats.std) == len(names)):
            raise ValueError("feature_stats length differs from the feature count")
        if self.hop > self.window:
            raise ValueError("hop larger than window would skip samples")
        if self.online is not None and self.kind != "knn":
            raise ValueError(f"online learning needs a knn model, not {self.kind}")
        if self.shift is not None and self.shift.channel is not None and self.shift.channel not in self.channels:
            raise ValueError(f"shift.channel {self.shift.channel!r} is not in channels")
        if self.shift is not None and self.alarm.mode != "likelihood":
            raise ValueError("a shift stage needs alarm mode likelihood (it is judged the same way)")
        return self

    def confidence(self, score: float) -> float:
        """0 at the threshold, 1 at (or beyond) one training spread away from it."""
        spread = self.threshold.value - self.score_scale.median
        if spread <= 0:
            return 1.0
        return float(min(1.0, abs(score - self.threshold.value) / spread))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def parse_card(data: bytes | str, *, path: Path | str | None = None, component: str | None = None) -> ModelCard:
    try:
        return ModelCard.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise ModelCardError(f"model card: {field}: {first['msg']}", component=component, path=path,
                             field=field) from exc


def load_card(path: Path, *, component: str | None = None) -> ModelCard:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelCardError(f"model card unreadable: {exc}", component=component, path=path) from exc
    return parse_card(data, path=path, component=component)
