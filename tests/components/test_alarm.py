"""The alarm policy (components/anomaly/alarm.py) as the detector applies it: the plain threshold is
unchanged, the likelihood follows the recent score distribution, and an event raises one alarm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from components.anomaly.alarm import AlarmParams, AlarmState, moving_average, tail_probability
from components.anomaly.errors import FeatureSpecError
from components.anomaly.features import ChannelGroup, FeatureExtractor, surprise_spec
from components.anomaly.model_card import AlarmSpec
from components.model_builder.training import TrainParams, train


def run(state: AlarmState, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = [state.update(float(s)) for s in scores]
    return np.array([x.is_anomaly for x in d]), np.array([x.alarm for x in d])


def test_threshold_mode_without_holdoff_is_the_plain_threshold() -> None:
    scores = np.random.default_rng(0).uniform(0, 2, 500)
    anomalous, alarms = run(AlarmState(AlarmParams(threshold=1.5)), scores)
    assert (anomalous == (scores >= 1.5)).all() and (alarms == anomalous).all()


def test_holdoff_suppresses_alarms_for_that_many_windows() -> None:
    scores = np.zeros(40)
    scores[[5, 6, 10, 16, 17, 30]] = 2.0
    anomalous, alarms = run(AlarmState(AlarmParams(threshold=1.0, holdoff_windows=11)), scores)
    assert anomalous.sum() == 6
    assert list(np.flatnonzero(alarms)) == [5, 17, 30]  # 6, 10 and 16 are within the 11 windows after 5


def test_tail_probability_is_the_one_sided_normal_tail() -> None:
    assert tail_probability(0.0, 0.0, 1.0) == 1.0 and tail_probability(-3.0, 0.0, 1.0) == 1.0
    assert tail_probability(1.0, 0.0, 1.0) == pytest.approx(0.158655, rel=1e-5)
    assert tail_probability(14.0, 10.0, 2.0) == pytest.approx(0.5 * math.erfc(2 / math.sqrt(2)))


def test_moving_average_matches_the_online_average() -> None:
    x = np.arange(1.0, 8.0)
    assert moving_average(x, 3).tolist() == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0])


def params(**kw: float) -> AlarmParams:
    base: dict[str, object] = {"mode": "likelihood", "prior_mean": 1.0, "prior_std": 0.1, "holdoff_windows": 0}
    return AlarmParams(**(base | kw))  # type: ignore[arg-type]


def test_likelihood_raises_one_alarm_when_the_scores_jump() -> None:
    rng = np.random.default_rng(1)
    quiet = 1.0 + 0.3 * rng.standard_normal(600)  # wider than the prior: the refit must absorb it
    scores = np.concatenate([quiet, np.full(30, 6.0), 1.0 + 0.3 * rng.standard_normal(300)])
    anomalous, alarms = run(AlarmState(params()), scores)
    assert not alarms[200:600].any()  # the online estimate replaced the too-narrow prior
    assert alarms[600:630].sum() == 1 and anomalous[600:630].sum() > 1  # one event, one alarm
    assert alarms[605:].sum() <= 1


def test_likelihood_uses_the_prior_until_it_has_its_own_estimate() -> None:
    state = AlarmState(params(estimation_windows=100))
    for _ in range(50):
        state.update(1.0)
    assert state.estimate == (1.0, 0.1)
    d = state.update(11.0)  # averaged over 10 windows: 2.0, ten prior standard deviations above the mean
    assert d.tail is not None and d.tail < 1e-5 and d.alarm
    for _ in range(60):
        state.update(1.0)
    # Re-fitted at 100 windows on its own averaged scores: 90 at 1.0 and 10 at 2.0 (the spike's average).
    mean, std = state.estimate
    assert mean == pytest.approx(1.1) and std == pytest.approx(0.3)


def test_zseason_is_the_standardised_newest_seasonal_difference() -> None:
    season, n = 5, 30
    x = np.sin(2 * np.pi * np.arange(n) / season) * 10 + np.arange(n) * 0.01
    x[-1] += 3.0
    fx = FeatureExtractor(surprise_spec("v", season=season), ["v"], n)
    f = dict(zip(fx.names, fx.extract(x[None].astype(np.float32)), strict=True))
    d = x[season:] - x[:-season]
    assert f["v.zseason"] == pytest.approx((d[-1] - d.mean()) / d.std(), rel=1e-4)
    assert f["v.zlast"] == pytest.approx((x[-1] - x.mean()) / x.std(), rel=1e-4)
    with pytest.raises(ValueError, match="zseason"):
        ChannelGroup(channels=["v"], stats=["zseason"])
    with pytest.raises(FeatureSpecError) as err:
        FeatureExtractor(surprise_spec("v", season=season), ["v"], season + 2)
    assert err.value.field == "groups[0].season"


def test_builder_writes_the_likelihood_prior_from_held_out_scores() -> None:
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((400, 3)).astype(np.float32)
    plain = train(feats, TrainParams(kind="pca"))
    assert plain.alarm == AlarmSpec(mode="threshold", prior_mean=plain.alarm.prior_mean,
                                    prior_std=plain.alarm.prior_std)  # default: plain threshold, no hold-off
    m = train(feats, TrainParams(kind="pca", alarm_mode="likelihood", holdoff_windows=7, tail_probability=1e-4))
    averaged = moving_average(m.calibration_scores, 10)
    assert m.alarm.mode == "likelihood" and m.alarm.holdoff_windows == 7 and m.alarm.tail_probability == 1e-4
    assert m.alarm.prior_mean == pytest.approx(averaged.mean()) and m.alarm.prior_std == pytest.approx(averaged.std())


def test_cli_writes_the_alarm_policy_and_the_detector_applies_it_with_overrides(tmp_path: Path) -> None:
    from components.anomaly import signing
    from components.anomaly.model_card import load_card
    from components.anomaly_detector.scoring import load_model
    from components.model_builder.cli import main

    rng = np.random.default_rng(4)
    v = 10 + np.sin(2 * np.pi * np.arange(3000) / 24) + 0.1 * rng.standard_normal(3000)
    data = tmp_path / "series.csv"
    data.write_text("value\n" + "\n".join(f"{x:.5f}" for x in v) + "\n")
    out = tmp_path / "out"
    assert main(["build", "--data", str(data), "--out", str(out), "--window", "64", "--hop", "1", "--rate-hz", "1",
                 "--kind", "pca", "--features", "surprise", "--season-samples", "24", "--alarm", "likelihood",
                 "--holdoff-windows", "64", "--json"]) == 0
    model_dir = out / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0"
    card = load_card(model_dir / "model_card.json")
    assert card.feature_names == ["value.zlast", "value.zseason"] and card.features.groups[0].season == 24
    assert card.alarm.mode == "likelihood" and card.alarm.holdoff_windows == 64 and card.alarm.prior_std > 0
    pub = (out / "keys" / "model-signing.key.pub").read_text().strip()
    m = load_model(model_dir, component="com.nucleus.TurbineModel", version="1.0.0",
                   trusted=signing.trusted_key_map([pub]))
    p = m.alarm_params()
    assert (p.mode, p.holdoff_windows, p.tail_probability, p.prior_mean) == ("likelihood", 64, 1e-5,
                                                                             card.alarm.prior_mean)
    o = m.alarm_params(mode="threshold", holdoff_windows=0, tail_probability=1e-3)
    assert (o.mode, o.holdoff_windows, o.tail_probability, o.threshold) == ("threshold", 0, 1e-3, m.threshold)
    # The detector's path on the training series itself: windows -> score -> alarm state, few alarms.
    windows = np.lib.stride_tricks.sliding_window_view(v.astype(np.float32), 64)[:, None, :]
    scores = m.score(windows).scores
    _, alarms = run(AlarmState(p), scores)
    assert alarms.sum() <= 3
    spiked = v.copy()
    spiked[2000] += 5.0
    _, alarms = run(AlarmState(p), m.score(np.lib.stride_tricks.sliding_window_view(
        spiked.astype(np.float32), 64)[:, None, :]).scores)
    assert alarms[2000 - 63: 2000 - 63 + 10].any()  # the window ending at the spike, or within the averaging
