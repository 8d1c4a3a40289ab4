"""Two ideas from the design of ARTime (the NAB leader) on the declared NAB knn setup, compared on the
synthetic development set only (the ideas from its public description; none of its code).

- A file-relative time scale, alone (not united with the fine one, as the earlier ``coarse`` prototype
  was): the stream is cut into blocks of k = max(1, round(P / (8 * 13))) rows (P = the probationary rows,
  so probation holds about 13 windows of 8 blocks whatever the sample period) and the declared knn (same
  builder, run-time memory, calendar, likelihood alarm) runs on windows of blocks. A block's value is its
  mean (``bmean``) or spike-preserving (``bspike``): the block's max or min, whichever is farther from the
  average of the previous 8 block means, unless that extreme is within 10 % of the block mean's magnitude
  (then the mean). Online: a block window is scored when its last row arrives, and an alarm is that row's.
- Re-arm only after quiet instead of a fixed hold-off: after an alarm, no new alarm until no window's tail
  probability has been below q for Q windows in a row, unless a window in the red zone scores more than
  c x the score of the alarm that disarmed it (then it alarms and becomes the new reference). The
  declared one-window hold-off still applies to that exception. Why: a spiky normal rings for a while
  after an alarm, and a fixed hold-off is either too short for that or too long for the next event.
- ``chomp``: values within b x the training spread of the median of the previous 32 rows are set to that
  median before anything else (denoising, so the knn compares structure, not noise).
- ``union``: the block variant's row alarms OR-ed with the declared setup's, with the declared hold-off
  (to be tried only if the block scale alone were promising; it was not: 47.7 against 63.8).
- ``shift-m-h-tail``: nab_dev_variants' shift stage (the previous finalists') with its alarms taken by the
  same re-arm rule (only while armed; the quiet and the exception are the knn's), or a fixed hold-off.

Variant names: a base (``declared``, ``bmean8``, ``bspike12-nocal``, ...) with modifiers joined by ``+``:
``rearm-q-Q-c`` (Q ``day`` = one day of windows, c ``inf`` = no exception), ``hold-day``, ``shift-m-h-tail``,
``chomp-b``, ``union``. Finalists, chosen on seeds 1-8 before seeds 17-24 were generated:
``declared+shift-16-400-1e-7+rearm-0.001-288-2`` and ``declared+shift-16-400-1e-7+rearm-0.001-day-2``.

Reuses nab_dev_variants' Prepared/Memory/knn_scores/alarm machinery (``declared`` there reproduces the
product's 63.8 on seeds 1-4). NAB's files are not read.

    .venv/bin/python benchmarks/nab_dev_blocks.py [--seeds 1,2,3,4] [--variants declared,bspike8]
    .venv/bin/python benchmarks/nab_dev_blocks.py --seeds 17,18,19,20,21,22,23,24 --variants declared,\
        declared+shift-16-400-1e-7+rearm-0.001-288-2,declared+shift-16-400-1e-7+rearm-0.001-day-2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.nab_dev as nab_dev
from benchmarks.detection import (
    KNN_AVERAGING,
    KNN_CALENDAR,
    KNN_MERGE,
    KNN_TAIL,
    KNN_WINDOW,
    nab_score,
)
from benchmarks.nab_dev_variants import (
    Prepared,
    alarm_stream,
    holdoff_merge,
    knn_scores,
    normalised,
    shift_stat,
)
from components.anomaly.alarm import AlarmParams, AlarmState
from components.anomaly.features import CALENDAR_SECONDS

WINDOWS_IN_PROBATION = 13
RUNNING_BLOCKS = 8  # the spike-preserving rule's running average: the previous 8 block means
SPIKE_BAND = 0.1  # an extreme within 10 % of the block mean's magnitude is not a spike
CHOMP_ROWS = 32


@dataclasses.dataclass
class Series:
    name: str
    kind: str
    values: np.ndarray
    windows: list[tuple[int, int]]
    probation: int
    step: int


@dataclasses.dataclass
class Scale:
    """A knn over windows of ``w`` blocks of ``k`` rows; window j alarms at row (j + w) * k - 1."""

    prep: Prepared
    k: int
    w: int


def block_size(probation: int, w: int = KNN_WINDOW) -> int:
    return max(1, round(probation / (w * WINDOWS_IN_PROBATION)))


def blocks(values: np.ndarray, k: int, spike: bool, band: float | None = None) -> np.ndarray:
    """Block means, or spike-preserving values; ``band`` (scale-free rule): an extreme is a spike only if it
    is more than ``band`` from the block mean (in the series' units: 0.1 x the training spread)."""
    nb = len(values) // k
    b = values[: nb * k].reshape(nb, k)
    means: np.ndarray = b.mean(axis=1)
    if not spike or k == 1:
        return means
    out = means.copy()
    for i in range(nb):
        ra = means[max(0, i - RUNNING_BLOCKS): i].mean() if i > 0 else means[0]
        hi, lo = b[i].max(), b[i].min()
        ext = hi if abs(hi - ra) >= abs(lo - ra) else lo
        if abs(ext - means[i]) > (SPIKE_BAND * abs(means[i]) if band is None else band):
            out[i] = ext
    return np.asarray(out, dtype=np.float64)


def chomp(values: np.ndarray, probation: int, band: float) -> np.ndarray:
    """Values within band x the training spread of the median of the previous CHOMP_ROWS rows -> that median."""
    x = values.astype(np.float64).copy()
    med = np.median(sliding_window_view(values.astype(np.float64), CHOMP_ROWS), axis=1)[:-1]  # rows m.. use m-32..m-1
    b = band * float(np.std(values[:probation]))
    idx = np.arange(CHOMP_ROWS, len(x))
    near = np.abs(x[idx] - med) < b
    x[idx[near]] = med[near]
    return x


def build(name: str, kind: str, values: np.ndarray, windows: list[tuple[int, int]], probation: int,
          times: np.ndarray, w: int, calendar: bool) -> Prepared:
    """The builder's knn (as detection.knn_model) over windows of w samples, calendar optional."""
    from components.anomaly.features import FeatureExtractor, shape_spec
    from components.anomaly_detector.scoring import LoadedModel
    from components.model_builder.package import make_card
    from components.model_builder.training import TrainParams, session, train

    step_s = float(np.median(np.diff(times[:probation])))
    span = float(times[probation - 1] - times[0])
    cal = tuple(c for c in KNN_CALENDAR if CALENDAR_SECONDS[c] <= span) if calendar else ()
    spec = shape_spec("value", samples=w, calendar=cal)
    fx = FeatureExtractor(spec, ["value"], w)
    train_windows = sliding_window_view(values[:probation].astype(np.float32), w)[:, None, :]
    model = train(fx.extract(train_windows, times[w - 1:probation]), TrainParams(
        kind="knn", seed=0, alarm_mode="likelihood", tail_probability=KNN_TAIL, holdoff_windows=w,
        averaging_windows=KNN_AVERAGING, online=True, online_exclude_windows=w - 1,
        online_merge_fraction=KNN_MERGE, unscaled=tuple(spec.unscaled())))
    card = make_card(model, component="bench.Nab", version="1.0.0", channels=["value"], spec=spec, window=w,
                     hop=1, rate_hz=1.0 / step_s, sources=["nab"], rows=probation)
    loaded = LoadedModel(card, session(model.proto), "bench", Path("nab"))
    wins = sliding_window_view(values.astype(np.float32), w)[:, None, :]
    z = loaded.standardize(loaded.extractor.extract(wins, times[w - 1:]))
    n_train = probation - w + 1
    n_cal = max(1, round(n_train * 0.25))
    online = loaded.card.online
    assert online is not None
    return Prepared(name, kind, windows, probation, len(values), z, z[: n_train - n_cal],
                    online.merge_radius / 0.5, online.merge_radius, online.exclude_windows, online.capacity,
                    loaded.alarm_params(), values)


def scale_for(s: Series, coarse: bool, w: int, spike: bool, calendar: bool, chomp_band: float | None,
              spread_rule: bool = False) -> Scale:
    """The block size follows from the 8-block window whatever w is (w = 12 only widens the window)."""
    values = chomp(s.values, s.probation, chomp_band) if chomp_band else s.values
    times = np.arange(len(values)) * float(s.step)
    if not coarse:  # the declared fine scale
        return Scale(build(s.name, s.kind, values, s.windows, s.probation, times, w, calendar), 1, w)
    k = block_size(s.probation)
    bv = blocks(values, k, spike, SPIKE_BAND * float(np.std(values[: s.probation])) if spread_rule else None)
    bt = times[k - 1:: k][: len(bv)]  # a block's time is its last row's
    p = build(s.name, s.kind, bv, s.windows, s.probation // k, bt, w, calendar)
    return Scale(p, k, w)


def rows_of(s: Series, sc: Scale, flags: np.ndarray) -> np.ndarray:
    rows = np.zeros(len(s.values), dtype=bool)
    at = (np.arange(len(flags)) + sc.w) * sc.k - 1
    rows[at[flags]] = True
    return rows


def shift_flags(p: Prepared, m: int, h: int, tail: float) -> np.ndarray:
    """nab_dev_variants.shift's stage alone: its own likelihood over the level/spread statistic, silent until
    it has fitted its own normal."""
    stat = shift_stat(p.values, m, h)[KNN_WINDOW - 1:]
    first = m + h - KNN_WINDOW
    params = dataclasses.replace(p.params, tail_probability=tail, averaging_windows=1, prior_mean=0.0, prior_std=1.0)
    out = np.zeros(len(stat), dtype=bool)
    if len(stat) > first:
        out[first:] = alarm_stream(stat[first:], params)[0]
        out[first: first + params.estimation_windows] = False
    return out


def rearm_flags(scores: np.ndarray, params: AlarmParams, q: float, quiet: int, c: float,
                extra: np.ndarray | None = None) -> np.ndarray:
    """The likelihood's red-zone entries, re-armed only after `quiet` windows with no tail below q.
    ``extra``: another stage's alarms (the shift stage), taken only while armed; the quiet and the
    exception are the knn's."""
    st = AlarmState(dataclasses.replace(params, holdoff_windows=0))
    flags = np.zeros(len(scores), dtype=bool)
    armed, calm, ref, since = True, 0, math.inf, 10**9
    for i, x in enumerate(scores):
        d = st.update(float(x))
        tail = 1.0 if d.tail is None else d.tail
        since += 1
        if armed and (d.alarm or (extra is not None and extra[i])):
            flags[i], armed, calm, ref, since = True, False, 0, float(x), 0
            continue
        if not armed:
            if d.is_anomaly and x > c * ref and since >= params.holdoff_windows:
                flags[i], calm, ref, since = True, 0, float(x), 0
                continue
            calm = 0 if tail < q else calm + 1
            if calm >= quiet:
                armed = True
    return flags


@dataclasses.dataclass(frozen=True)
class Spec:
    k: bool  # block scale (else the fine one)
    w: int = KNN_WINDOW
    spike: bool = False
    spread_rule: bool = False  # the spike rule's band: 0.1 x the training spread instead of 10 % of the mean
    calendar: bool = True
    chomp: float | None = None
    rearm: tuple[float, int, float] | None = None  # (q, Q, c); Q = 0: one day of windows
    union: bool = False  # OR with the declared setup's alarms
    holdoff_day: bool = False  # a fixed hold-off of one day of rows instead of one window
    shift: tuple[int, int, float] | None = None  # nab_dev_variants' shift stage (recent, history, tail), fine scale


def variants() -> dict[str, Spec]:
    v: dict[str, Spec] = {"declared": Spec(False)}
    for q, Q, c in [(1e-2, 8, 1.2), (1e-2, 24, 1.2), (1e-2, 96, 1.2), (1e-3, 8, 1.2), (1e-3, 24, 1.2),
                    (1e-3, 96, 1.2), (1e-2, 24, 1.5), (1e-3, 24, 1.5), (1e-2, 96, 1.5)]:
        v[f"rearm-{q:g}-{Q}-{c:g}"] = Spec(False, rearm=(q, Q, c))
    for spike in (False, True):
        b = "bspike" if spike else "bmean"
        for w in (8, 12):
            v[f"{b}{w}"] = Spec(True, w=w, spike=spike)
            v[f"{b}{w}-nocal"] = Spec(True, w=w, spike=spike, calendar=False)
    v["bspikesd8"] = Spec(True, spike=True, spread_rule=True)
    for band in (0.1, 0.25, 0.5):
        v[f"chomp-{band:g}"] = Spec(False, chomp=band)
    return v


VARIANTS = variants()


def add_derived(names: list[str]) -> None:
    """Names built on the fly: <base>+rearm-q-Q-c, <base>+union, <base>+chomp-b for any block base."""
    for n in names:
        if n in VARIANTS:
            continue
        base, *mods = n.split("+")
        spec = VARIANTS[base]
        for m in mods:
            parts = m.split("-")
            if parts[0] == "rearm":  # rearm-q-Q-c, Q "day" = one day of windows
                quiet = 0 if parts[2] == "day" else int(parts[2])
                spec = dataclasses.replace(spec, rearm=(float(parts[1]), quiet, float(parts[3])))
            elif parts[0] == "hold":  # hold-day: the fixed hold-off of one day of rows (nab_dev_alarms.py)
                spec = dataclasses.replace(spec, holdoff_day=True)
            elif parts[0] == "shift":  # shift-m-h-tail
                spec = dataclasses.replace(spec, shift=(int(parts[1]), int(parts[2]), float("-".join(parts[3:]))))
            elif parts[0] == "union":
                spec = dataclasses.replace(spec, union=True)
            elif parts[0] == "chomp":
                spec = dataclasses.replace(spec, chomp=float(parts[1]))
            else:
                raise SystemExit(f"--variants: unknown modifier {m!r} in {n!r}")
        VARIANTS[n] = spec


@dataclasses.dataclass
class Cache:
    """Per series: the knn's scale and raw scores per (scale, window, block rule, calendar, chomp), and the
    shift stage's alarms per (recent, history, tail)."""

    scored: dict[tuple[object, ...], tuple[Scale, np.ndarray]] = dataclasses.field(default_factory=dict)
    shifts: dict[tuple[int, int, float], np.ndarray] = dataclasses.field(default_factory=dict)


def run(s: Series, spec: Spec, cache: Cache) -> np.ndarray:
    key = (spec.k, spec.w, spec.spike, spec.calendar, spec.chomp, spec.spread_rule)
    if key not in cache.scored:
        built = scale_for(s, spec.k, spec.w, spec.spike, spec.calendar, spec.chomp, spec.spread_rule)
        cache.scored[key] = (built, knn_scores(built.prep, None))
    sc, raw = cache.scored[key]
    extra: np.ndarray | None = None
    if spec.shift is not None:
        assert not spec.k, "the shift stage watches rows: fine scale only"
        if spec.shift not in cache.shifts:
            cache.shifts[spec.shift] = shift_flags(sc.prep, *spec.shift)
        extra = cache.shifts[spec.shift]
    if spec.rearm is None:
        hold = 86_400 // (s.step * sc.k) if spec.holdoff_day else sc.prep.params.holdoff_windows
        flags = alarm_stream(raw, sc.prep.params)[0]
        if spec.holdoff_day or extra is not None:  # the knn's and the shift stage's alarms share one hold-off
            more = [] if extra is None else [extra]
            flags = holdoff_merge(flags, *more, holdoff=hold)  # as nab_dev_variants
    else:
        q, quiet, c = spec.rearm
        flags = rearm_flags(raw, sc.prep.params, q, quiet or 86_400 // (s.step * sc.k), c, extra)
    rows = rows_of(s, sc, flags)
    if spec.union:
        rows = holdoff_merge(rows, run(s, VARIANTS["declared"], cache), holdoff=KNN_WINDOW)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--spiky-detail", action="store_true", help="also print per-series scores")
    args = parser.parse_args()
    seeds = tuple(int(x) for x in args.seeds.split(","))
    names = args.variants.split(",")
    add_derived(names)
    series = [Series(n, n.split("-")[0], v, w, p, st) for n, v, w, p, st in nab_dev.devset(seeds)]
    caches = [Cache() for _ in series]
    kinds = list(nab_dev.KINDS)
    print(f"dev seeds {args.seeds}: {len(series)} series; block sizes "
          + ", ".join(f"{s.kind} {block_size(s.probation)}" for s in series[: len(kinds)]))
    print(f"  {'variant':30s} score  " + " ".join(f"{k:>9s}" for k in kinds) + "   per seed")
    t0 = time.time()
    for v in names:
        per = [nab_score(run(s, VARIANTS[v], c), s.windows, s.probation) for s, c in zip(series, caches, strict=True)]
        by_kind = [np.mean([x for x, s in zip(per, series, strict=True) if s.kind == k]) for k in kinds]
        by_seed = [normalised([x for x, s in zip(per, series, strict=True) if s.name.endswith(f"-{sd}")],
                              sum(len(s.windows) for s in series if s.name.endswith(f"-{sd}"))) for sd in seeds]
        total = normalised(per, sum(len(s.windows) for s in series))
        print(f"  {v:30s} {total:5.1f}  " + " ".join(f"{x:9.2f}" for x in by_kind)
              + "   " + " ".join(f"{x:5.1f}" for x in by_seed) + f"   ({time.time() - t0:.0f} s)", flush=True)
        if args.spiky_detail:
            print("     " + " ".join(f"{s.name}={x:.2f}" for x, s in zip(per, series, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
