"""The level/spread-change stage (card section ``shift``): a lasting change of level that a learning knn
model misses among normal spikes alarms with the stage, the stage judges nothing before it has its own
estimate, and the builder writes it only when asked (off by default), only with the likelihood alarm."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from components.anomaly.alarm import AlarmParams, Decision
from components.anomaly.errors import ModelCardError, TrainingError
from components.anomaly.features import FeatureExtractor, shape_spec
from components.anomaly.model_card import load_card, parse_card
from components.anomaly.shift import ShiftStage, shift_statistic
from components.anomaly_detector.asset import AssetState
from components.anomaly_detector.scoring import LoadedModel
from components.anomaly_detector.windowing import Windower
from components.model_builder.cli import main
from components.model_builder.package import make_card
from components.model_builder.training import TrainParams, session, train

W = 8


def busy_series(seed: int = 1, step: float = 1.0) -> np.ndarray:
    """Noise with 1 % spikes (normal) and, at rows 1500-1599, the level raised by ``step`` spreads."""
    rng = np.random.default_rng(seed)
    x = 10 + rng.standard_normal(2000)
    spikes = rng.random(2000) < 0.01
    x[spikes] += rng.uniform(3, 6, spikes.sum())
    x[1500:1600] += step
    return x


def learning_knn(train_rows: np.ndarray, shift: tuple[int, int] | None) -> LoadedModel:
    """The builder's knn with run-time learning and the likelihood alarm, as the NAB setup uses it."""
    spec = shape_spec("value", samples=W)
    feats = FeatureExtractor(spec, ["value"], W).extract(sliding_window_view(train_rows, W)[:, None, :])
    m = train(feats, TrainParams(kind="knn", alarm_mode="likelihood", averaging_windows=1, holdoff_windows=W,
                                 online=True, online_exclude_windows=W - 1, online_merge_fraction=0.5, shift=shift))
    card = make_card(m, component="test.Shift", version="1.0.0", channels=["value"], spec=spec, window=W, hop=1,
                     rate_hz=1.0, sources=["synthetic"], rows=len(train_rows))
    assert parse_card(card.to_json()) == card  # the section round-trips through the card
    return LoadedModel(card, session(m.proto), "test", Path("test"))


def alarms(model: LoadedModel, values: np.ndarray) -> np.ndarray:
    """Row by row through the Windower, features + ONNX and the asset's judgement state."""
    state = AssetState.start(model)
    w = Windower(["value"], W, 1, 1.0)
    out = np.zeros(len(values), bool)
    for i, v in enumerate(values.astype(np.float32)):
        for win in w.push({"seq": i, "t0": float(i), "rate_hz": 1.0, "channels": ["value"],
                           "data": np.array([[v]], np.float32)}):
            scored = model.score(win.data[None])
            out[i] = state.judge(float(scored.scores[0]), scored.features[0], win.data).decision.alarm
    return out


def test_a_level_change_among_normal_spikes_alarms_only_with_the_shift_stage() -> None:
    x = busy_series()
    plain, shifted = learning_knn(x[:500], None), learning_knn(x[:500], (16, 400))
    assert plain.card.shift is None and shifted.card.shift is not None
    a_plain, a_shift = alarms(plain, x), alarms(shifted, x)
    # each window of the raised level resembles a spike window the memory holds: the knn alone is silent
    assert not a_plain[1500:1600].any()
    assert a_shift[1500:1540].any()  # the stage sees the last 16 samples leave the 400 before them
    assert not a_shift[900:1500].any()  # and is quiet on the spiky normal once it has its own estimate
    # the stage only adds alarms: wherever the knn alarmed, the combined state did too (one hold-off)
    assert (a_shift | ~a_plain).all()


def test_the_stage_says_nothing_until_its_statistic_and_its_estimate_exist() -> None:
    recent = np.array([1.0, 3.0] * 8)  # mean 2, spread 1
    history = np.array([0.0, 2.0] * 200)  # mean 1, spread 1: one spread apart, 16 samples -> 4 standard errors
    assert shift_statistic(recent, history) == pytest.approx(4.0)
    assert shift_statistic(2 * (recent - 2) + 1, history) == pytest.approx(math.log(2) * math.sqrt(32))  # spread x 2
    params = AlarmParams(mode="likelihood", averaging_windows=1, tail_probability=1e-7, holdoff_windows=0)
    stage = ShiftStage(16, 400, params)
    rng = np.random.default_rng(0)
    assert stage.push(rng.standard_normal(8)) is None and stage.started
    decisions = [stage.push(rng.standard_normal(1)) for _ in range(600)]
    defined = [d for d in decisions if d is not None]
    assert len(defined) == 600 - (416 - 8 - 1)  # defined once 416 samples are in
    # a jump of 50 spreads while the stage is still on its placeholder prior is not an alarm...
    early = ShiftStage(16, 400, params)
    early.push(rng.standard_normal(416))
    assert not any(d is not None and d.alarm for d in (early.push(np.full(1, 50.0)) for _ in range(20)))
    # ...but once it has fitted its own normal (estimation_windows values), the same jump is
    late = ShiftStage(16, 400, params)
    late.push(rng.standard_normal(416))
    for _ in range(params.estimation_windows):
        late.push(rng.standard_normal(1))
    assert any(d is not None and d.alarm for d in (late.push(np.full(1, 50.0)) for _ in range(20)))


