"""Detector variants of the declared NAB knn setup, compared on the synthetic development set only.

Why a prototype. The product path (detection.knn_flags: builder model, Windower, features, ONNX, run-time
memory, AlarmState) costs about a minute per four seeds; a variant that changes what the memory returns
or adds a second statistic needs the scoring loop itself changed, so each one is tried here first, on the
builder's own model (knn_model: same features, standardization, prototypes, prior and memory spec) with
the memory and the alarm stage re-implemented around it. ``declared`` reproduces the product's dev score
exactly (63.8 on seeds 1-4, per kind and per seed). ``--product`` streams the finalists through the
product path instead (the shift stage is product code: components/anomaly/shift.py, card section
``shift``, builder ``--shift``). NAB's files are not read. Later ideas (a file-relative block scale,
re-arming only after quiet, denoising; from ARTime's public description) are in nab_dev_blocks.py, which
reuses this file's Prepared/Memory/knn_scores/alarm machinery.

Variants (why each might help a streaming detector with no labels):

- ``lof-f``: density-normalised distance. A window's distance to a remembered window is divided by that
  window's own distance to its nearest neighbour when it was stored (LOF's idea), floored at f x the median
  held-out distance: in a sparse region of the normal (the random spikes of a busy CPU, where every spike
  window is unlike every other) distances are large by nature and should not alarm.
- ``cusum-k-h``: a one-sided CUSUM of the knn score in the likelihood's own units ((score - mean) / std,
  slack k, alarm at h), OR-ed with the likelihood alarm: a lasting, moderate rise of novelty that never
  puts one window in the red zone still adds up.
- ``shift-m-h-tail``: a level/spread-change statistic on the values themselves (the last m rows against
  the h rows before them: |mean difference| in standard errors, |log spread ratio| in its standard
  errors), judged by a likelihood stage of its own (a cyclic series, where the statistic is always
  large, teaches it that it is), which says nothing until it has fitted its own normal on 100 values;
  its alarms and the knn's share one hold-off. ``rshift``: the same with medians and MADs; ``gshift``:
  only where the knn's score was > 3 of its spreads in the last m windows; ``-day``: hold-off one day.
- ``holdoff-day``: the declared setup with a hold-off of one day of rows (as in nab_dev_alarms.py).

    .venv/bin/python benchmarks/nab_dev_variants.py [--seeds 1,2,3,4] [--variants declared,shift-16-400-1e-7]
    .venv/bin/python benchmarks/nab_dev_variants.py --product --seeds 9,10,11,12,13,14,15,16 \
        --variants declared,shift-16-400-1e-7,shift-16-400-1e-7-day
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.nab_dev as nab_dev
from benchmarks.detection import KNN_WINDOW, STANDARD, knn_model, nab_score, stream_file
from components.anomaly.alarm import AlarmParams, AlarmState


@dataclasses.dataclass
class Prepared:
    name: str
    kind: str
    windows: list[tuple[int, int]]
    probation: int
    n: int
    z: np.ndarray  # (n_windows, F) standardized features, window k ends at row k + W - 1
    protos: np.ndarray
    median: float  # median held-out distance (the merge radius is 0.5 x this)
    merge: float
    exclude: int
    capacity: int
    params: AlarmParams
    values: np.ndarray


def prepare(seeds: tuple[int, ...]) -> list[Prepared]:
    out = []
    for name, values, windows, probation, step in nab_dev.devset(seeds):
        times = np.arange(len(values)) * float(step)
        loaded = knn_model(values, probation, times)
        w = KNN_WINDOW
        wins = sliding_window_view(values.astype(np.float32), w)[:, None, :]
        feats = loaded.extractor.extract(wins, times[w - 1:])
        z = loaded.standardize(feats)
        n_train = probation - w + 1
        n_cal = max(1, round(n_train * 0.25))
        protos = z[: n_train - n_cal]
        online = loaded.card.online
        assert online is not None
        out.append(Prepared(name, name.split("-")[0], windows, probation, len(values), z, protos,
                            online.merge_radius / 0.5, online.merge_radius, online.exclude_windows,
                            online.capacity, loaded.alarm_params(), values))
    return out


class Memory:
    """OnlineMemory's rules (exclusion queue, merge radius, ring) plus each entry's own neighbour distance."""

    def __init__(self, p: Prepared) -> None:
        f = p.z.shape[1]
        self.p = p
        self.cap = p.capacity
        self.store = np.zeros((self.cap, f), dtype=np.float64)
        self.sq = np.zeros(self.cap)
        self.r = np.zeros(self.cap)
        self.count = 0
        self.next = 0
        self.pending: deque[np.ndarray] = deque()
        self.protos = p.protos.astype(np.float64)
        self.psq = (self.protos ** 2).sum(axis=1)
        # each prototype's own nearest-neighbour distance, windows that overlap it excluded
        d2 = np.maximum(self.psq[:, None] + self.psq[None, :] - 2 * self.protos @ self.protos.T, 0)
        idx = np.arange(len(self.protos))
        d2[np.abs(idx[:, None] - idx[None, :]) <= p.exclude] = np.inf
        self.pr = np.sqrt(d2.min(axis=1))

    def dists(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zz = float(z @ z)
        dp = np.sqrt(np.maximum(self.psq - 2 * self.protos @ z + zz, 0))
        m = self.store[: self.count]
        dm = np.sqrt(np.maximum(self.sq[: self.count] - 2 * m @ z + zz, 0))
        return dp, dm

    def observe(self, z: np.ndarray) -> None:
        self.pending.append(z)
        while len(self.pending) > self.p.exclude:
            self.remember(self.pending.popleft())

    def remember(self, z: np.ndarray) -> None:
        dp, dm = self.dists(z)
        mem_nearest = float(dm.min()) if len(dm) else math.inf
        if self.p.merge > 0 and mem_nearest <= self.p.merge:
            return
        r = min(mem_nearest, float(dp.min()))
        if self.count < self.cap:
            row = self.count
            self.count += 1
        else:
            row = self.next
            self.next = (self.next + 1) % self.cap
        self.store[row] = z
        self.sq[row] = float(z @ z)
        self.r[row] = r


def knn_scores(p: Prepared, lof_floor: float | None) -> np.ndarray:
    """The final score per window: min distance to prototype or memory (declared), or with lof_floor
    set, min over entries of distance x median / max(entry's own neighbour distance, floor x median)."""
    mem = Memory(p)
    z64 = p.z.astype(np.float64)
    out = np.zeros(len(z64))
    for k, z in enumerate(z64):
        dp, dm = mem.dists(z)
        if lof_floor is None:
            s = float(dp.min())
            if len(dm):
                s = min(s, float(dm.min()))
        else:
            fl = lof_floor * p.median
            s = float((dp * p.median / np.maximum(mem.pr, fl)).min())
            if len(dm):
                s = min(s, float((dm * p.median / np.maximum(mem.r[: mem.count], fl)).min()))
        out[k] = s
        mem.observe(z)
    return out


def alarm_stream(scores: np.ndarray, params: AlarmParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alarms per window, plus the likelihood's (mean, std) before each window (for the CUSUM)."""
    st = AlarmState(params)
    flags = np.zeros(len(scores), dtype=bool)
    means, stds = np.zeros(len(scores)), np.zeros(len(scores))
    for k, s in enumerate(scores):
        means[k], stds[k] = st.estimate
        flags[k] = st.update(float(s)).alarm
    return flags, means, stds


def cusum_flags(scores: np.ndarray, means: np.ndarray, stds: np.ndarray, k: float, h: float) -> np.ndarray:
    flags = np.zeros(len(scores), dtype=bool)
    s = 0.0
    for i in range(len(scores)):
        s = max(0.0, s + (scores[i] - means[i]) / stds[i] - k)
        if s > h:
            flags[i] = True
            s = 0.0
    return flags


def robust_shift_stat(values: np.ndarray, m: int, h: int) -> np.ndarray:
    """shift_stat with medians and MADs: a lone spike moves neither, a lasting change of level or spread
    moves both. Standard errors as for a normal sample (median: 1.2533 sd / sqrt m)."""
    x = values.astype(np.float64)
    n = len(x)
    out = np.zeros(n)
    if n < m + h:
        return out
    rec = sliding_window_view(x, m)  # rec[j] = rows j .. j+m-1
    his = sliding_window_view(x, h)
    med_r = np.median(rec, axis=1)
    mad_r = np.median(np.abs(rec - med_r[:, None]), axis=1) * 1.4826
    med_h = np.median(his, axis=1)
    mad_h = np.median(np.abs(his - med_h[:, None]), axis=1) * 1.4826
    i = np.arange(m + h - 1, n)
    a = i + 1 - m  # recent window starts at a, history window starts at a - h
    sd_h = np.maximum(mad_h[a - h], 1e-9)
    lvl = np.abs(med_r[a] - med_h[a - h]) / (1.2533 * sd_h / math.sqrt(m))
    spr = np.abs(np.log(np.maximum(mad_r[a], 1e-9) / sd_h)) * math.sqrt(m) / 1.166
    out[i] = np.maximum(lvl, spr)
    return out


def shift_stat(values: np.ndarray, m: int, h: int) -> np.ndarray:
    """Per row: max(|mean(last m) - mean(H before)| / (sd_H / sqrt m), |log(sd_m / sd_H)| * sqrt(2 m))."""
    x = values.astype(np.float64)
    c1 = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    n = len(x)
    out = np.zeros(n)
    for i in range(m + h - 1, n):
        a, b = i + 1 - m, i + 1
        mr = (c1[b] - c1[a]) / m
        vr = max((c2[b] - c2[a]) / m - mr * mr, 1e-12)
        a2, b2 = a - h, a
        mh = (c1[b2] - c1[a2]) / h
        vh = max((c2[b2] - c2[a2]) / h - mh * mh, 1e-12)
        out[i] = max(abs(mr - mh) / math.sqrt(vh / m), abs(0.5 * math.log(vr / vh)) * math.sqrt(2 * m))
    return out


def holdoff_merge(*flag_arrays: np.ndarray, holdoff: int) -> np.ndarray:
    any_ = np.logical_or.reduce(flag_arrays)
    out = np.zeros_like(any_)
    last = -10**9
    for i in np.flatnonzero(any_):
        if i - last >= holdoff:  # AlarmState's rule: a new alarm once `holdoff` windows have passed
            out[i] = True
            last = i
    return out


def to_rows(p: Prepared, window_flags: np.ndarray) -> np.ndarray:
    rows = np.zeros(p.n, dtype=bool)
    rows[KNN_WINDOW - 1:] = window_flags
    return rows


Variant = Callable[[Prepared, dict[str, np.ndarray]], np.ndarray]


def declared(p: Prepared, cache: dict[str, np.ndarray]) -> np.ndarray:
    if "raw" not in cache:
        cache["raw"] = knn_scores(p, None)
    if "raw_flags" not in cache:
        cache["raw_flags"], cache["raw_m"], cache["raw_s"] = alarm_stream(cache["raw"], p.params)
    return cache["raw_flags"]


def lof(floor: float) -> Variant:
    def run(p: Prepared, cache: dict[str, np.ndarray]) -> np.ndarray:
        key = f"lof{floor}"
        if key not in cache:
            cache[key] = knn_scores(p, floor)
        return alarm_stream(cache[key], p.params)[0]
    return run


def cusum(k: float, h: float) -> Variant:
    def run(p: Prepared, cache: dict[str, np.ndarray]) -> np.ndarray:
        base = declared(p, cache)
        c = cusum_flags(cache["raw"], cache["raw_m"], cache["raw_s"], k, h)
        return holdoff_merge(base, c, holdoff=p.params.holdoff_windows)
    return run


def shift(m: int, h: int, tail: float, robust: bool = False, gate: float | None = None,
          day_holdoff: bool = False) -> Variant:
    def run(p: Prepared, cache: dict[str, np.ndarray]) -> np.ndarray:
        base = declared(p, cache)
        key = f"shift{m},{h},{robust}"
        if key not in cache:
            cache[key] = (robust_shift_stat if robust else shift_stat)(p.values, m, h)[KNN_WINDOW - 1:]
        stat = cache[key]
        # The stage judges nothing until it has fitted its own normal (estimation_windows defined values);
        # windows before the statistic is defined (m + h rows) are not fed to it.
        first = m + h - KNN_WINDOW
        params = dataclasses.replace(p.params, tail_probability=tail, averaging_windows=1, prior_mean=0.0,
                                     prior_std=1.0)
        sflags = np.zeros(len(stat), dtype=bool)
        if len(stat) > first:
            sflags[first:] = alarm_stream(stat[first:], params)[0]
            sflags[first: first + params.estimation_windows] = False
        if gate is not None:  # the knn must agree that something in the last m windows was unusual
            zk = (cache["raw"] - cache["raw_m"]) / cache["raw_s"]
            recent = np.array([zk[max(0, i - m + 1): i + 1].max() for i in range(len(zk))])
            sflags &= recent > gate
        hold = 86_400 // nab_dev.STEP_S[p.kind] if day_holdoff else p.params.holdoff_windows
        return holdoff_merge(base, sflags, holdoff=hold)
    return run


def day_holdoff(p: Prepared, cache: dict[str, np.ndarray]) -> np.ndarray:
    return holdoff_merge(declared(p, cache), holdoff=86_400 // nab_dev.STEP_S[p.kind])


VARIANTS: dict[str, Variant] = {
    "declared": declared, "holdoff-day": day_holdoff,
    "shift-16-400-1e-7-day": shift(16, 400, 1e-7, day_holdoff=True),
    "lof-1": lof(1.0), "lof-0.5": lof(0.5), "lof-2": lof(2.0),
    "cusum-1-20": cusum(1.0, 20.0), "cusum-2-20": cusum(2.0, 20.0), "cusum-0.5-50": cusum(0.5, 50.0),
    "shift-16-400": shift(16, 400, 1e-5), "shift-32-800": shift(32, 800, 1e-5),
    "shift-16-400-1e-6": shift(16, 400, 1e-6), "shift-16-400-1e-7": shift(16, 400, 1e-7),
    "shift-32-800-1e-6": shift(32, 800, 1e-6), "shift-32-800-1e-7": shift(32, 800, 1e-7),
    "rshift-16-400-1e-6": shift(16, 400, 1e-6, True), "rshift-32-800-1e-6": shift(32, 800, 1e-6, True),
    "rshift-16-400-1e-5": shift(16, 400, 1e-5, True), "rshift-16-400-1e-7": shift(16, 400, 1e-7, True),
    "shift-16-400-1e-8": shift(16, 400, 1e-8), "shift-8-200-1e-7": shift(8, 200, 1e-7),
    "shift-16-800-1e-7": shift(16, 800, 1e-7), "shift-24-400-1e-7": shift(24, 400, 1e-7),
    "shift-16-200-1e-7": shift(16, 200, 1e-7),
    "gshift-16-400-1e-5-g3": shift(16, 400, 1e-5, gate=3.0), "gshift-16-400-1e-6-g3": shift(16, 400, 1e-6, gate=3.0),
}


# name: (shift stage (recent, history, tail) or None, hold-off one day of rows instead of one window,
# re-arm after quiet (quiet tail, quiet windows, ratio) or None: nab_dev_blocks.py's finalist)
PRODUCT: dict[str, tuple[tuple[int, int, float] | None, bool, tuple[float, int, float | None] | None]] = {
    "declared": (None, False, None), "shift-16-400-1e-7": ((16, 400, 1e-7), False, None),
    "shift-16-400-1e-7-day": ((16, 400, 1e-7), True, None), "holdoff-day": (None, True, None),
    "declared+shift-16-400-1e-7+rearm-0.001-288-2": ((16, 400, 1e-7), False, (1e-3, 288, 2.0))}


def product_flags(seeds: tuple[int, ...], variant: str) -> list[tuple[str, np.ndarray, list[tuple[int, int]], int]]:
    """Each series streamed through the product path (builder -> LoadedModel/Windower -> features -> ONNX
    -> run-time memory -> AlarmState, and the shift stage when the card has one), as --only nab-dev does."""
    from components.anomaly_detector.asset import AssetState

    out = []
    for name, values, windows, probation, step in nab_dev.devset(seeds):
        times = np.arange(len(values)) * float(step)
        shift_spec, day, rearm = PRODUCT[variant]
        loaded = knn_model(values, probation, times, shift_spec, rearm)
        # the day's hold-off as the detector's configuration override would set it
        state = AssetState.start(loaded, holdoff_windows=86_400 // step if day else None)
        flags = stream_file(values, loaded, state, 1.0 / step, None, times)
        out.append((name, flags, windows, probation))
    return out


def normalised(per: list[float], windows: int) -> float:
    return 100 * (sum(per) + STANDARD["fn"] * windows) / ((STANDARD["tp"] + STANDARD["fn"]) * windows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--product", action="store_true",
                        help=f"stream through the product path instead (variants: {', '.join(PRODUCT)})")
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.product:
        return run_product(seeds, args.variants.split(","))
    names = args.variants.split(",")
    t0 = time.time()
    prepared = prepare(seeds)
    caches: list[dict[str, np.ndarray]] = [{} for _ in prepared]
    kinds = list(nab_dev.KINDS)
    n_windows = sum(len(p.windows) for p in prepared)
    print(f"dev seeds {args.seeds}: {len(prepared)} series, prepared in {time.time() - t0:.0f} s")
    print(f"  {'variant':22s} score  " + " ".join(f"{k:>9s}" for k in kinds) + "   per seed")
    for v in names:
        per = []
        for p, cache in zip(prepared, caches, strict=True):
            flags = to_rows(p, VARIANTS[v](p, cache))
            per.append(nab_score(flags, p.windows, p.probation))
        by_kind = [np.mean([s for s, p in zip(per, prepared, strict=True) if p.kind == k]) for k in kinds]
        by_seed = [normalised([s for s, p in zip(per, prepared, strict=True) if p.name.endswith(f"-{sd}")],
                              sum(len(p.windows) for p in prepared if p.name.endswith(f"-{sd}"))) for sd in seeds]
        print(f"  {v:22s} {normalised(per, n_windows):5.1f}  " + " ".join(f"{x:9.2f}" for x in by_kind)
              + "   " + " ".join(f"{x:5.1f}" for x in by_seed) + f"   ({time.time() - t0:.0f} s)", flush=True)
    return 0


def run_product(seeds: tuple[int, ...], names: list[str]) -> int:
    kinds = list(nab_dev.KINDS)
    print(f"dev seeds {','.join(map(str, seeds))}, product path")
    print(f"  {'variant':22s} score  " + " ".join(f"{k:>9s}" for k in kinds) + "   per seed")
    for v in names:
        t0 = time.time()
        rec = product_flags(seeds, v)
        per = [nab_score(f, w, p) for _, f, w, p in rec]
        by_kind = [np.mean([s for s, r in zip(per, rec, strict=True) if r[0].startswith(k + "-")]) for k in kinds]
        by_seed = [normalised([s for s, r in zip(per, rec, strict=True) if r[0].endswith(f"-{sd}")],
                              sum(len(r[2]) for r in rec if r[0].endswith(f"-{sd}"))) for sd in seeds]
        print(f"  {v:22s} {normalised(per, sum(len(r[2]) for r in rec)):5.1f}  "
              + " ".join(f"{x:9.2f}" for x in by_kind) + "   " + " ".join(f"{x:5.1f}" for x in by_seed)
              + f"   ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
