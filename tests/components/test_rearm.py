"""Re-arm after quiet (card section ``alarm.rearm``, components/anomaly/alarm.py Rearm): an alarm disarms
the detector until the stream has been quiet for a while, except for something clearly worse; it is
off by default, needs the likelihood alarm, and a threshold override turns it off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from test_shift import W, alarms, busy_series

from components.anomaly.alarm import AlarmParams, Decision, Rearm
from components.anomaly.errors import ModelCardError, TrainingError
from components.anomaly.features import FeatureExtractor, shape_spec
from components.anomaly.model_card import load_card, parse_card
from components.anomaly_detector.asset import AssetState
from components.anomaly_detector.scoring import LoadedModel
from components.model_builder.cli import main
from components.model_builder.package import make_card
from components.model_builder.training import TrainParams, session, train

RED, QUIET, NOISY = 1e-9, 0.5, 1e-4  # tails: in the red zone, quiet, not red but not quiet (below 1e-3)


def params(**kw: object) -> AlarmParams:
    base: dict[str, object] = {"mode": "likelihood", "holdoff_windows": 2, "rearm_quiet_tail": 1e-3,
                               "rearm_quiet_windows": 5, "rearm_ratio": 2.0}
    return AlarmParams(**(base | kw))  # type: ignore[arg-type]


def test_the_gate_disarms_until_quiet_and_lets_through_only_what_is_clearly_worse() -> None:
    gate = Rearm(params())
    # (score, is_anomaly, entered the red zone, tail, another stage's alarm) -> fired?
    steps = [
        ((10.0, True, True, RED, False), True),     # armed: the entry alarms and disarms
        ((12.0, True, True, RED, False), False),    # disarmed: a new entry, not 2 x 10
        ((15.0, False, False, NOISY, True), False),  # disarmed: the shift stage's alarm waits too
        ((25.0, True, False, RED, False), True),    # > 2 x 10, 3 windows on (hold-off 2): alarms, reference 25
        ((60.0, True, False, RED, False), False),   # > 2 x 25 but within the hold-off
        *[((1.0, False, False, QUIET, False), False)] * 4,
        ((1.0, False, False, NOISY, False), False),  # not quiet enough: the count starts over
        *[((1.0, False, False, QUIET, False), False)] * 5,  # five quiet windows in a row: armed again
        ((3.0, False, False, NOISY, True), True),   # armed: another stage's alarm alarms
    ]
    got = [gate.gate(score, Decision(anom, entry, tail), other) for (score, anom, entry, tail, other), _ in steps]
    assert got == [fired for _, fired in steps]


def rearming_knn(train_rows: np.ndarray, rearm: tuple[float, int, float | None] | None) -> LoadedModel:
    spec = shape_spec("value", samples=W)
    feats = FeatureExtractor(spec, ["value"], W).extract(sliding_window_view(train_rows, W)[:, None, :])
    m = train(feats, TrainParams(kind="knn", alarm_mode="likelihood", averaging_windows=1, holdoff_windows=W,
                                 online=True, online_exclude_windows=W - 1, online_merge_fraction=0.5, shift=(16, 400),
                                 rearm=rearm))
    card = make_card(m, component="test.Rearm", version="1.0.0", channels=["value"], spec=spec, window=W, hop=1,
                     rate_hz=1.0, sources=["synthetic"], rows=len(train_rows))
    assert parse_card(card.to_json()) == card  # the section round-trips through the card
    return LoadedModel(card, session(m.proto), "test", Path("test"))


def test_spikes_ringing_after_an_alarm_are_one_event_and_a_later_change_still_alarms() -> None:
    """A busy normal (1 % spikes) rings after its first alarm: with the one-window hold-off each ring is
    another alarm; re-armed only after quiet it is one. The level change at rows 1500-1599, long after
    the stream went quiet, alarms either way."""
    x = busy_series()
    fixed = np.flatnonzero(alarms(rearming_knn(x[:500], None), x))
    rearmed = np.flatnonzero(alarms(rearming_knn(x[:500], (1e-3, 288, 2.0)), x))
    assert set(rearmed) < set(fixed)  # nothing new, something less
    assert len(fixed[fixed < 1500]) > len(rearmed[rearmed < 1500]) >= 1
    assert any(1500 <= i < 1600 for i in rearmed) and any(1500 <= i < 1600 for i in fixed)
    model = rearming_knn(x[:500], (1e-3, 288, 2.0))
    assert AssetState.start(model).rearm is not None
    assert AssetState.start(model, mode="threshold").rearm is None  # a threshold override turns it off


def test_cli_writes_it_only_when_asked_and_only_with_the_likelihood_alarm(tmp_path: Path) -> None:
    data = tmp_path / "busy.csv"
    data.write_text("value\n" + "\n".join(f"{v:.5f}" for v in busy_series()[:800]) + "\n")
    base = ["build", "--data", str(data), "--kind", "knn", "--features", "shape", "--window", "8", "--hop", "1",
            "--rate-hz", "1", "--online", "--alarm", "likelihood"]
    card_path = Path("artifacts") / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json"
    assert main([*base, "--out", str(tmp_path / "off")]) == 0
    assert load_card(tmp_path / "off" / card_path).alarm.rearm is None  # off by default
    assert main([*base, "--out", str(tmp_path / "on"), "--rearm", "1e-3,288,2"]) == 0
    card = load_card(tmp_path / "on" / card_path)
    assert card.alarm.rearm is not None
    assert (card.alarm.rearm.quiet_tail_probability, card.alarm.rearm.quiet_windows,
            card.alarm.rearm.exception_ratio) == (1e-3, 288, 2.0)
    assert main([*base, "--out", str(tmp_path / "noex"), "--rearm", "1e-2,24"]) == 0
    noex = load_card(tmp_path / "noex" / card_path).alarm.rearm
    assert noex is not None and noex.exception_ratio is None
    loaded = LoadedModel(load_card(tmp_path / "noex" / card_path), None, "test", Path("t"))  # type: ignore[arg-type]
    assert loaded.alarm_params().rearm_ratio == math.inf
    for bad in ("1e-3", "0,288,2", "1e-3,0,2", "1e-3,288,1", "1e-3,288,inf", "x,288,2", "1e-3,2.5,2"):
        assert main([*base, "--out", str(tmp_path / "bad"), "--rearm", bad]) != 0, bad
    assert main([*base[:-2], "--out", str(tmp_path / "thr"), "--rearm", "1e-3,288,2"]) != 0
    with pytest.raises(TrainingError, match="needs --alarm likelihood"):
        train(np.zeros((200, 8), np.float32) + np.arange(200)[:, None],
              TrainParams(kind="knn", rearm=(1e-3, 288, 2.0)))
    doc = card.to_json().replace('"mode": "likelihood"', '"mode": "threshold"')
    with pytest.raises(ModelCardError, match=r"rearm needs alarm mode likelihood"):
        parse_card(doc)
    with pytest.raises(ModelCardError, match="exception_ratio"):
        parse_card(card.to_json().replace('"exception_ratio": 2.0', '"exception_ratio": 0.5'))
