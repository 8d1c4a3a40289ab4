"""Detection quality and per-window cost of the model builder + detector cores.

1. NAB realKnownCause subset (7 files, 19 windows), standard profile, NAB's scoring rules
   (earliest detection per window, scaled sigmoid, FP weight 0.11, probationary rows unscored) and
   the subset normalisation of ../shared/data/nab/README.md, printed next to the published anchors.
   First (run_nab_stream, the headline): every row streamed in order through the detector's own
   Windower -> LoadedModel.score -> AlarmState (likelihood alarm), model and card from the builder,
   trained on the probationary rows only; all parameters fixed before the first scored run.
   Then the earlier fixed-threshold setups for comparison. Per file: an IsolationForest on univariate
   window features, trained ONLY on the probationary
   rows (which NAB leaves to the detector to learn from; no label is used). Threshold = quantile of
   held-out probationary scores (builder default). The anchors used thresholds NAB swept over the
   whole corpus WITH the labels; we also print what the same sweep gives us, marked as label-tuned.
2. Gearbox (SpectraQuest): train on the first half of the healthy file at one load; test on the
   second half of every healthy file (every alarm is false) and on every broken-tooth file.
3. Cost per window: features (numpy, vs scipy.stats.kurtosis), scikit-learn vs onnxruntime scoring
   (fused tree ensemble; skl2onnx's default graph too), and a detector-like process's RSS.

    .venv/bin/python benchmarks/detection.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.anomaly.features import (  # noqa: E402
    CALENDAR_SECONDS,
    CalendarPeriod,
    FeatureExtractor,
    default_spec,
    spectral_spec,
)
from components.model_builder import data as datamod  # noqa: E402

if TYPE_CHECKING:
    from components.anomaly_detector.scoring import LoadedModel

# The builder (scikit-learn, onnxruntime) is imported inside the functions that need it: the RSS probe
# runs first, from a parent that has not mapped onnxruntime, because pages a parent shares cannot be
# paged out of the child and would make its RSS read higher than on a device.

SHARED = (REPO / ".." / "shared" / "data").resolve()
NAB_FILES = ["machine_temperature_system_failure", "ambient_temperature_system_failure",
             "cpu_utilization_asg_misconfiguration", "ec2_request_latency_system_failure", "nyc_taxi",
             "rogue_agent_key_hold", "rogue_agent_key_updown"]
ANCHORS = {"ARTime": 63.9, "Numenta HTM": 55.5, "Random Cut Forest": 43.1, "windowed Gaussian": 13.4}
STANDARD = {"tp": 1.0, "fp": 0.11, "fn": 1.0}
NAB_WINDOW_ROWS = 12  # feature window over the series (rows), fixed a priori
NAB_ZLAST_ROWS = 100  # rolling-standardisation window (rows), fixed a priori
# The streaming setups (run_nab_stream). All fixed before the first scored run, none from the labels:
NAB_SURPRISE_ROWS = 100  # rows over which zlast/zseason standardise (the previous setup's a-priori 100)
NAB_SEASON_S = 86_400.0  # one day: the season of human and machine activity (first principles, not fitted)
NAB_MIN_TRAIN_WINDOWS = 100  # use the season only if the probationary rows give this many training windows
NAB_TAIL = 1e-5  # nupic's red zone (anomaly_likelihood._filterLikelihoods redThreshold 0.99999)
# The knn setup (run_nab_knn, the headline). Every value compared on the synthetic development set of
# benchmarks/nab_dev.py only and fixed there (dev scores of the alternatives in docs/anomaly.md) before
# the NAB files were scored with it; the NAB labels chose nothing.
KNN_WINDOW = 8  # samples per window, the window's samples are the features (dev: 6 -> 61.0, 8 -> 64.9, 12 -> 65.6)
KNN_AVERAGING = 1  # scores averaged before the likelihood (dev: 1 -> 64.9, 3 -> 62.6)
KNN_MERGE = 0.5  # memory merge radius, x median calibration distance (dev: 0 and 0.5 both 64.9; 0.5 bounds memory)
KNN_TAIL = NAB_TAIL  # nupic's red zone, not compared
# Second declared setup (after the first NAB run, 52.1, which had none): the window's place in the day
# and the week as features (weight 1 = the standardized features' unit), each period only if the
# probationary rows span it once. Dev, product code, seeds 1-4: without 62.2, with 63.8 (prototype:
# weight 0 / 0.25 / 0.5 / 1 / 2 -> 64.4 / 64.1 / 66.6 / 68.0 / 63.4); held-out seeds 5-8: 64.8 -> 68.6.
KNN_CALENDAR: tuple[CalendarPeriod, ...] = ("day", "week")
# Third declared setup (after the second NAB run, 52.4): the second setup plus the level/spread-change
# stage (newest 16 rows against the 400 before them, its own likelihood at tail 1e-7) and re-arm after
# quiet instead of the one-window hold-off (after an alarm, none until 288 windows in a row had a tail
# >= 1e-3, except a red-zone window scoring above 2 x the disarming alarm's score). Chosen on the dev set
# only (benchmarks/nab_dev_blocks.py; of two finalists, the better on the choosing seeds 1-8: 72.4 + 73.2
# against 71.9 + 73.1 for a quiet of one day), with the bar set before any comparison (+3 over the second
# setup on seeds 1-4 and on held-out seeds 17-24): +8.6 on 1-4 (72.4 vs 63.8), +5.1 on 17-24 (74.2 vs
# 69.1). Product path, seeds 1-4: 72.4, equal to the prototype per kind and per seed.
KNN_SHIFT: tuple[int, int, float] = (16, 400, 1e-7)
KNN_REARM: tuple[float, int, float | None] = (1e-3, 288, 2.0)
GEAR_SPREAD_MARGIN = 10.0  # a priori "an order of magnitude beyond the healthy spread" (see docs/anomaly.md)
GEAR_RATE_HZ = 1000.0  # ASSUMED: the data do not state a sample rate (README); only used for "per hour"


# --- NAB ---------------------------------------------------------------------------------------

def scaled_sigmoid(x: float) -> float:
    return -1.0 if x > 3.0 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def nab_score(detections: np.ndarray, windows: list[tuple[int, int]], probation: int,
              cost: dict[str, float] = STANDARD) -> float:
    """NAB's sweeper scoring for one file: rows are detections (bool), windows inclusive row ranges."""
    score = 0.0
    found = [False] * len(windows)
    prev: tuple[int, int] | None = None
    w = 0
    for i in range(probation, len(detections)):
        while w < len(windows) and i > windows[w][1]:
            prev = windows[w]
            w += 1
        inside = w < len(windows) and windows[w][0] <= i <= windows[w][1]
        if not detections[i]:
            continue
        if inside:
            if not found[w]:
                left, right = windows[w]
                pos = -(right - i + 1) / (right - left + 1)
                score += cost["tp"] * scaled_sigmoid(pos) / scaled_sigmoid(-1.0)
                found[w] = True
        elif prev is None:
            score -= cost["fp"]
        else:
            width = prev[1] - prev[0] + 1
            score += cost["fp"] * scaled_sigmoid(abs(prev[1] - i) / (width - 1))
    return score - cost["fn"] * found.count(False)


