"""The builder: three model kinds export to ONNX with scikit-learn's scores, the threshold comes from
held-out healthy data, and the CLI writes a deployable, signed component."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from anomaly_models import CHANNELS, faulty, healthy

from components.anomaly.errors import TrainingError
from components.anomaly.model_card import load_card
from components.anomaly_detector.windowing import Windower
from components.model_builder.cli import main
from components.model_builder.data import Dataset, load_csv, load_recording, save_recording, windows
from components.model_builder.training import TrainParams, onnx_scores, session, train

REPO = Path(__file__).resolve().parents[2]


def feats(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 6))
    base[:, 3] = base[:, 0] * 2 + 0.1 * rng.normal(size=n)  # correlated, so PCA/AE have structure to learn
    return base.astype(np.float32)


@pytest.mark.parametrize("kind", ["isolation_forest", "pca", "autoencoder"])
def test_onnx_matches_sklearn_and_flags_outliers(kind: str) -> None:
    x = feats(1200)
    m = train(x, TrainParams(kind=kind, n_estimators=40, max_iter=200))  # type: ignore[arg-type]
    probe = np.concatenate([feats(300, seed=5), feats(50, seed=6) + 8]).astype(np.float32)
    ours = onnx_scores(session(m.proto), probe)
    np.testing.assert_allclose(ours, m.reference(probe), rtol=1e-4, atol=1e-5)
    assert m.metrics["onnx_max_abs_diff"] < 1e-4
    assert (ours[300:] >= m.threshold.value).mean() > 0.9  # far outliers alarm
    assert (ours[:300] >= m.threshold.value).mean() < 0.05  # fresh healthy data mostly does not
    assert m.calibration_windows == 300 and m.fit_windows == 900
    if kind == "isolation_forest":
        assert m.onnx_io.nodes == 4 and m.onnx_io.contributions_output is None  # one fused tree-ensemble node
    else:
        assert m.onnx_io.contributions_output == "contributions"


def test_threshold_is_a_quantile_of_held_out_scores_only() -> None:
    x = feats(1000)
    x[-250:] += 0.0
    m = train(x, TrainParams(quantile=0.9, calibration_fraction=0.25, n_estimators=20))
    assert m.threshold.value == pytest.approx(float(np.quantile(m.calibration_scores, 0.9, method="higher")))
    budget = train(x, TrainParams(false_alarms_per_hour=36.0, n_estimators=20), rate_hz=1000, hop=1000)
    assert budget.threshold.method == "false_alarm_budget"
    assert budget.threshold.quantile == pytest.approx(1 - 36 / 3600)
    with pytest.raises(TrainingError, match="sample rate"):
        train(x, TrainParams(false_alarms_per_hour=1.0))
    with pytest.raises(TrainingError, match="at least"):
        train(x[:5], TrainParams())
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(TrainingError, match="NaN"):
        train(bad, TrainParams())


def test_train_refuses_a_split_that_leaves_too_few_windows_to_fit() -> None:
    """The check lived in the CLI only: train() itself fitted 4 windows, or (a fraction above 1 from the
    Python API) none, and failed further on, if at all, with something unrelated."""
    with pytest.raises(TrainingError, match=r"--calibration-fraction 0.9 leaves 4 of 40 windows .* at least 10"):
        train(feats(40), TrainParams(calibration_fraction=0.9, n_estimators=10))
    with pytest.raises(TrainingError, match="leaves 0 of 40 windows"):
        train(feats(40), TrainParams(calibration_fraction=1.5, n_estimators=10))
    assert train(feats(40), TrainParams(calibration_fraction=0.75, n_estimators=10)).fit_windows == 10


def test_spread_margin_scales_distance_from_the_healthy_median() -> None:
    x = feats(1000)
    plain = train(x, TrainParams(kind="pca", quantile=0.99))
    wide = train(x, TrainParams(kind="pca", quantile=0.99, spread_margin=10.0))
    q = float(np.quantile(wide.calibration_scores, 0.99, method="higher"))
    median = float(np.median(wide.calibration_scores))
    assert plain.threshold.value == pytest.approx(q)
    assert wide.threshold.value == pytest.approx(median + 10.0 * (q - median))
    assert wide.threshold.spread_margin == 10.0 and plain.threshold.spread_margin is None
    both = train(x, TrainParams(kind="pca", quantile=0.99, spread_margin=2.0, margin=1.5))
    assert both.threshold.value == pytest.approx((median + 2.0 * (q - median)) * 1.5)


def test_windows_never_span_segments_and_labels_filter(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    rows = ["timestamp,a,b,label"] + [f"2020-01-01 00:00:{i:02d},{i},{-i},{1 if 10 <= i < 12 else 0}"
                                      for i in range(30)]
    csv.write_text("\n".join(rows) + "\n")
    ds = load_csv(csv, label_column="label")
    assert ds.channels == ["a", "b"] and [s.shape[1] for s in ds.segments] == [10, 18]
    w = windows(ds, 5, 5)
    assert w.shape == (2 + 3, 2, 5)
    assert all(np.all(np.diff(win[0]) == 1) for win in w)  # contiguous samples only
    rec = tmp_path / "r.npz"
    save_recording(rec, ["a"], np.arange(20, dtype=np.float32)[None], 100.0, segment_starts=[0, 7])
    r = load_recording(rec)
    assert r.rate_hz == 100.0 and [s.shape[1] for s in r.segments] == [7, 13]
    with pytest.raises(TrainingError, match="no columns"):
        load_csv(csv, ["zz"])
    assert isinstance(ds, Dataset)


def test_a_channel_column_that_turns_to_text_names_its_column_line_and_cell(tmp_path: Path) -> None:
    """Channels are picked from the first row, so a column that turns to text further down failed with
    Python's "could not convert string to float: 'ok'" and nothing saying which column or line."""
    csv = tmp_path / "d.csv"
    csv.write_text("a,status\n" + "".join(f"{i},{1 if i < 7 else 'ok'}\n" for i in range(10)))
    with pytest.raises(TrainingError) as err:
        load_csv(csv)
    assert "channel column 'status', line 9: 'ok' is not a number" in str(err.value)
    assert err.value.path == str(csv) and err.value.field == "channels"
    with pytest.raises(TrainingError, match="line 9: 'ok'"):  # lines count in the file, not in the range
        load_csv(csv, row_range=(5, 10))
    assert load_csv(csv, ["a"]).channels == ["a"]


