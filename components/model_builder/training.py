"""Fit an anomaly model on healthy features, export it, prove the export, pick the threshold.

Data discipline: windows are split in time order into a fit part (the first ``1 - calibration_fraction``)
and a calibration part (the rest). The model only sees the fit part; the threshold is a quantile of
the calibration part's scores (held-out healthy data, so the quantile is not biased low the way
in-sample scores are). No label other than "this data is normal" is ever used.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
from sklearn.decomposition import PCA  # type: ignore[import-untyped]
from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]
from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
from sklearn.neighbors import NearestNeighbors  # type: ignore[import-untyped]
from sklearn.neural_network import MLPRegressor  # type: ignore[import-untyped]

from components.anomaly import alarm as alarms
from components.anomaly.alarm import AlarmMode, moving_average
from components.anomaly.errors import TrainingError
from components.anomaly.model_card import (
    ONLINE_CAPACITY,
    AlarmSpec,
    FeatureStats,
    ModelKind,
    OnlineSpec,
    OnnxIO,
    RearmSpec,
    ScoreScale,
    ShiftSpec,
    Threshold,
)
from components.anomaly.shift import TAIL_PROBABILITY as SHIFT_TAIL
from components.model_builder import onnx_export

Scorer = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]
MIN_WINDOWS = 20
# Fewer fit windows than this left by the calibration split: a model of a handful of points, whose
# standardization can be degenerate (the ONNX and scikit-learn scores then disagree on NaN).
MIN_FIT_WINDOWS = MIN_WINDOWS // 2
# knn --online: merge radius as a fraction of the median held-out distance (the typical neighbour spacing)
ONLINE_MERGE_FRACTION = 0.5
AUTOENCODER_MAX_ITER = 400


@dataclass(slots=True)
class TrainParams:
    kind: ModelKind = "isolation_forest"
    quantile: float = 0.999
    false_alarms_per_hour: float | None = None
    margin: float = 1.0
    spread_margin: float | None = None
    calibration_fraction: float = 0.25
    seed: int = 0
    n_estimators: int = 100
    max_samples: int = 256
    pca_variance: float = 0.95
    t2_weight: float = 0.5
    hidden: tuple[int, ...] | None = None
    max_iter: int = AUTOENCODER_MAX_ITER
    tolerance: float = 1e-3
    # knn: at most this many fit windows become prototypes (evenly spaced in time beyond it)
    max_prototypes: int = 4096
    # knn: the detector keeps learning at run time (model card "online"); see OnlineSpec
    online: bool = False
    online_capacity: int = ONLINE_CAPACITY
    online_exclude_windows: int = 1
    online_merge_fraction: float = ONLINE_MERGE_FRACTION
    # features taken as they are, not standardized (FeatureSpec.unscaled(): the calendar's)
    unscaled: tuple[int, ...] = ()
    # Alarm policy written to the card (components/anomaly/alarm.py); defaults keep the plain threshold.
    alarm_mode: AlarmMode = "threshold"
    holdoff_windows: int = 0
    tail_probability: float = alarms.TAIL_PROBABILITY
    averaging_windows: int = alarms.AVERAGING_WINDOWS
    history_windows: int = alarms.HISTORY_WINDOWS
    estimation_windows: int = alarms.ESTIMATION_WINDOWS
    reestimation_windows: int = alarms.REESTIMATION_WINDOWS
    # A level/spread-change stage next to the score (model card "shift", components/anomaly/shift.py):
    # None = off (the default); else (recent, history) samples, judged at shift_tail. Needs likelihood.
    shift: tuple[int, int] | None = None
    shift_tail: float = SHIFT_TAIL
    # Re-arm after quiet (model card alarm.rearm, components/anomaly/alarm.py Rearm): None = the fixed
    # hold-off alone (the default); else (quiet tail probability, quiet windows, exception ratio or None).
    rearm: tuple[float, int, float | None] | None = None

    def summary(self) -> dict[str, Any]:
        base: dict[str, Any] = {"kind": self.kind, "calibration_fraction": self.calibration_fraction}
        if self.kind == "isolation_forest":
            base |= {"n_estimators": self.n_estimators, "max_samples": self.max_samples}
        elif self.kind == "pca":
            base |= {"pca_variance": self.pca_variance, "t2_weight": self.t2_weight}
        elif self.kind == "knn":
            base |= {"max_prototypes": self.max_prototypes, "online": self.online}
        else:
            base |= {"hidden": list(self.hidden or ()), "max_iter": self.max_iter}
        return base


@dataclass(slots=True)
class TrainedModel:
    kind: ModelKind
    proto: onnx.ModelProto
    onnx_io: OnnxIO
    threshold: Threshold
    score_scale: ScoreScale
    feature_stats: FeatureStats
    metrics: dict[str, float]
    fit_windows: int
    calibration_windows: int
    alarm: AlarmSpec
    online: OnlineSpec | None
    reference: Scorer  # scikit-learn's score, for the export check and the benchmark
    estimator: Any
    params: TrainParams
    calibration_scores: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    shift: ShiftSpec | None = None


def _scale(x: npt.NDArray[np.float64], unscaled: tuple[int, ...] = ()) -> tuple[npt.NDArray[np.float64],
                                                                                npt.NDArray[np.float64]]:
    """Mean and 1/scale rounded to float32 up front: the ONNX graph subtracts in float32, and a float64
    mean of a large, nearly constant feature (temperature ~40 with spread 1e-4) would otherwise leave
    a float32 rounding offset that is large in standardized units. x - float32(mean) is exact there."""
    mean = x.mean(axis=0).astype(np.float32).astype(np.float64)
    std = x.std(axis=0)
    inv = (1.0 / np.where(std > 1e-9, std, 1.0)).astype(np.float32).astype(np.float64)
    idx = list(unscaled)
    mean[idx], inv[idx] = 0.0, 1.0
    return mean, 1.0 / inv


def _fit(features: npt.NDArray[np.float32], p: TrainParams, mean: npt.NDArray[np.float64],
         scale: npt.NDArray[np.float64]) -> tuple[Any, Scorer, onnx.ModelProto]:
    n, f = features.shape
    x64 = features.astype(np.float64)
    if p.kind == "isolation_forest":
        iso = IsolationForest(n_estimators=p.n_estimators, max_samples=min(p.max_samples, n), random_state=p.seed)
        iso.fit(features)

        def iso_score(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return np.asarray(-iso.score_samples(x), dtype=np.float64)

        return iso, iso_score, onnx_export.isolation_forest(iso, f)
    z = (x64 - mean) / scale
    if p.kind == "knn":
        protos = z if n <= p.max_prototypes else z[np.linspace(0, n - 1, p.max_prototypes).round().astype(np.intp)]
        nn = NearestNeighbors(n_neighbors=1).fit(protos)

        def knn_score(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            dist, _ = nn.kneighbors((x.astype(np.float64) - mean) / scale)
            return np.asarray(dist[:, 0], dtype=np.float64)

        return nn, knn_score, onnx_export.knn(mean, scale, protos, f)
    if p.kind == "pca":
        pca = PCA(n_components=p.pca_variance if p.pca_variance < 1 else min(int(p.pca_variance), f),
                  svd_solver="full", random_state=p.seed).fit(z)
        k = pca.n_components_

        def pca_score(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            zz = (x.astype(np.float64) - mean) / scale
            t = pca.transform(zz)
            q = ((zz - pca.inverse_transform(t)) ** 2).mean(axis=1)
            return np.asarray(q + p.t2_weight * ((t ** 2) / pca.explained_variance_).sum(axis=1) / k, dtype=np.float64)

        return pca, pca_score, onnx_export.pca(mean, scale, pca, p.t2_weight, f)
    hidden = p.hidden or (max(4, f // 2), max(2, f // 4), max(4, f // 2))
    p.hidden = tuple(hidden)
    mlp = MLPRegressor(hidden_layer_sizes=hidden, activation="tanh", max_iter=p.max_iter, random_state=p.seed,
                       early_stopping=True, validation_fraction=0.1, n_iter_no_change=20, tol=1e-5)
    # Not converging is reported in the card's metrics and by the CLI (train() below), where the user
    # sees it next to the flag that fixes it, instead of as scikit-learn's warning from inside fit().
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(z, z)

    def ae_score(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        zz = (x.astype(np.float64) - mean) / scale
        return np.asarray(((zz - mlp.predict(zz)) ** 2).mean(axis=1), dtype=np.float64)

    return mlp, ae_score, onnx_export.autoencoder(mean, scale, mlp, f)


def _training_metrics(estimator: Any, p: TrainParams) -> dict[str, float]:
    """For an iterative fit, how many iterations it took and whether it stopped on its own (early
    stopping) rather than at ``max_iter``: a model cut off mid-descent still works, but its threshold
    was calibrated on a model that was still changing, and more iterations would usually score better."""
    if p.kind != "autoencoder":
        return {}
    return {"training_iterations": float(estimator.n_iter_),
            "training_converged": float(estimator.n_iter_ < p.max_iter)}


def session(proto: onnx.ModelProto | bytes, *, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnx_scores(sess: ort.InferenceSession, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    out = sess.run([onnx_export.SCORE], {onnx_export.INPUT: np.ascontiguousarray(features, dtype=np.float32)})
    return np.asarray(out[0], dtype=np.float64)


def train(features: npt.NDArray[np.float32], params: TrainParams, *, rate_hz: float | None = None,
          hop: int | None = None) -> TrainedModel:
    """Fit on the first part of ``features`` (time-ordered windows x features), calibrate on the rest."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] < MIN_WINDOWS:
        raise TrainingError(f"need at least {MIN_WINDOWS} training windows, have {features.shape[0]}")
    if not np.isfinite(features).all():
        raise TrainingError("training features contain NaN or inf")
    if params.online and params.kind != "knn":
        raise TrainingError("online learning needs --kind knn", field="kind")
    if params.shift is not None and params.alarm_mode != "likelihood":
        raise TrainingError("a shift stage is judged like the likelihood alarm: it needs --alarm likelihood",
                            field="shift")
    if params.rearm is not None and params.alarm_mode != "likelihood":
        raise TrainingError("re-arm after quiet judges quiet by tail probability: it needs --alarm likelihood",
                            field="rearm")
    n = features.shape[0]
    n_cal = max(1, round(n * params.calibration_fraction))
    if n - n_cal < MIN_FIT_WINDOWS:
        raise TrainingError(f"--calibration-fraction {params.calibration_fraction:g} leaves {max(0, n - n_cal)} of "
                            f"{n} windows to fit the model; at least {MIN_FIT_WINDOWS} are needed")
    fit, cal = features[: n - n_cal], features[n - n_cal:]
    if not (fit.max(axis=0) > fit.min(axis=0)).any():
        # Nothing varies: PCA divided by zero variance (NaN scores, reported as an ONNX mismatch), knn put
        # its threshold at 0 (every window an alarm, the training windows too), the others fitted noise.
        raise TrainingError(f"every one of the {fit.shape[1]} features is constant over the {len(fit)} fit windows: "
                            "there is nothing to learn (constant or dead channels?)", field="features")
    # One standardization for the graph, the card (feature_stats) and the detector's knn memory.
    mean, scale = _scale(fit.astype(np.float64), params.unscaled)
    started = time.perf_counter()
    estimator, reference, proto = _fit(fit, params, mean, scale)
    fit_seconds = time.perf_counter() - started
    sess = session(proto)
    check = np.concatenate([cal, fit[:: max(1, len(fit) // 500)]])
    ours, theirs = onnx_scores(sess, check), reference(check)
    cal_scores = ours[: len(cal)]
    quantile = params.quantile
    method: Any = "quantile"
    if params.false_alarms_per_hour is not None:
        if rate_hz is None or hop is None:
            raise TrainingError("a false-alarm budget per hour needs the sample rate (--rate-hz)", field="rate_hz")
        windows_per_hour = 3600.0 * rate_hz / hop
        quantile = min(1 - 1e-9, max(0.5, 1.0 - params.false_alarms_per_hour / windows_per_hour))
        method = "false_alarm_budget"
    median = float(np.median(cal_scores))
    threshold = float(np.quantile(cal_scores, quantile, method="higher"))
    if params.spread_margin is not None:
        threshold = median + params.spread_margin * (threshold - median)
    threshold *= params.margin
    spread = max(threshold - median, 1e-12)
    diff = np.abs(ours - theirs)
    if not np.all(diff <= params.tolerance * (np.abs(theirs) + spread)):
        worst = int(diff.argmax())
        raise TrainingError(f"ONNX scores differ from scikit-learn's: {ours[worst]!r} vs {theirs[worst]!r} "
                            f"(tolerance {params.tolerance} relative)")
    agree = float(np.mean((ours >= threshold) == (theirs >= threshold)))
    outputs = [o.name for o in proto.graph.output]
    # The likelihood's prior: a normal fitted to the held-out scores averaged as the detector will average them.
    averaged = moving_average(cal_scores, params.averaging_windows)
    alarm = AlarmSpec(mode=params.alarm_mode, holdoff_windows=params.holdoff_windows,
                      tail_probability=params.tail_probability, averaging_windows=params.averaging_windows,
                      history_windows=params.history_windows, estimation_windows=params.estimation_windows,
                      reestimation_windows=params.reestimation_windows, prior_mean=float(averaged.mean()),
                      prior_std=max(float(averaged.std()), 1e-9),
                      rearm=None if params.rearm is None else RearmSpec(
                          quiet_tail_probability=params.rearm[0], quiet_windows=params.rearm[1],
                          exception_ratio=params.rearm[2]))
    online = None
    if params.online:
        online = OnlineSpec(capacity=params.online_capacity, exclude_windows=params.online_exclude_windows,
                            merge_radius=params.online_merge_fraction * median)
    return TrainedModel(
        kind=params.kind, proto=proto,
        onnx_io=OnnxIO(n_features=features.shape[1], opset=onnx_export.OPSET, nodes=len(proto.graph.node),
                       contributions_output=onnx_export.CONTRIB if onnx_export.CONTRIB in outputs else None),
        threshold=Threshold(value=threshold, method=method, quantile=quantile, margin=params.margin,
                            spread_margin=params.spread_margin, calibration_windows=len(cal),
                            false_alarms_per_hour=params.false_alarms_per_hour),
        score_scale=ScoreScale(median=median, p99=float(np.quantile(cal_scores, 0.99)), max=float(cal_scores.max())),
        feature_stats=FeatureStats(mean=[float(v) for v in mean], std=[float(v) for v in scale]),
        metrics={"onnx_max_abs_diff": float(diff.max()), "onnx_label_agreement": agree,
                 "calibration_alarm_fraction": float(np.mean(cal_scores >= threshold)),
                 "fit_seconds": fit_seconds, "onnx_nodes": float(len(proto.graph.node)),
                 "onnx_bytes": float(proto.ByteSize())} | _training_metrics(estimator, params),
        alarm=alarm, online=online, fit_windows=len(fit), calibration_windows=len(cal), reference=reference,
        estimator=estimator, params=params, calibration_scores=cal_scores,
        shift=None if params.shift is None else ShiftSpec(recent=params.shift[0], history=params.shift[1],
                                                          tail_probability=params.shift_tail),
    )