def load_nab(name: str) -> tuple[list[str], np.ndarray, list[tuple[int, int]]]:
    path = SHARED / "nab" / "data" / "realKnownCause" / f"{name}.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    stamps = [r["timestamp"] for r in rows]
    values = np.array([float(r["value"]) for r in rows])
    index = {s: i for i, s in enumerate(stamps)}
    spans = json.loads((SHARED / "nab" / "labels" / "combined_windows.json").read_text())[f"realKnownCause/{name}.csv"]
    windows = [(index[a.split(".")[0]], index[b.split(".")[0]]) for a, b in spans]
    return stamps, values, windows


NAB_SETUPS: dict[str, tuple[str, int, list[str]]] = {
    # name: (model kind, window rows, univariate stats); both fixed before scoring, no per-file choice
    "level": ("isolation_forest", NAB_WINDOW_ROWS, ["mean", "std", "min", "max", "last", "trend", "zlast"]),
    "zlast": ("pca", NAB_ZLAST_ROWS, ["zlast"]),
}


def run_nab() -> None:
    from components.anomaly.features import FeatureSpec
    from components.model_builder.training import TrainParams, onnx_scores, session, train

    print("\n== NAB realKnownCause subset (standard profile) ==")
    print("per file, through the builder and the detector's feature code: a model trained on the probationary "
          "rows only (no label used); threshold = builder default, the 0.999 quantile of the held-out last 25 % "
          "of the probationary windows; a row is a detection when the window ending at it scores >= threshold")
    print(f"  level: IsolationForest(100) on {NAB_WINDOW_ROWS}-row windows of mean/std/min/max/last/trend/zlast "
          "(the previous setup)")
    print(f"  zlast: PCA on one feature, zlast over {NAB_ZLAST_ROWS}-row windows = how many of its own window's "
          "standard deviations the newest value lies from the window mean (a rolling standardisation: adapts "
          "to drift)")
    results: dict[str, tuple[float, float, float]] = {}
    for setup, (kind, rows, stats) in NAB_SETUPS.items():
        spec = FeatureSpec.model_validate({"groups": [{"channels": ["value"], "stats": stats}]})
        fx = FeatureExtractor(spec, ["value"], rows)
        total = 0.0
        n_windows = 0
        per_file: list[tuple[str, float, int, int]] = []
        raw_scores: dict[str, tuple[np.ndarray, list[tuple[int, int]], int]] = {}
        for name in NAB_FILES:
            _, values, windows = load_nab(name)
            n = len(values)
            probation = min(int(0.15 * n), 750)
            all_windows = sliding_window_view(values, rows)[:, None, :]  # window k ends at row k + rows - 1
            feats = fx.extract(all_windows)
            model = train(feats[: probation - rows + 1], TrainParams(kind=kind, seed=0))  # type: ignore[arg-type]
            scores = np.zeros(n)
            scores[rows - 1:] = onnx_scores(session(model.proto), feats)
            detections = scores >= model.threshold.value
            s = nab_score(detections, windows, probation)
            fp_rows = int(sum(1 for i in range(probation, n) if detections[i]
                              and not any(a <= i <= b for a, b in windows)))
            per_file.append((name, s, int(detections[probation:].sum()), fp_rows))
            raw_scores[name] = (scores / model.threshold.value, windows, probation)
            total += s
            n_windows += len(windows)
        print(f"\n  {setup}:")
        for name, s, det, fp in per_file:
            print(f"  {name:40s} raw {s:6.2f}   detections {det:5d}   outside windows {fp:5d}")
        null, perfect = -STANDARD["fn"] * n_windows, STANDARD["tp"] * n_windows
        ours = 100 * (total - null) / (perfect - null)
        # The anchors' thresholds were swept over the corpus with the labels; the same sweep for ours:
        best, best_t = -1e9, 0.0
        for t in np.linspace(0.5, 3.0, 51):
            s = sum(nab_score(sc >= t, w, p) for sc, w, p in raw_scores.values())
            if s > best:
                best, best_t = s, float(t)
        results[setup] = (ours, 100 * (best - null) / (perfect - null), best_t)
    print(f"\n  {'detector':34s} subset-normalised standard score")
    for k, v in ANCHORS.items():
        print(f"  {k:34s} {v:5.1f}   (published, label-swept threshold)")
    for setup, (ours, swept, best_t) in results.items():
        print(f"  {'ours, ' + setup + ', training-only threshold':34s} {ours:5.1f}   <- the honest figure")
        print(f"  {'ours, ' + setup + ', label-swept':34s} {swept:5.1f}   (threshold x{best_t:.2f}; uses test "
              "labels, like the anchors)")
    goal = ANCHORS["Numenta HTM"]
    best_setup = max(results, key=lambda k: results[k][0])
    print(f"  goal > {goal} (Numenta HTM): {'MET' if results[best_setup][0] > goal else 'NOT MET'} with a "
          "training-only threshold")