def test_cli_writes_the_stage_only_when_asked_and_only_with_the_likelihood_alarm(tmp_path: Path) -> None:
    data = tmp_path / "busy.csv"
    data.write_text("value\n" + "\n".join(f"{v:.5f}" for v in busy_series()[:800]) + "\n")
    base = ["build", "--data", str(data), "--kind", "knn", "--features", "shape", "--window", "8", "--hop", "1",
            "--rate-hz", "1", "--online", "--alarm", "likelihood"]
    assert main([*base, "--out", str(tmp_path / "off")]) == 0
    card_path = Path("artifacts") / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json"
    assert load_card(tmp_path / "off" / card_path).shift is None  # off by default
    assert main([*base, "--out", str(tmp_path / "on"), "--shift", "16,400", "--shift-tail", "1e-6"]) == 0
    card = load_card(tmp_path / "on" / card_path)
    assert card.shift is not None and (card.shift.recent, card.shift.history) == (16, 400)
    assert card.shift.tail_probability == 1e-6 and card.shift.channel is None
    with pytest.raises(TrainingError, match="needs --alarm likelihood"):
        train(np.zeros((200, 8), np.float32) + np.arange(200)[:, None], TrainParams(kind="knn", shift=(16, 400)))
    assert main([*base[:-2], "--out", str(tmp_path / "thr"), "--shift", "16,400"]) != 0
    assert main([*base, "--out", str(tmp_path / "bad"), "--shift-tail", "1e-6"]) != 0  # without --shift
    doc = card.to_json().replace('"mode": "likelihood"', '"mode": "threshold"')
    with pytest.raises(ModelCardError, match="shift stage needs alarm mode likelihood"):
        parse_card(doc)
    with pytest.raises(ModelCardError, match=r"shift\.channel"):
        parse_card(card.to_json().replace('"channel": null', '"channel": "other"'))


def test_a_model_with_the_stage_needs_the_windows_samples() -> None:
    model = learning_knn(busy_series()[:500], (16, 400))
    state = AssetState.start(model)
    window = busy_series()[:W].astype(np.float32)[None]
    scored = model.score(window[None])
    with pytest.raises(ValueError, match="shift stage"):
        state.judge(float(scored.scores[0]), scored.features[0])
    assert AssetState.start(model, mode="threshold").shift is None  # a threshold override drops it too


def test_the_stage_never_compares_across_a_gap_in_the_stream() -> None:
    """A window after missing samples does not follow its predecessor (``Window.follows``), and the stage
    starts its samples over instead of comparing the new side of the hole with the old one: a sensor that
    comes back from an outage at another operating point is the model's to judge, not a 'shift' measured
    across time nobody saw."""
    rng = np.random.default_rng(3)
    before, after = 10 + rng.standard_normal(1000), 16 + rng.standard_normal(300)
    model = learning_knn(before[:500], (16, 400))

    def stage_after_the_change(gap: int) -> list[Decision | None]:
        """The shift stage's own decisions on the windows after the change of level."""
        state, w = AssetState.start(model), Windower(["value"], W, 1, 1.0)
        stage = state.shift
        assert stage is not None
        seen: list[Decision | None] = []
        push = stage.push
        stage.push = lambda samples: seen.append(push(samples)) or seen[-1]  # type: ignore[method-assign]
        first_after = None
        for i, v in enumerate(np.concatenate([before, after]).astype(np.float32)):
            seq = i if i < len(before) else i + gap  # gap > 0: that many batches never arrived
            for win in w.push({"seq": seq, "t0": float(seq), "rate_hz": 1.0, "channels": ["value"],
                               "data": np.array([[v]], np.float32)}):
                if i >= len(before) and first_after is None:
                    first_after = len(seen)
                    assert win.follows is (gap == 0)
                scored = model.score(win.data[None])
                state.judge(float(scored.scores[0]), scored.features[0], win.data, win.follows)
        assert first_after is not None
        return seen[first_after:]

    contiguous = stage_after_the_change(gap=0)
    assert any(d is not None and d.alarm for d in contiguous[:40])  # the level change is a shift: it alarms
    across = stage_after_the_change(gap=50)
    assert len(across) == len(after) - W + 1  # the stage was asked about every window after the hole
    assert all(d is None for d in across[:416 - W])  # no statistic until 416 new samples are in
    assert not any(d is not None and d.alarm for d in across)  # and then the new level is the history


def test_windows_say_whether_they_follow_the_previous_one() -> None:
    w = Windower(["value"], 4, 2, 1.0)

    def push(seq: int, values: list[float]) -> list[bool]:
        batch = {"seq": seq, "t0": float(seq), "rate_hz": 1.0, "channels": ["value"],
                 "data": np.array([values], np.float32)}
        return [win.follows for win in w.push(batch)]

    assert push(0, [1, 2, 3, 4, 5, 6]) == [False, True]  # the first window follows nothing
    assert push(1, [7, 8]) == [True]
    assert push(2, [float("nan"), 9]) == []  # (7, 8, nan, 9) is skipped
    assert push(3, [10, 11]) == []  # (nan, 9, 10, 11) too
    assert push(4, [12, 13]) == [False]  # two windows were skipped before this one
    assert push(6, [14, 15, 16, 17]) == [False]  # seq 5 never arrived: a new start
    assert push(7, [18, 19]) == [True]
