"""The knn model kind and its run-time memory: ONNX distances equal scikit-learn's, the memory never
matches a window with the windows that overlap it, merges near-duplicates, stays bounded, and turns
a lasting change of regime into one alarm instead of one per window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from components.anomaly.errors import FeatureSpecError, ModelCardError, TrainingError
from components.anomaly.features import ChannelGroup, FeatureExtractor, FeatureSpec, shape_spec
from components.anomaly.model_card import OnlineSpec, load_card, parse_card
from components.anomaly.novelty import OnlineMemory
from components.anomaly_detector.asset import AssetState
from components.anomaly_detector.scoring import LoadedModel
from components.anomaly_detector.windowing import Windower
from components.model_builder.cli import main
from components.model_builder.package import make_card
from components.model_builder.training import TrainParams, onnx_scores, session, train

W = 8


def test_samples_features_are_the_newest_values_oldest_first() -> None:
    spec = FeatureSpec(groups=[ChannelGroup(channels=["a", "b"], stats=["mean"], samples=3)])
    assert spec.feature_names() == ["a.mean", "a.s00", "a.s01", "a.s02", "b.mean", "b.s00", "b.s01", "b.s02"]
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    f = FeatureExtractor(spec, ["a", "b"], 6).extract(x)
    assert f.tolist() == [2.5, 3, 4, 5, 8.5, 9, 10, 11]
    batch = FeatureExtractor(spec, ["a", "b"], 6).extract(np.stack([x, x + 1]))
    assert batch.shape == (2, 8) and batch[1, 1] == 4
    with pytest.raises(FeatureSpecError, match="samples as features need a window of at least 9") as err:
        FeatureExtractor(shape_spec("v", samples=9), ["v"], 8)
    assert err.value.field == "groups[0].samples"
    with pytest.raises(ValueError, match="stats, bands or samples"):
        ChannelGroup(channels=["a"])


def series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 10 + np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(n)


def shape_features(values: np.ndarray) -> np.ndarray:
    return FeatureExtractor(shape_spec("value", samples=W), ["value"], W).extract(
        sliding_window_view(values, W)[:, None, :])


def test_knn_onnx_is_scikit_learns_nearest_neighbour_distance_with_contributions() -> None:
    x = shape_features(series(1500))
    m = train(x, TrainParams(kind="knn", max_prototypes=600))
    probe = np.concatenate([shape_features(series(300, seed=1)), shape_features(series(100, seed=2) + 3)])
    sess = session(m.proto)
    ours = onnx_scores(sess, probe)
    np.testing.assert_allclose(ours, m.reference(probe), rtol=1e-4, atol=1e-4)
    assert m.onnx_io.contributions_output == "contributions"
    contrib = np.asarray(sess.run(["contributions"], {"features": probe})[0], dtype=np.float64)
    np.testing.assert_allclose(contrib.sum(axis=1), ours ** 2, rtol=1e-3, atol=1e-4)  # squared diff per feature
    assert (ours[300:] >= m.threshold.value).all() and (ours[:300] >= m.threshold.value).mean() < 0.05
    # max_prototypes: the fit windows are thinned evenly in time, the graph holds no more than that
    protos = next(i for i in m.proto.graph.initializer if i.name == "protos")
    assert list(protos.dims) == [600, W] and m.params.summary()["max_prototypes"] == 600
    with pytest.raises(TrainingError, match="online learning needs --kind knn"):
        train(x, TrainParams(kind="pca", online=True))


def test_memory_excludes_overlapping_windows_merges_and_stays_bounded() -> None:
    mem = OnlineMemory(OnlineSpec(capacity=5, exclude_windows=2), 2)
    assert mem.distance(np.zeros(2, np.float32)) == float("inf")
    for i in range(3):
        mem.observe(np.array([i, 0], np.float32))
    assert len(mem) == 1  # windows 1 and 2 still wait: they overlap the newest one
    assert mem.distance(np.array([0, 3], np.float32)) == pytest.approx(3.0)  # exact distance to window 0
    for i in range(3, 20):
        mem.observe(np.array([i, 0], np.float32))
    assert len(mem) == 5 and mem.stored == 18  # a ring: the oldest were overwritten
    assert mem.distance(np.array([0, 0], np.float32)) == pytest.approx(13.0)  # nearest left: 13..17
    merging = OnlineMemory(OnlineSpec(capacity=100, exclude_windows=0, merge_radius=0.5), 1)
    for v in (0.0, 0.2, 0.4, 1.0, 1.3):
        merging.observe(np.array([v], np.float32))
    assert len(merging) == 2 and merging.merged == 3  # 0.2/0.4 within 0.5 of 0; 1.3 within 0.5 of 1.0


def loaded_knn(values: np.ndarray, *, online: bool) -> LoadedModel:
    spec = shape_spec("value", samples=W)
    m = train(shape_features(values), TrainParams(
        kind="knn", alarm_mode="likelihood", holdoff_windows=W, averaging_windows=1, online=online,
        online_exclude_windows=W - 1, online_merge_fraction=0.5))
    card = make_card(m, component="test.Knn", version="1.0.0", channels=["value"], spec=spec, window=W, hop=1,
                     rate_hz=1.0, sources=["synthetic"], rows=len(values))
    assert (card.online is not None) == online
    parse_card(card.to_json())  # the online section round-trips through the card
    return LoadedModel(card, session(m.proto), "test", Path("test"))


def stream(model: LoadedModel, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row by row through the detector's Windower, features + ONNX, and the asset's judgement state."""
    state = AssetState.start(model)
    w = Windower(["value"], W, 1, 1.0)
    scores, alarms, anomalous = np.full(len(values), np.nan), np.zeros(len(values), bool), np.zeros(len(values), bool)
    from_memory = np.zeros(len(values), bool)
    for i, v in enumerate(values.astype(np.float32)):
        for win in w.push({"seq": i, "t0": float(i), "rate_hz": 1.0, "channels": ["value"],
                           "data": np.array([[v]], np.float32)}):
            scored = model.score(win.data[None])
            judged = state.judge(float(scored.scores[0]), scored.features[0])
            scores[i], decision = judged.score, judged.decision
            if judged.contributions is not None:  # set by a remembered window: explains exactly that distance
                assert judged.contributions.sum() == pytest.approx(judged.score ** 2, rel=1e-5)
                from_memory[i] = True
            alarms[i], anomalous[i] = decision.alarm, decision.is_anomaly
    return scores, alarms, anomalous, from_memory