def report_file(name: str, flags: np.ndarray, windows: list[tuple[int, int]], probation: int, extra: str = "") -> float:
    """Score one file's alarm flags, print its line, return the raw NAB score."""
    s = nab_score(flags, windows, probation)
    fp_rows = int(sum(1 for i in range(probation, len(flags)) if flags[i] and not any(a <= i <= b for a, b in windows)))
    found = sum(1 for a, b in windows if flags[a:b + 1].any())
    print(f"  {name:40s} raw {s:6.2f}   alarms {int(flags[probation:].sum()):4d}   outside windows {fp_rows:4d}"
          f"   windows found {found}/{len(windows)}{extra}")
    return s


def print_anchors() -> None:
    print(f"\n  {'detector':44s} subset-normalised standard score")
    for k, v in ANCHORS.items():
        print(f"  {k:44s} {v:5.1f}   (published, label-swept threshold)")


def load_stamps_step(stamps: list[str], rows: int) -> float:
    """Median step in seconds over the first ``rows`` timestamps (the probationary rows)."""
    from datetime import datetime

    t = [datetime.fromisoformat(x).timestamp() for x in stamps[:rows]]
    return float(np.median(np.diff(t)))


def stream_file(values: np.ndarray, card_model: object, alarm: object, rate_hz: float,
                tails: np.ndarray | None = None, times: np.ndarray | None = None,
                scores: np.ndarray | None = None) -> np.ndarray:
    """Row by row through the detector's own pure modules: Windower (one-sample batches, in order),
    LoadedModel.score (features + ONNX), AlarmState.update. Returns the alarm flag per row (the
    window ending at that row); rows before the first full window never alarm. No look-ahead: each
    row's decision is made before the next row is pushed. ``tails`` (if given, NaN-filled) receives
    each window's tail probability (likelihood mode); ``times`` = each row's epoch seconds (else i / rate);
    ``scores`` (likewise) each window's final score, what the alarm stage was given."""
    from components.anomaly_detector.asset import AssetState
    from components.anomaly_detector.scoring import LoadedModel
    from components.anomaly_detector.windowing import Windower

    assert isinstance(card_model, LoadedModel) and isinstance(alarm, AssetState)
    card = card_model.card
    w = Windower(list(card.channels), card.window, card.hop, card.sample_rate_hz)
    flags = np.zeros(len(values), dtype=bool)
    x = values.astype(np.float32)
    for i in range(len(values)):
        t0 = float(times[i]) if times is not None else i / rate_hz
        out = w.push({"seq": i, "t0": t0, "rate_hz": rate_hz, "channels": card.channels,
                      "data": x[i:i + 1].reshape(1, 1)})
        for win in out:
            scored = card_model.score(win.data[None], np.array([win.t_end]))
            judged = alarm.judge(float(scored.scores[0]), scored.features[0], win.data, win.follows)
            decision = judged.decision
            flags[i] = decision.alarm
            if scores is not None:
                scores[i] = judged.score
            if tails is not None and decision.tail is not None:
                tails[i] = decision.tail
    return flags


