"""A verified model, ready to score: signature and digests checked, card parsed, ONNX session built and
warmed up, its input shape proved equal to the feature spec's. Building one is the only way to get
one, so an unverified or mismatched model cannot be scored with.

Loading is blocking (hashing, session creation) and runs in a worker thread; scoring is ~10-100 us
per batch and runs inline on the event loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from components.anomaly import signing
from components.anomaly.alarm import AlarmMode, AlarmParams
from components.anomaly.errors import AnomalyError, ModelCardError, ModelLoadError
from components.anomaly.features import FeatureExtractor, channel_of
from components.anomaly.model_card import CARD_FILE, MODEL_FILE, ModelCard, parse_card

WARMUP_RUNS = 3


@dataclass(slots=True)
class Scored:
    scores: npt.NDArray[np.float64]  # (B,)
    features: npt.NDArray[np.float32]  # (B, F)
    shares: npt.NDArray[np.float64]  # (B, F), rows sum to 1 (or 0)


class LoadedModel:
    def __init__(self, card: ModelCard, session: ort.InferenceSession, key_id: str, path: Path) -> None:
        self.card = card
        self.session = session
        self.key_id = key_id
        self.path = path
        self.component = card.component
        self.version = card.version
        self.extractor = FeatureExtractor(card.features, card.channels, card.window)
        self.threshold = card.threshold.value
        self._outputs = [card.onnx.score_output]
        if card.onnx.contributions_output:
            self._outputs.append(card.onnx.contributions_output)
        self._input = card.onnx.input_name
        self._mean = np.asarray(card.feature_stats.mean, dtype=np.float64)
        std = np.asarray(card.feature_stats.std, dtype=np.float64)
        self._inv_std = 1.0 / np.where(std > 1e-9, std, 1.0)
        channels = [channel_of(n) for n in card.feature_names]
        self.channel_names = list(dict.fromkeys(channels))
        self._channel_index = np.array([self.channel_names.index(c) for c in channels], dtype=np.intp)

    def alarm_params(self, *, mode: AlarmMode | None = None, holdoff_windows: int | None = None,
                     tail_probability: float | None = None) -> AlarmParams:
        """The card's alarm policy with the detector configuration's overrides (None = the card's)."""
        a = self.card.alarm
        return AlarmParams(mode=mode or a.mode, threshold=self.threshold,
                           holdoff_windows=a.holdoff_windows if holdoff_windows is None else holdoff_windows,
                           tail_probability=tail_probability or a.tail_probability,
                           averaging_windows=a.averaging_windows, history_windows=a.history_windows,
                           estimation_windows=a.estimation_windows, reestimation_windows=a.reestimation_windows,
                           prior_mean=a.prior_mean, prior_std=a.prior_std,
                           rearm_quiet_tail=a.rearm.quiet_tail_probability if a.rearm is not None else None,
                           rearm_quiet_windows=a.rearm.quiet_windows if a.rearm is not None else 0,
                           rearm_ratio=(a.rearm.exception_ratio or math.inf) if a.rearm is not None else math.inf)

    def standardize(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Features in the training set's standardized units (what ``knn`` distances are measured in)."""
        return ((features - self._mean) * self._inv_std).astype(np.float32)

    def describe(self) -> dict[str, str]:
        return {"component": self.component, "version": self.version, "kind": self.card.kind}

    def score(self, windows: npt.NDArray[np.float32], t_end: npt.NDArray[np.float64] | None = None) -> Scored:
        """Score a batch ``(B, C, N)``; ``t_end`` (B,) = each window's end time (calendar features)."""
        features = self.extractor.extract(windows, t_end)
        out = self.session.run(self._outputs, {self._input: features})
        scores = np.asarray(out[0], dtype=np.float64).reshape(-1)
        if len(out) > 1:
            contrib = np.asarray(out[1], dtype=np.float64)
        else:  # a model without its own attribution: squared distance from the training mean per feature
            contrib = ((features - self._mean) * self._inv_std) ** 2
        total = contrib.sum(axis=1, keepdims=True)
        shares = np.divide(contrib, total, out=np.zeros_like(contrib), where=total > 0)
        return Scored(scores, features, shares)

    def top(self, shares: npt.NDArray[np.float64], k: int) -> dict[str, dict[str, float]]:
        """The k features and channels with the largest share of one window's score."""
        names = self.card.feature_names
        idx = np.argsort(shares)[::-1][:k]
        per_channel = np.bincount(self._channel_index, weights=shares, minlength=len(self.channel_names))
        cidx = np.argsort(per_channel)[::-1][:k]
        return {"channels": {self.channel_names[i]: round(float(per_channel[i]), 4) for i in cidx},
                "features": {names[i]: round(float(shares[i]), 4) for i in idx}}


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False  # small models: the arena's pre-allocation costs more RSS than it saves
    options.log_severity_level = 3
    return options


def load_model(directory: Path, *, component: str, version: str, trusted: Mapping[str, Ed25519PublicKey],
               threads: int = 1) -> LoadedModel:
    """Verify, parse, build, check and warm up; raise an AnomalyError naming what failed."""
    where = {"component": component, "version": version}
    verified = signing.verify_model(directory, component=component, version=version, trusted=trusted)
    kid = {"key_id": verified.key_id}
    try:
        card = parse_card(verified.files[CARD_FILE], path=directory / CARD_FILE, component=component)
    except AnomalyError as exc:  # the card was signed: say by which key, and which version it is
        exc.version, exc.key_id = version, verified.key_id
        raise
    if card.component != component or card.version != version:
        raise ModelCardError(f"card describes {card.component} {card.version}", path=directory / CARD_FILE,
                             field="component", **where, **kid)
    try:
        session = ort.InferenceSession(verified.files[MODEL_FILE], session_options(threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions for any bad graph
        raise ModelLoadError(f"model.onnx does not load: {str(exc).splitlines()[0][:300]}",
                             path=directory / MODEL_FILE, **where, **kid) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != card.onnx.input_name:
        raise ModelLoadError(f"model inputs {[i.name for i in inputs]} are not [{card.onnx.input_name!r}]",
                             path=directory / MODEL_FILE, field="onnx.input_name", **where, **kid)
    shape = inputs[0].shape
    n_features = len(card.feature_names)
    if len(shape) != 2 or shape[1] != n_features:
        raise ModelLoadError(f"model input shape {shape} does not match the feature spec's {n_features} features",
                             path=directory / MODEL_FILE, field="onnx.n_features", **where, **kid)
    outputs = {o.name for o in session.get_outputs()}
    wanted = {card.onnx.score_output} | ({card.onnx.contributions_output} - {None})
    if not wanted <= outputs:
        raise ModelLoadError(f"model outputs {sorted(outputs)} lack {sorted(str(w) for w in wanted - outputs)}",
                             path=directory / MODEL_FILE, field="onnx", **where, **kid)
    try:
        model = LoadedModel(card, session, verified.key_id, directory)
    except AnomalyError as exc:
        exc.component, exc.version, exc.key_id = component, version, verified.key_id
        raise
    warm(model)
    return model


def warm(model: LoadedModel) -> None:
    """Run the whole path a few times (first runs allocate) and prove it yields one finite score per window."""
    rng = np.random.default_rng(0)
    for batch in (1, 4, 1):
        windows = rng.standard_normal((batch, len(model.card.channels), model.card.window)).astype(np.float32)
        for _ in range(WARMUP_RUNS):
            try:
                scored = model.score(windows, np.zeros(batch))
            except Exception as exc:  # onnxruntime errors are untyped
                raise ModelLoadError(f"warm-up scoring failed: {str(exc).splitlines()[0][:300]}",
                                     component=model.component, version=model.version, key_id=model.key_id,
                                     path=model.path / MODEL_FILE) from exc
            if scored.scores.shape != (batch,) or not np.isfinite(scored.scores).all():
                raise ModelLoadError(f"warm-up gave scores of shape {scored.scores.shape}, expected ({batch},) finite",
                                     component=model.component, version=model.version, key_id=model.key_id,
                                     path=model.path / MODEL_FILE)
            # one contribution per feature: another width made every scored window raise in top() (outside
            # the scoring guard) and stopped the detector at its first window
            width = (batch, len(model.card.feature_names))
            if scored.shares.shape != width:
                raise ModelLoadError(f"warm-up gave {model.card.onnx.contributions_output} of shape "
                                     f"{scored.shares.shape}, expected {width}: one per feature of the spec",
                                     component=model.component, version=model.version, key_id=model.key_id,
                                     path=model.path / MODEL_FILE, field="onnx.contributions_output")