def test_a_lasting_new_regime_alarms_once_with_online_learning_and_keeps_alarming_without() -> None:
    train_rows = series(600)
    test = series(1400, seed=3)
    test[600:] += 4.0  # a step to a new, lasting normal at row 600
    learning, fixed = loaded_knn(train_rows, online=True), loaded_knn(train_rows, online=False)
    s_learn, a_learn, n_learn, memory_set = stream(learning, test)
    s_fixed, _, n_fixed, fixed_memory = stream(fixed, test)
    assert a_learn[600:600 + 2 * W].sum() == 1  # the change is reported when it starts
    assert a_learn[700:].sum() == 0 and a_learn[:600].sum() <= 1  # ...and the new level is normal after a day or so
    assert np.nanmedian(s_learn[800:]) < 0.2 * np.nanmedian(s_fixed[800:])  # it learnt the new level
    # without memory every window of the new level stays in the red zone until the likelihood's own
    # estimate has absorbed it; with memory only the first few windows of the change are
    assert n_fixed[600:].sum() > 5 * n_learn[600:].sum() > 0
    assert (s_learn <= s_fixed + 1e-6)[W:].all()  # memory can only bring a window nearer to something seen
    assert memory_set[700:].mean() > 0.9 and not fixed_memory.any()  # the new level is explained by memory