def alarms_at(tails: np.ndarray, level: float, holdoff: int) -> np.ndarray:
    """The alarms AlarmState would have raised at another tail level, from the recorded tails (the
    likelihood's estimate does not depend on the level): enter the red zone, outside the hold-off."""
    flags = np.zeros(len(tails), dtype=bool)
    was, since = False, -1
    for i in np.flatnonzero(~np.isnan(tails)):
        anomalous = bool(tails[i] < level)
        alarm = anomalous and not was and not (0 <= since < holdoff)
        was = anomalous
        since = 0 if alarm else since + 1 if since >= 0 else -1
        flags[i] = alarm
    return flags


def run_nab_stream() -> dict[str, float]:
    """The detector as deployed: builder-trained model per file + the card's alarm policy, streamed."""
    from components.anomaly.features import surprise_spec
    from components.anomaly_detector.asset import AssetState
    from components.anomaly_detector.scoring import LoadedModel
    from components.model_builder.package import make_card
    from components.model_builder.training import TrainParams, session, train

    print("\n== NAB realKnownCause subset, streamed through the detector's modules (standard profile) ==")
    print("per file: PCA trained by the builder on the probationary rows only (first 75 % of their windows fit, "
          "last 25 % held out for the likelihood prior); then every row, in order, through Windower -> features "
          "-> ONNX score -> AlarmState (likelihood: 10-window average, normal re-fitted every 100 windows on the "
          f"last 8640, alarm on entering tail < {NAB_TAIL:g}, hold-off one feature window). A row is a detection "
          "when its window raises an alarm. All parameters fixed before the first scored run.")
    print(f"  season: zlast + zseason with a season of one day (rows per day from the timestamps), window = "
          f"season + {NAB_SURPRISE_ROWS} rows; only if the probationary rows give >= {NAB_MIN_TRAIN_WINDOWS} "
          f"training windows, else zlast over {NAB_SURPRISE_ROWS} rows  <- PRIMARY (declared before scoring)")
    print(f"  plain:  zlast over {NAB_SURPRISE_ROWS} rows, same alarm policy (for attribution: what the season adds)")
    results: dict[str, float] = {}
    for setup in ("season", "plain"):
        total, n_windows = 0.0, 0
        print(f"\n  {setup}:")
        for name in NAB_FILES:
            stamps, values, windows = load_nab(name)
            n = len(values)
            probation = min(int(0.15 * n), 750)
            step = load_stamps_step(stamps, probation)
            season = round(NAB_SEASON_S / step)
            rows = season + NAB_SURPRISE_ROWS
            if setup == "plain" or probation - rows + 1 < NAB_MIN_TRAIN_WINDOWS:
                season, rows = 0, NAB_SURPRISE_ROWS
            spec = surprise_spec("value", season=season)
            fx = FeatureExtractor(spec, ["value"], rows)
            train_windows = sliding_window_view(values[:probation], rows)[:, None, :]
            model = train(fx.extract(train_windows), TrainParams(kind="pca", seed=0, alarm_mode="likelihood",
                                                                 tail_probability=NAB_TAIL, holdoff_windows=rows))
            card = make_card(model, component="bench.Nab", version="1.0.0", channels=["value"], spec=spec,
                             window=rows, hop=1, rate_hz=1.0 / step, sources=[name], rows=probation)
            loaded = LoadedModel(card, session(model.proto), "bench", Path(name))
            flags = stream_file(values, loaded, AssetState.start(loaded), 1.0 / step)
            total += report_file(name, flags, windows, probation, f"   season {season:3d} rows, window {rows}")
            n_windows += len(windows)
        null, perfect = -STANDARD["fn"] * n_windows, STANDARD["tp"] * n_windows
        results[setup] = 100 * (total - null) / (perfect - null)
        print(f"  subset-normalised standard score: {results[setup]:.1f}")
    print_anchors()
    print(f"  {'ours, streamed, season (primary)':44s} {results['season']:5.1f}   <- no label, no sweep")
    print(f"  {'ours, streamed, plain':44s} {results['plain']:5.1f}   (attribution)")
    goal = ANCHORS["Numenta HTM"]
    print(f"  goal > {goal} (Numenta HTM): {'MET' if results['season'] > goal else 'NOT MET'} (primary setup)")
    return results


def knn_flags(values: np.ndarray, probation: int, times: np.ndarray, tails: np.ndarray | None = None,
              scores: np.ndarray | None = None, *, third: bool = True) -> np.ndarray:
    """One series through the builder (knn on the probationary windows, online learning on) and the
    detector's own modules, streamed row by row; the alarm flag per row (and the tails and final scores,
    if asked). ``times``: each row's epoch seconds (the calendar features' clock). ``third``: the third
    declared setup (shift stage + re-arm after quiet), else the second."""
    from components.anomaly_detector.asset import AssetState

    loaded = knn_model(values, probation, times, KNN_SHIFT if third else None, KNN_REARM if third else None)
    rate_hz = loaded.card.sample_rate_hz
    assert rate_hz is not None  # knn_model sets it from the timestamps
    return stream_file(values, loaded, AssetState.start(loaded), rate_hz, tails, times, scores)