def test_cli_build_writes_a_deployable_signed_component(tmp_path: Path) -> None:
    data = tmp_path / "healthy.csv"
    x = healthy(20_000)
    data.write_text("vib_x,temp\n" + "\n".join(f"{a},{b}" for a, b in x.T) + "\n")
    out = tmp_path / "out"
    argv = ["build", "--data", str(data), "--out", str(out), "--version", "2.1.0", "--window", "128", "--hop", "64",
            "--rate-hz", "1000", "--bands", "4", "--n-estimators", "30", "--json"]
    assert main(argv) == 0
    model_dir = out / "artifacts" / "com.nucleus.TurbineModel" / "2.1.0"
    recipe = yaml.safe_load((out / "recipes" / "com.nucleus.TurbineModel-2.1.0.yaml").read_text())
    arts = recipe["Manifests"][0]["Artifacts"]
    assert {a["URI"].rsplit("/", 1)[1] for a in arts} == {"model.onnx", "model_card.json", "model.sig"}
    for a in arts:
        f = model_dir / a["URI"].rsplit("/", 1)[1]
        assert a["Digest"] == base64.b64encode(hashlib.sha256(f.read_bytes()).digest()).decode()
    assert "components.anomaly.announce" in recipe["Manifests"][0]["Lifecycle"]["Run"]
    card = load_card(model_dir / "model_card.json")
    assert card.channels == CHANNELS and card.window == 128 and card.sample_rate_hz == 1000
    assert card.training.fit_windows + card.training.calibration_windows == card.training.windows
    pub = (out / "keys" / "model-signing.key.pub").read_text().strip()
    cfg = json.loads((out / "detector-config.json").read_text())
    assert cfg["com.nucleus.AnomalyDetector"]["MERGE"]["trustedKeys"] == [pub]
    verify = ["verify", str(model_dir), "--component", "com.nucleus.TurbineModel", "--version", "2.1.0",
              "--trusted-key", pub]
    assert main(verify) == 0
    (model_dir / "model_card.json").write_text(card.to_json().replace('"window": 128', '"window": 256'))
    assert main(verify) == 1
    # The same key signs the next version; the recipe validates with the nucleus's own loader.
    assert main([*argv[:5], "--version", "2.2.0", *argv[7:]]) == 0
    proc = subprocess.run([sys.executable, "-m", "nucleus", "recipe", "validate",
                           str(out / "recipes" / "com.nucleus.TurbineModel-2.2.0.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    short = tmp_path / "short.csv"
    short.write_text("a\n1\n2\n")
    assert main(["build", "--data", str(short), "--out", str(tmp_path / "o")]) == 2
    assert "window" in capsys.readouterr().err


def test_faulty_data_scores_above_healthy(tmp_path: Path) -> None:
    from anomaly_models import build

    pkg = build(tmp_path, "1.0.0")
    from components.anomaly.features import FeatureExtractor

    fx = FeatureExtractor(pkg.card.features, pkg.card.channels, pkg.card.window)
    sess = session((pkg.model_dir / "model.onnx").read_bytes())
    good = onnx_scores(sess, fx.extract(windows(Dataset(CHANNELS, [healthy(8000, seed=9)], None, []), 128, 64)))
    bad = onnx_scores(sess, fx.extract(windows(Dataset(CHANNELS, [faulty(8000)], None, []), 128, 64)))
    assert (bad >= pkg.card.threshold.value).all() and (good >= pkg.card.threshold.value).mean() < 0.02


def test_cli_spectral_preset_is_load_invariant_and_scored_alike_by_the_detector(tmp_path: Path) -> None:
    """Trained at one gain ("load"), the spectral preset with a spread margin keeps healthy data at 3x
    the amplitude below the threshold, while the impacts of a fault still cross it; the detector's
    loader computes the same features and scores from the card alone."""
    from components.anomaly import signing
    from components.anomaly_detector.scoring import load_model

    data = tmp_path / "healthy.csv"
    x = healthy(30_000)
    data.write_text("vib_x,temp\n" + "\n".join(f"{a},{b}" for a, b in x.T) + "\n")
    out = tmp_path / "out"
    assert main(["build", "--data", str(data), "--out", str(out), "--window", "128", "--hop", "64",
                 "--rate-hz", "1000", "--kind", "pca", "--features", "spectral", "--bands", "8",
                 "--spread-margin", "10", "--json"]) == 0
    model_dir = out / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0"
    card = load_card(model_dir / "model_card.json")
    assert card.features.groups[0].band_scale == "log_relative" and card.threshold.spread_margin == 10
    assert [n for n in card.feature_names if n.startswith("vib_x")] == [f"vib_x.band{b:02d}" for b in range(8)]
    pub = (out / "keys" / "model-signing.key.pub").read_text().strip()
    m = load_model(model_dir, component="com.nucleus.TurbineModel", version="1.0.0",
                   trusted=signing.trusted_key_map([pub]))

    def cut(d: np.ndarray) -> np.ndarray:
        return windows(Dataset(CHANNELS, [d.astype(np.float64)], None, []), 128, 64).astype(np.float32)

    louder = healthy(8000, seed=11)
    louder[0] *= 3.0
    scored_louder = m.score(cut(louder)).scores
    scored_fault = m.score(cut(faulty(8000))).scores
    assert (scored_louder < card.threshold.value).all()
    assert (scored_fault >= card.threshold.value).mean() > 0.9
    sess = session((model_dir / "model.onnx").read_bytes())
    np.testing.assert_allclose(scored_fault, onnx_scores(sess, m.extractor.extract(cut(faulty(8000)))), rtol=1e-6)


def test_an_autoencoder_cut_off_at_max_iter_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopping at --max-iter is the builder's finding, told next to the flag that fixes it and kept in
    the card, not scikit-learn's ConvergenceWarning from inside fit(); a fit that settles says nothing."""
    x = feats(1200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping train() fails the test
        cut = train(x, TrainParams(kind="autoencoder", max_iter=3))
        settled = train(x, TrainParams(kind="autoencoder", max_iter=2000))
    assert cut.metrics["training_converged"] == 0.0 and cut.metrics["training_iterations"] == 3.0
    assert settled.metrics["training_converged"] == 1.0 and settled.metrics["training_iterations"] < 2000
    assert "training_converged" not in train(x, TrainParams(kind="pca")).metrics
    data = tmp_path / "healthy.csv"
    data.write_text("vib_x,temp\n" + "\n".join(f"{a},{b}" for a, b in healthy(8_000).T) + "\n")
    base = ["build", "--data", str(data), "--window", "128", "--hop", "64", "--rate-hz", "1000", "--bands", "4",
            "--kind", "autoencoder"]
    assert main([*base, "--out", str(tmp_path / "cut"), "--max-iter", "3"]) == 0
    assert "stopped at --max-iter 3" in capsys.readouterr().out
    card = load_card(tmp_path / "cut" / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json")
    assert card.metrics["training_converged"] == 0.0


# --- bad input: one `error:` line naming the flag (and file), exit status 2, never a traceback -------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4,000 healthy samples (61 windows of 128, hop 64) as a labelled CSV, a one-column CSV and a
    1 kHz recording."""
    d = tmp_path_factory.mktemp("small")
    x = healthy(4000)
    (d / "h.csv").write_text("vib_x,temp,label\n" + "\n".join(f"{a},{b},0" for a, b in x.T) + "\n")
    (d / "u.csv").write_text("value\n" + "\n".join(f"{a}" for a in x[0]) + "\n")
    save_recording(d / "h.npz", CHANNELS, x, 1000.0)
    return d


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """main(argv) must refuse with exit status 2 and exactly one `error:` line; returns that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def small_build(small: Path, data: str = "h.csv") -> list[str]:
    return ["build", "--data", str(small / data), "--out", str(small / "out"), "--window", "128", "--hop", "64",
            "--n-estimators", "10"]


@pytest.mark.parametrize(("extra", "flag", "says"), [
    (["--rows", "10-20"], "--rows", "START:END"),
    (["--rows", "20:10"], "--rows", "START < END"),
    (["--hop", "0"], "--hop", ">= 1"),
    (["--hop", "-5"], "--hop", ">= 1"),
    (["--quantile", "1.5"], "--quantile", "between 0 and 1"),
    (["--quantile", "nan"], "--quantile", "finite"),
    (["--kind", "autoencoder", "--hidden", "8,x"], "--hidden", "'8,x'"),
    (["--tail-probability", "2"], "--tail-probability", "between 0 and 1"),
    (["--margin", "-1"], "--margin", "> 0"),
    (["--holdoff-windows", "-1"], "--holdoff-windows", ">= 0"),
    (["--kind", "knn", "--online", "--online-capacity", "0"], "--online-capacity", ">= 1"),
    (["--calibration-fraction", "1.5"], "--calibration-fraction", "between 0 and 1"),
    (["--rate-hz", "0"], "--rate-hz", "> 0"),
    (["--n-estimators", "0"], "--n-estimators", ">= 1"),
    (["--kind", "pca", "--pca-variance", "0"], "--pca-variance", "> 0"),
    (["--false-alarms-per-hour", "-1"], "--false-alarms-per-hour", "> 0"),
    (["--averaging-windows", "0"], "--averaging-windows", ">= 1"),
])
def test_cli_refuses_bad_flag_values_in_one_line(small: Path, capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], flag: str, says: str) -> None:
    """Each of these was a ValueError, scikit-learn or pydantic traceback, or (--calibration-fraction 1.5,
    --false-alarms-per-hour -1) a model built from nonsense."""
    line = refused(capsys, [*small_build(small), *extra])
    assert f"argument {flag}:" in line and says in line


def test_cli_help_and_missing_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--help"]) == 0
    assert "default: temp" in " ".join(capsys.readouterr().out.split())  # --slow-channels
    line = refused(capsys, ["verify", "somewhere"])
    assert "--component" in line and "--trusted-key" in line


def test_cli_refuses_flags_the_data_or_preset_contradicts(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A recording's own rate is not silently overridden ...
    line = refused(capsys, [*small_build(small, "h.npz"), "--rate-hz", "500"])
    assert "h.npz" in line and "--rate-hz 500" in line and "1000 Hz" in line
    # ... flags a preset does not read are not silently dropped ...
    line = refused(capsys, [*small_build(small, "u.csv"), "--features", "univariate", "--season-samples", "24"])
    assert "--season-samples" in line and "--features univariate" in line
    line = refused(capsys, [*small_build(small, "u.csv"), "--features", "surprise", "--bands", "4"])
    assert "--bands" in line and "--features surprise" in line
    line = refused(capsys, [*small_build(small), "--slow-channels", "tmp"])
    assert "--slow-channels tmp" in line and "vib_x, temp" in line
    line = refused(capsys, [*small_build(small), "--hidden", "8"])
    assert "--hidden" in line and "autoencoder" in line
    line = refused(capsys, [*small_build(small), "--normal-value", "0"])
    assert "--normal-value needs --label-column" in line
    # ... nor a --samples the window cannot hold (a pydantic traceback naming the field inside it).
    line = refused(capsys, [*small_build(small, "u.csv"), "--features", "shape", "--samples", "5000"])
    assert "--samples 5000" in line and "--window of 128" in line
    line = refused(capsys, [*small_build(small, "u.csv"), "--features", "shape", "--window", "2000",
                            "--samples", "1500"])
    assert "--features shape" in line and "samples" in line
    # ... nor the learning knn's flags without --online (they were dropped: a model that never learns) ...
    for flag, value in (("--online-capacity", "500"), ("--online-merge", "0.2")):
        line = refused(capsys, [*small_build(small), "--kind", "knn", flag, value])
        assert f"{flag} is for --online" in line
    # ... nor CSV-only flags given with a recording (each was dropped, and the model trained on all of it).
    for flag, value in (("--rows", "0:1000"), ("--label-column", "label"), ("--time-column", "timestamp")):
        line = refused(capsys, [*small_build(small, "h.npz"), flag, value])
        assert "h.npz" in line and f"{flag} is for CSV files" in line
    # A calibration fraction that leaves (almost) nothing to fit was an ONNX-vs-scikit-learn NaN mismatch.
    line = refused(capsys, [*small_build(small), "--calibration-fraction", "0.99"])
    assert "--calibration-fraction 0.99 leaves 1 of 61 windows" in line


def test_cli_errors_say_what_is_wrong(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--normal-value that no row has said "no segment is as long as one window"; an unknown --features
    said "feature spec unreadable: No such file"."""
    line = refused(capsys, [*small_build(small), "--label-column", "label", "--normal-value", "7"])
    assert "h.csv" in line and "label column 'label'" in line and "'7'" in line and "values are '0'" in line
    assert "window" not in line
    line = refused(capsys, [*small_build(small), "--features", "bogus"])
    assert "--features 'bogus' is neither a preset (vibration, spectral, univariate, surprise, shape)" in line
    assert "FeatureSpec file" in line
    spec = small / "spec.json"
    spec.write_text('{"groups": 3}')
    line = refused(capsys, [*small_build(small), "--features", str(spec)])
    assert str(spec) in line and "not a JSON FeatureSpec" in line and "groups" in line


def test_a_spec_file_card_lists_only_the_channels_its_features_read(small: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A spec that reads vib_x alone listed every numeric column (vib_x, temp, label) as the card's
    channels, so the detector dropped every batch without temp or label as missing_channel; and a text
    cell in a column the spec does not read stopped the build."""
    spec = small / "vib-only.json"
    spec.write_text(json.dumps({"groups": [{"channels": ["vib_x"], "stats": ["rms", "peak", "kurtosis"]}]}))
    x = healthy(4000)
    status = ["ok"] * 4000
    status[0] = "1"  # numeric in the first row, so load_csv would take it for a channel
    data = small / "status.csv"
    data.write_text("vib_x,temp,status\n" + "\n".join(f"{a},{b},{c}" for (a, b), c in zip(x.T, status, strict=True))
                    + "\n")
    card_path = small / "out" / "artifacts" / "com.nucleus.TurbineModel" / "1.0.0" / "model_card.json"
    for argv in ([*small_build(small), "--features", str(spec)],
                 [*small_build(small, "status.csv"), "--features", str(spec)],
                 [*small_build(small), "--features", str(spec), "--channels", "temp,vib_x"]):
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["windows"] == 61
        card = load_card(card_path)
        assert card.channels == ["vib_x"]
        # The detector's windowing takes a stream that carries vib_x alone.
        w = Windower(list(card.channels), card.window, card.hop, card.sample_rate_hz)
        got = w.push({"seq": 0, "t0": 0.0, "rate_hz": 1000.0, "channels": ["vib_x"],
                      "data": x[:1, : card.window].astype(np.float32)})
        assert len(got) == 1 and not w.skipped


def test_cli_accepts_a_rate_that_matches_the_recording(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*small_build(small, "h.npz"), "--bands", "4", "--rate-hz", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 61