def test_online_section_only_for_knn_and_cli_builds_a_learning_knn_component(tmp_path: Path) -> None:
    data = tmp_path / "temps.csv"
    data.write_text("value\n" + "\n".join(f"{v:.5f}" for v in series(800)) + "\n")
    out = tmp_path / "out"
    assert main(["build", "--data", str(data), "--out", str(out), "--kind", "knn", "--features", "shape",
                 "--window", "8", "--hop", "2", "--rate-hz", "1", "--online", "--alarm", "likelihood"]) == 0
    card = load_card(out / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json")
    assert card.kind == "knn" and card.feature_names == [f"value.s{i:02d}" for i in range(8)]
    assert card.online is not None and card.online.exclude_windows == 3  # windows 2 apart overlap 3 times
    assert card.online.merge_radius == pytest.approx(0.5 * card.score_scale.median)
    doc = card.to_json().replace('"kind": "knn"', '"kind": "pca"')
    with pytest.raises(ModelCardError, match="online learning needs a knn model"):
        parse_card(doc)


def test_calendar_features_are_day_and_week_phases_of_the_window_end_and_are_not_standardized() -> None:
    spec = shape_spec("value", samples=2, calendar=("day", "week"))
    assert spec.feature_names()[2:] == ["calendar.day_sin", "calendar.day_cos", "calendar.week_sin",
                                        "calendar.week_cos"] and spec.unscaled() == [2, 3, 4, 5]
    fx = FeatureExtractor(spec, ["value"], 4)
    x = np.ones((2, 1, 4), np.float32)
    f = fx.extract(x, np.array([6 * 3600.0, 3.5 * 86_400]))  # 06:00 on day 0; noon on day 3 of the week
    np.testing.assert_allclose(f[0, 2:], [1, 0, np.sin(2 * np.pi / 28), np.cos(2 * np.pi / 28)], atol=1e-6)
    np.testing.assert_allclose(f[1, 2:4], [0, -1], atol=1e-6)
    np.testing.assert_allclose(f[1, 4:], [np.sin(np.pi), np.cos(np.pi)], atol=1e-6)  # half a week
    with pytest.raises(FeatureSpecError, match="end time") as err:
        fx.extract(x)
    assert err.value.field == "calendar"
    # Two days of hourly training data: the week's phase spans a small arc, and standardizing it would
    # make next week's Monday look like a far outlier. The model takes calendar features as they are.
    hours = np.arange(48 + 3) * 3600.0
    values = series(48 + 3)
    feats = fx.extract(sliding_window_view(values, 4)[:, None, :], hours[3:])
    m = train(feats, TrainParams(kind="knn", unscaled=tuple(spec.unscaled())))
    assert m.feature_stats.mean[2:] == [0.0] * 4 and m.feature_stats.std[2:] == [1.0] * 4
    x_mean = next(i for i in m.proto.graph.initializer if i.name == "x_mean")
    x_inv = next(i for i in m.proto.graph.initializer if i.name == "x_inv_scale")
    assert (numpy_helper.to_array(x_mean)[2:] == 0).all() and (numpy_helper.to_array(x_inv)[2:] == 1).all()


def test_a_weekday_that_looks_like_a_weekend_day_is_novel_only_with_calendar_context() -> None:
    """Hourly demand: busy weekdays, quiet weekends. A quiet Wednesday has been seen as a shape (every
    weekend), so only the window's place in the week makes it unusual."""
    hours = np.arange(24 * 7 * 5) * 3600.0 + 4 * 86_400  # the epoch was a Thursday: start on a Monday
    dow = ((hours // 86_400) + 3) % 7  # 0 = Monday
    rng = np.random.default_rng(0)
    values = np.where(dow >= 5, 10.0, 30.0) + rng.normal(0, 1, len(hours))
    holiday = (dow == 2) & (hours >= hours[0] + 28 * 86_400)  # the fifth week's Wednesday
    values[holiday] = 10.0 + rng.normal(0, 1, int(holiday.sum()))
    train_rows = 24 * 7 * 3
    scores = {}
    for calendar in ((), ("day", "week")):
        spec = shape_spec("value", samples=W, calendar=calendar)  # type: ignore[arg-type]
        fx = FeatureExtractor(spec, ["value"], W)
        feats = fx.extract(sliding_window_view(values, W)[:, None, :], hours[W - 1:])
        m = train(feats[: train_rows - W + 1], TrainParams(kind="knn", unscaled=tuple(spec.unscaled())))
        s = onnx_scores(session(m.proto), feats)
        inside = holiday[: len(s)] & holiday[W - 1:]  # windows wholly inside the holiday (rows j..j+W-1)
        scores[calendar] = s[inside].mean() / m.threshold.value
    assert scores[()] < 1.0 < scores[("day", "week")]


def test_cli_builds_calendar_features_from_a_time_column_and_refuses_them_without(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
    rows = [f"{(start + timedelta(hours=i)).strftime('%Y-%m-%d %H:%M:%S')},{v:.4f}" for i, v in enumerate(series(500))]
    data = tmp_path / "hourly.csv"
    data.write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    base = ["build", "--data", str(data), "--kind", "knn", "--features", "shape", "--window", "8", "--hop", "1",
            "--rate-hz", str(1 / 3600), "--calendar", "day,week"]
    assert main([*base, "--out", str(tmp_path / "refused")]) != 0
    assert "calendar features need each row's time: give --time-column" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--time-column", "timestamp", "--online"]) == 0
    card = load_card(out / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json")
    assert card.features.calendar is not None and card.features.calendar.periods == ["day", "week"]
    assert card.feature_names[-4:] == ["calendar.day_sin", "calendar.day_cos", "calendar.week_sin",
                                       "calendar.week_cos"]
    assert card.feature_stats.mean[-4:] == [0.0] * 4 and card.feature_stats.std[-4:] == [1.0] * 4


def test_memory_snapshot_restores_the_same_distances_and_refuses_another_width() -> None:
    spec = OnlineSpec(capacity=50, exclude_windows=2)
    mem = OnlineMemory(spec, 3)
    rng = np.random.default_rng(1)
    for v in rng.standard_normal((80, 3)).astype(np.float32):  # past capacity: the ring has wrapped
        mem.observe(v)
    probe = rng.standard_normal((5, 3)).astype(np.float32)
    copy = OnlineMemory(spec, 3)
    assert copy.restore(mem.snapshot())
    assert len(copy) == len(mem) == 50 and copy.stored == mem.stored
    assert [copy.distance(p) for p in probe] == [mem.distance(p) for p in probe]
    for m in (mem, copy):  # and both go on alike: the pending windows came along
        m.observe(probe[0])
        m.observe(probe[1])
        m.observe(probe[2])
    assert copy.distance(probe[0]) == mem.distance(probe[0]) == 0.0
    assert not OnlineMemory(spec, 4).restore(mem.snapshot())


def test_detector_keeps_a_learning_models_memory_across_a_restart(tmp_path: Path) -> None:
    from typing import Any, cast

    from components.anomaly_detector import knn_store
    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    model = loaded_knn(series(600), online=True)
    config = DetectorConfig.model_validate({"memoryDir": str(tmp_path / "mem")})
    first = Detector(cast(Any, None), config)
    state = first._asset_state("turbine/1", model)
    feats = shape_features(series(300, seed=4) + 4.0)  # a new level the memory learns
    for f in feats:
        state.judge(5.0, f)
    assert state.memory is not None and len(state.memory) > 0
    first.save_memories()
    saved = knn_store.path_for(tmp_path / "mem", "test.Knn", "1.0.0", "turbine/1")
    assert saved.exists() and saved.name == "test.Knn-1.0.0-turbine_1.npz"
    second = Detector(cast(Any, None), config)  # the detector restarted: same model, same asset
    again = second._asset_state("turbine/1", model)
    assert again.memory is not None and len(again.memory) == len(state.memory)
    assert again.judge(5.0, feats[-1]).score < 1.0  # the learnt level is still known
    saved.write_bytes(b"not a memory")  # unreadable: logged, and the memory starts empty
    fresh = Detector(cast(Any, None), config)._asset_state("turbine/1", model).memory
    assert fresh is not None and len(fresh) == 0


def test_a_memory_that_cannot_be_written_leaves_the_detector_and_the_last_file_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or read-only disk is logged; the detector keeps learning and a saved memory is not replaced
    by a half-written one."""
    import errno
    from typing import Any, cast

    from components.anomaly_detector import knn_store
    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    model = loaded_knn(series(600), online=True)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the memory directory should be")
    detector = Detector(cast(Any, None), DetectorConfig.model_validate({"memoryDir": str(blocked)}))
    state = detector._asset_state("turbine/1", model)
    for f in shape_features(series(100, seed=4) + 4.0):
        state.judge(5.0, f)
    detector.save_memories()  # the directory cannot be made: logged, not raised
    assert blocked.read_text().startswith("a file") and state.memory is not None and len(state.memory) > 0
    good = knn_store.path_for(tmp_path / "mem", "test.Knn", "1.0.0", "turbine/1")
    knn_store.save(good, state.memory.snapshot())
    before = good.read_bytes()
    for f in shape_features(series(100, seed=5) - 4.0):  # learns more: a replaced file would differ
        state.judge(5.0, f)

    def full_disk(fd: int) -> None:  # the temporary file is written, then the disk turns out to be full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(knn_store.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        knn_store.save(good, state.memory.snapshot())
    detector_full = Detector(cast(Any, None), DetectorConfig.model_validate({"memoryDir": str(tmp_path / "mem")}))
    detector_full.alarms["turbine/1"] = state
    detector_full.save_memories()  # the detector's own save: logged, not raised
    monkeypatch.undo()
    assert good.read_bytes() == before and not list(good.parent.glob(".*.tmp"))


@pytest.mark.parametrize("spoil", ["text", "nan", "position"])
def test_a_memory_file_of_another_kind_is_ignored_not_fatal_or_poisonous(tmp_path: Path, spoil: str) -> None:
    """'An unreadable file is logged and ignored' (docs/anomaly.md): a file whose arrays were text raised
    out of restore() (in the scoring loop: the detector stopped), and one with a NaN row was taken, so
    every later score of that asset was NaN."""
    from typing import Any, cast

    from structlog.testing import capture_logs

    from components.anomaly_detector import knn_store
    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    model = loaded_knn(series(600), online=True)
    config = DetectorConfig.model_validate({"memoryDir": str(tmp_path / "mem")})
    first = Detector(cast(Any, None), config)
    state = first._asset_state("t1", model)
    feats = shape_features(series(300, seed=4) + 4.0)
    for f in feats:
        state.judge(5.0, f)
    first.save_memories()
    saved = knn_store.path_for(tmp_path / "mem", "test.Knn", "1.0.0", "t1")
    snap = knn_store.load(saved)
    assert snap is not None
    if spoil == "text":
        snap["store"] = snap["store"].astype("U12")
    elif spoil == "nan":
        snap["store"][0, 0] = np.nan
    else:
        snap["next"] = np.array([1, 2])
    knn_store.save(saved, snap)
    with capture_logs() as logs:
        again = Detector(cast(Any, None), config)._asset_state("t1", model)
    assert again.memory is not None and len(again.memory) == 0
    assert [e["event"] for e in logs] == ["detector.memory_unreadable"]
    assert np.isfinite(again.judge(5.0, feats[-1]).score)