def knn_model(values: np.ndarray, probation: int, times: np.ndarray,
              shift: tuple[int, int, float] | None = None,
              rearm: tuple[float, int, float | None] | None = None) -> LoadedModel:
    """The declared knn setup's model for one series, built by the builder from its probationary rows.
    ``shift`` = (recent, history, tail): a variant with the level/spread-change stage; ``rearm`` = (quiet
    tail, quiet windows, exception ratio): re-arm after quiet instead of the fixed hold-off alone (both
    compared on the development set by benchmarks/nab_dev_variants.py and nab_dev_blocks.py)."""
    from components.anomaly.features import shape_spec
    from components.anomaly_detector.scoring import LoadedModel
    from components.model_builder.package import make_card
    from components.model_builder.training import TrainParams, session, train

    step_s = float(np.median(np.diff(times[:probation])))
    # A period the training rows do not span once cannot be learnt (a day of data says nothing about Tuesdays)
    span = float(times[probation - 1] - times[0])
    calendar = tuple(c for c in KNN_CALENDAR if CALENDAR_SECONDS[c] <= span)
    spec = shape_spec("value", samples=KNN_WINDOW, calendar=calendar)
    fx = FeatureExtractor(spec, ["value"], KNN_WINDOW)
    train_windows = sliding_window_view(values[:probation], KNN_WINDOW)[:, None, :]
    model = train(fx.extract(train_windows, times[KNN_WINDOW - 1:probation]), TrainParams(
        kind="knn", seed=0, alarm_mode="likelihood", tail_probability=KNN_TAIL, holdoff_windows=KNN_WINDOW,
        averaging_windows=KNN_AVERAGING, online=True, online_exclude_windows=KNN_WINDOW - 1,
        online_merge_fraction=KNN_MERGE, unscaled=tuple(spec.unscaled()),
        shift=None if shift is None else shift[:2], shift_tail=1e-7 if shift is None else shift[2], rearm=rearm))
    card = make_card(model, component="bench.Nab", version="1.0.0", channels=["value"], spec=spec, window=KNN_WINDOW,
                     hop=1, rate_hz=1.0 / step_s, sources=["nab"], rows=probation)
    return LoadedModel(card, session(model.proto), "bench", Path("nab"))


def tail_sweeps(recorded: list[tuple[np.ndarray, list[tuple[int, int]], int]]) -> tuple[float, float, list[float]]:
    """NAB's threshold sweep, on the recorded tails: leave-one-file-out (no file's own labels choose its
    level) and over all files (what the anchors did, own labels included). Subset-normalised."""
    levels = [float(v) for v in 10.0 ** -np.linspace(2, 12, 41)]
    raw = np.array([[nab_score(alarms_at(t, lv, KNN_WINDOW), w, p) for lv in levels] for t, w, p in recorded])
    n_windows = sum(len(w) for _, w, _ in recorded)

    def norm(total: float) -> float:
        return 100 * (total + STANDARD["fn"] * n_windows) / ((STANDARD["tp"] + STANDARD["fn"]) * n_windows)

    chosen: list[float] = []
    lofo = 0.0
    for f in range(len(recorded)):
        others = raw[np.arange(len(recorded)) != f].sum(axis=0)
        best = int(np.argmax(others))
        chosen.append(levels[best])
        lofo += raw[f, best]
    return norm(lofo), norm(float(raw.sum(axis=0).max())), chosen


def run_nab_knn(dev: bool) -> float:
    """The knn setups on the synthetic development set (dev) or on the seven NAB files: the third declared
    setup (the headline), then the second (52.4 on NAB when it was scored; deterministic, so a check here)."""
    import benchmarks.nab_dev as nab_dev

    title = "synthetic development set (benchmarks/nab_dev.py)" if dev else "NAB realKnownCause subset"
    print(f"\n== {title}: knn with online learning, streamed through the detector's modules (standard profile) ==")
    print(f"per series: features = the newest {KNN_WINDOW} values and the place in the day and week (a period only if "
          "the probationary rows span it); the builder's knn model on the probationary windows (75 % prototypes, "
          "25 % calibration: the likelihood prior); every row in order through Windower -> features -> ONNX distance "
          "to the nearest prototype -> min with the distance to the nearest window the detector has already seen "
          f"(memory: a window enters {KNN_WINDOW - 1} windows later, merge radius {KNN_MERGE} x median calibration "
          f"distance) -> likelihood alarm (averaging {KNN_AVERAGING}, tail < {KNN_TAIL:g}).")
    print(f"  third declared setup (PRIMARY): + shift stage (newest {KNN_SHIFT[0]} rows vs the {KNN_SHIFT[1]} before, "
          f"tail < {KNN_SHIFT[2]:g}) + re-arm after quiet ({KNN_REARM[1]} windows with tail >= {KNN_REARM[0]:g}; "
          f"exception above {KNN_REARM[2]:g} x the disarming score; hold-off {KNN_WINDOW} windows)")
    print(f"  second declared setup: hold-off {KNN_WINDOW} windows, no shift stage, no re-arm")
    print("All values fixed on the development set before NAB was scored with them.")
    series: list[tuple[str, np.ndarray, list[tuple[int, int]], int, np.ndarray]] = []
    if dev:  # synthetic rows start at the epoch, one step apart
        series = [(n, v, w, p, np.arange(len(v)) * float(st)) for n, v, w, p, st in nab_dev.devset()]
    else:
        from datetime import UTC, datetime

        for name in NAB_FILES:
            stamps, values, windows = load_nab(name)
            probation = min(int(0.15 * len(values)), 750)
            times = np.array([datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() for t in stamps])
            series.append((name, values, windows, probation, times))
    null = -STANDARD["fn"] * sum(len(w) for _, _, w, _, _ in series)
    perfect = STANDARD["tp"] * sum(len(w) for _, _, w, _, _ in series)
    results: dict[str, float] = {}
    recorded: list[tuple[np.ndarray, list[tuple[int, int]], int]] = []
    for setup in ("third", "second"):
        print(f"\n  {setup} declared setup{' (primary)' if setup == 'third' else ''}:")
        total = 0.0
        for name, values, windows, probation, times in series:
            tails = np.full(len(values), np.nan)
            flags = knn_flags(values, probation, times, tails, third=setup == "third")
            if setup == "second":
                assert (alarms_at(tails, KNN_TAIL, KNN_WINDOW) == flags).all()  # the replay below is faithful
                recorded.append((tails, windows, probation))
            total += report_file(name, flags, windows, probation)
        results[setup] = 100 * (total - null) / (perfect - null)
        print(f"  subset-normalised standard score: {results[setup]:.1f}")
    if not dev:
        lofo, swept, chosen = tail_sweeps(recorded)
        print_anchors()
        print(f"  {'ours, third declared setup (primary)':44s} {results['third']:5.1f}   <- no label, no sweep")
        print(f"  {'ours, second declared setup':44s} {results['second']:5.1f}   (its one NAB run gave 52.4)")
        print(f"  {'second, tail level swept leave-one-file-out':44s} {lofo:5.1f}   (each file scored at the level "
              f"best on the other six files' labels: {', '.join(f'{c:.0e}' for c in chosen)})")
        print(f"  {'second, tail level swept on all seven':44s} {swept:5.1f}   (uses the scored files' own labels, as "
              "the anchors' sweeps did; not a result, the ceiling of that detector)")
        goal = ANCHORS["Numenta HTM"]
        print(f"  goal > {goal} (Numenta HTM): {'MET' if results['third'] > goal else 'NOT MET'} (primary setup)")
    return results["third"]


# --- gearbox -----------------------------------------------------------------------------------

def gear(name: str) -> np.ndarray:
    ds = datamod.load_csv(SHARED / "gearbox_fault_diagnosis" / f"{name}.csv.gz")
    return ds.segments[0]


def run_gearbox(window: int, hop: int, kinds: list[str], spread_margin: float) -> None:
    from components.model_builder.training import TrainParams, onnx_scores, session, train

    print(f"\n== Gearbox: healthy vs broken tooth (window {window}, hop {hop}, 'spectral' features: log10 of "
          "16 relative band energies per channel) ==")
    print(f"false alarms per hour assume {GEAR_RATE_HZ:.0f} Hz (NOT stated by the data); "
          f"at hop {hop} one hour = {3600 * GEAR_RATE_HZ / hop:.0f} windows")
    print(f"threshold = median + {spread_margin:g} x (0.999 quantile - median) of the held-out last 25 % of the "
          "training half; the same K for every model and load, fixed before testing other loads")
    print("test: healthy = second half at the training load, the whole file at other loads (every alarm false);"
          " broken = the whole broken-tooth file at each load")
    print("gap columns: highest healthy and lowest broken score in units of (0.999 quantile - median): "
          "any K between them separates that load")
    channels = ["a1", "a2", "a3", "a4"]
    loads = ["0", "50", "90"]
    data = {f"{c}{load}": gear(f"{c}30hz{load}") for c in "hb" for load in loads}
    fx = FeatureExtractor(spectral_spec(channels, bands=16, slow=()), channels, window)

    def feats(x: np.ndarray) -> np.ndarray:
        return fx.extract(datamod.windows(datamod.Dataset(channels, [x], None, []), window, hop))

    verdicts: list[str] = []
    for kind in kinds:
        for train_load in loads:
            h = data[f"h{train_load}"]
            half = h.shape[1] // 2
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = train(feats(h[:, :half]), TrainParams(kind=kind, seed=0,  # type: ignore[arg-type]
                                                              spread_margin=spread_margin))
            sess = session(model.proto)
            thr = model.threshold.value
            med = model.score_scale.median
            unit = (thr - med) / spread_margin
            print(f"\n  {kind}, trained on healthy {train_load}% load (first half), threshold {thr:.4g}")
            print(f"  {'test load':>9s} {'healthy win':>11s} {'false al.':>9s} {'FA/h':>7s} {'broken win':>10s} "
                  f"{'recall':>7s} {'precision':>9s} {'F1':>6s} {'AUC':>6s} {'gap: h max':>10s} {'b min':>6s}")
            all_ok = True
            for load in loads:
                hh = data[f"h{load}"]
                healthy_test = hh[:, half:] if load == train_load else hh
                sh = onnx_scores(sess, feats(healthy_test))
                sb = onnx_scores(sess, feats(data[f"b{load}"]))
                fa = int((sh >= thr).sum())
                tp = int((sb >= thr).sum())
                recall = tp / len(sb)
                precision = tp / (tp + fa) if tp + fa else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                auc = float((sb[:, None] > sh[None, :]).mean() + 0.5 * (sb[:, None] == sh[None, :]).mean())
                hours = len(sh) * hop / GEAR_RATE_HZ / 3600
                fa_h = fa / hours
                all_ok &= fa == 0 and recall > 0.5
                print(f"  {load + '%':>9s} {len(sh):11d} {fa:9d} {fa_h:7.0f} {len(sb):10d} {recall:7.3f} "
                      f"{precision:9.3f} {f1:6.3f} {auc:6.3f} {(sh.max() - med) / unit:10.2f} "
                      f"{(sb.min() - med) / unit:6.2f}")
            verdicts.append(f"{kind} trained at {train_load}%: {'MET' if all_ok else 'NOT MET'}")
            print(f"  goal (separated at every load, < 1 FA/h): {'MET on this data' if all_ok else 'NOT MET'}"
                  + ("; zero false alarms in the healthy windows above, which at the assumed rate are minutes, "
                     "not hours, of data" if all_ok else ""))
    print("\n  summary: " + "; ".join(verdicts))


# --- cost per window ---------------------------------------------------------------------------

def per_call(f: Callable[[], object], n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def run_costs(quick: bool) -> None:
    from scipy import stats  # type: ignore[import-untyped]

    from components.model_builder import onnx_export
    from components.model_builder.training import TrainParams, onnx_scores, session, train

    print("\n== Cost per window (one core, batch of 1) ==")
    rng = np.random.default_rng(0)
    reps = 300 if quick else 2000
    for chans, label in ((["a1", "a2", "a3"], "1024 x 3, stats only"), (["a1", "a2", "a3", "a4"],
                                                                         "1024 x 4, stats + 8 bands")):
        spec = default_spec(chans, bands=0 if len(chans) == 3 else 8, slow=())
        if len(chans) == 3:
            from components.anomaly.features import ChannelGroup, FeatureSpec
            spec = FeatureSpec(groups=[ChannelGroup(channels=chans, stats=["rms", "peak", "crest", "kurtosis",
                                                                           "skewness"])])
        fx = FeatureExtractor(spec, chans, 1024)
        w = rng.standard_normal((len(chans), 1024)).astype(np.float32)
        print(f"  features {label:28s} {per_call(partial(fx.extract, w), reps):8.1f} us")
    w3 = rng.standard_normal((3, 1024))
    print(f"  scipy.stats.kurtosis alone, 1024 x 3        {per_call(lambda: stats.kurtosis(w3, axis=1), reps):8.1f} us")
    x = rng.standard_normal((4000, 44)).astype(np.float32)
    one = x[:1]
    print(f"\n  {'model':28s} {'scikit-learn':>12s} {'onnxruntime':>12s} {'speed-up':>9s} {'ONNX nodes':>10s}")
    for kind in ("isolation_forest", "pca", "autoencoder"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = train(x, TrainParams(kind=kind, max_iter=100))
        sess = session(m.proto)
        sk = per_call(partial(m.reference, one), 50 if kind == "isolation_forest" else reps)
        ox = per_call(partial(onnx_scores, sess, one), reps)
        print(f"  {kind:28s} {sk:10.1f}us {ox:10.1f}us {sk / ox:8.0f}x {len(m.proto.graph.node):10d}")
        if kind == "isolation_forest":
            default = onnx_export.skl2onnx_isolation_forest(m.estimator, x.shape[1])
            import onnxruntime as ort  # type: ignore[import-untyped]

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            s2 = ort.InferenceSession(default.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            name = s2.get_inputs()[0].name
            t_def = per_call(partial(s2.run, None, {name: one}), 200 if quick else 1000)
            print(f"  {'  (skl2onnx default graph)':28s} {sk:10.1f}us {t_def:10.1f}us {sk / t_def:8.0f}x "
                  f"{len(default.graph.node):10d}")
            goal = sk / ox >= 30
            print(f"  goal: onnxruntime >= 30x faster than scikit-learn for IsolationForest: "
                  f"{'MET' if goal else 'NOT MET'} ({sk / ox:.0f}x)")


RSS_PROBE = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import numpy as np
from components.anomaly import signing
from components.anomaly_detector import memory, service  # the whole detector module graph
from components.anomaly_detector.scoring import load_model


def split():  # resident MB in file-backed mappings (libraries) and in anonymous memory (heap, objects)
    out = {{"file": 0, "anon": 0}}
    kind = "anon"
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            kind = "file" if len(head) > 5 and head[5].startswith("/") else "anon"
        elif head and head[0] == "Rss:":
            out[kind] += int(head[1]) / 1024
    return out["file"], out["anon"]


d = Path({model_dir!r})
imported = memory.rss_mb()
m = load_model(d, component={name!r}, version="1.0.0", trusted=signing.trusted_key_map([{pub!r}]))
w = np.random.default_rng(0).standard_normal((8, len(m.card.channels), m.card.window)).astype(np.float32)
for _ in range(200):
    m.score(w)
loaded = memory.rss_mb()
f0, a0 = split()
r = memory.release()
for _ in range(2000):  # steady state: whatever scoring needs comes back in
    m.score(w)
    m.score(w[:1])
f1, a1 = split()
print(imported, loaded, f0, a0, r.rss_after_mb, memory.rss_mb(), f1, a1, r.mappings,
      "sklearn" in sys.modules, "scipy" in sys.modules)
"""


def make_rss_model(out: Path) -> None:
    """Child process: build the probe's model so the benchmark process never maps the builder."""
    from components.anomaly import signing
    from components.model_builder.package import make_card, write_package
    from components.model_builder.training import TrainParams, train

    channels = ["vib_x", "vib_y", "vib_z", "temp"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 60_000))
    ds = datamod.Dataset(channels, [x], 1000.0, ["noise"])
    spec = default_spec(channels)
    feats = FeatureExtractor(spec, channels, 1024).extract(datamod.windows(ds, 1024, 256))
    model = train(feats, TrainParams())
    card = make_card(model, component="bench.Model", version="1.0.0", channels=channels, spec=spec, window=1024,
                     hop=256, rate_hz=1000.0, sources=["noise"], rows=ds.rows)
    key, _ = signing.load_or_create_key(out / "k")
    pkg = write_package(model, card, out, key)
    (out / "probe.json").write_text(json.dumps({"model_dir": str(pkg.model_dir), "pub": pkg.public_key}))


def run_rss() -> None:
    print("\n== Detector process footprint ==")
    if "onnxruntime" in sys.modules:
        print("  (this process has onnxruntime mapped: the probe's RSS will read high; run --only rss)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--make-rss-model", tmp], check=True)
        probe = json.loads((Path(tmp) / "probe.json").read_text())
        code = RSS_PROBE.format(repo=str(REPO), model_dir=probe["model_dir"], name="bench.Model", pub=probe["pub"])
        runs = {"shared": subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.split()}
        # Page-out skips pages another process maps too (tests or benchmarks of others on this machine
        # import onnxruntime from the same venv). On a device only the detector maps onnxruntime and
        # cryptography: private copies of those two packages reproduce that here.
        private = Path(tmp) / "private"
        import importlib.util

        for pkg in ("onnxruntime", "cryptography"):
            spec = importlib.util.find_spec(pkg)
            assert spec is not None and spec.origin is not None
            shutil.copytree(Path(spec.origin).parent, private / pkg)
        env = dict(os.environ, PYTHONPATH=str(private))
        runs["private"] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                         env=env).stdout.split()
    print("  a process with the detector's whole module graph, a 100-tree IsolationForest (44 features) loaded, "
          "scoring batches of 8 and 1 windows of 1024 x 4")
    for label, out in runs.items():
        imported, loaded, f0, a0, released, steady, f1, a1 = (float(v) for v in out[:8])
        mappings, has_sklearn, has_scipy = int(out[8]), out[9] == "True", out[10] == "True"
        where = ("mapped by this process only (as on a device)" if label == "private"
                 else "from the shared venv (other processes may map them)")
        print(f"\n  onnxruntime + cryptography {where}:")
        print(f"  {'RSS after imports':52s} {imported:6.1f} MB")
        print(f"  {'RSS after load + warm-up + 200 batches':52s} {loaded:6.1f} MB  (libraries {f0:.1f}, "
              f"anonymous {a0:.1f})")
        print(f"  {'right after memory.release() (trim + page-out)':52s} {released:6.1f} MB  ({mappings} mappings)")
        print(f"  {'steady state: 4000 more scoring calls after it':52s} {steady:6.1f} MB  (libraries {f1:.1f}, "
              f"anonymous {a1:.1f})")
        print(f"  goal < 70 MB: {'MET' if steady < 70 else 'NOT MET'} in steady state with releaseMemoryAfterLoad "
              f"(default); {'MET' if loaded < 70 else 'NOT MET'} without it ({loaded:.1f} MB)")
    print(f"  scikit-learn imported: {has_sklearn}; scipy imported: {has_scipy}")
    print("  (the component on a daemon also runs its IPC client and event loop: measure it with the pipeline "
          "benchmark)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, IsolationForest only on gearbox")
    parser.add_argument("--only", choices=["nab", "nab-knn", "nab-dev", "nab-stream", "gearbox", "cost", "rss"])
    parser.add_argument("--make-rss-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_rss_model:
        make_rss_model(args.make_rss_model)
        return 0
    if args.only == "nab-stream":
        run_nab_stream()
        return 0
    if args.only == "nab-dev":
        run_nab_knn(dev=True)
        return 0
    if args.only == "nab-knn":
        run_nab_knn(dev=False)
        return 0
    if args.only in (None, "rss"):  # first: see make_rss_model
        run_rss()
    if not SHARED.is_dir() and args.only in (None, "nab", "gearbox"):
        print(f"shared data not found at {SHARED}; skipping NAB and gearbox")
    else:
        if args.only in (None, "nab"):
            run_nab_knn(dev=True)
            run_nab_knn(dev=False)
            run_nab_stream()
            run_nab()
        if args.only in (None, "gearbox"):
            run_gearbox(1024, 256, ["pca"] if args.quick else ["pca", "isolation_forest", "autoencoder"],
                        GEAR_SPREAD_MARGIN)
    if args.only in (None, "cost"):
        run_costs(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
