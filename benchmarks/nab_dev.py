"""A synthetic development set for the NAB streaming detector: series shaped like the seven
realKnownCause files (a machine temperature with shutdowns and a failure, taxi demand with daily and
weekly cycles, CPU with a regime change, a busy CPU whose normal is full of spikes, latency with
outages, keystroke timing with a change of user, ambient temperature with a cold spell), with
anomalies placed by construction and NAB's windowing rules (10 % of the length split among the
anomalies, centred, merged when they overlap, dropped when they touch the probationary period).

Why it exists: the NAB files are the test set, and NAB's labels must not choose the detector. Every
choice of the knn setup in detection.py (window length, averaging, merge radius, tail) was compared
here, on these series only, and fixed before the NAB files were scored with it. The generators know
what the real series are like (their README says), not where the real anomalies are. ``spiky`` was
added after that one NAB run showed most of its cost in false alarms on the CPU file, which the first
version of this set did not provoke; the variants compared on it since (docs/anomaly.md) did not beat
the declared setup, so NAB was not scored again.

    .venv/bin/python benchmarks/detection.py --only nab-dev
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Series = tuple[str, npt.NDArray[np.float64], list[tuple[int, int]], int, int]

DAY5 = 288

def windows_for(n: int, anomalies: list[int], probation: int) -> list[tuple[int, int]]:
    """NAB's window rule (nab/labeler.py) applied to anomaly rows known by construction."""
    width = int(0.10 * n / max(1, len(anomalies)))
    out: list[tuple[int, int]] = []
    for a in sorted(anomalies):
        lo, hi = max(0, a - width // 2), min(n - 1, a + width // 2)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return [w for w in out if w[0] > probation]

def ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> npt.NDArray[np.float64]:
    e = rng.normal(0, sd, n)
    x = np.zeros(n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x

def machine(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = 20000
    t = np.arange(n)
    x = 85 + ar1(rng, n, 0.999, 0.15) + 1.0 * np.sin(2 * np.pi * t / DAY5) + rng.normal(0, 0.5, n)
    a1, a2 = rng.integers(3000, 9000), rng.integers(12000, 16000)
    a3 = a2 + rng.integers(500, 1500)
    # planned shutdown: ramp down 24 rows, hold 150, ramp up 70
    seg = np.concatenate([np.linspace(0, -78, 24), np.full(150, -78), np.linspace(-78, 0, 70)])
    x[a1:a1 + len(seg)] += seg + rng.normal(0, 1.5, len(seg))
    # subtle: oscillation period 12 rows amplitude 3 for 300 rows
    x[a2:a2 + 300] += 3 * np.sin(2 * np.pi * np.arange(300) / 12)
    # failure: drop to ~25 with noise to the end of 300 rows then recover slowly
    seg = np.concatenate([np.linspace(0, -60, 12), np.full(288, -60)])
    x[a3:a3 + len(seg)] += seg + rng.normal(0, 4, len(seg))
    return x, [int(a1), int(a2), int(a3)]

def taxi(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = 10000  # 30 min
    t = np.arange(n)
    h = (t % 48) / 2
    daily = (10000 + 9000 * np.exp(-((h - 9) / 2.5) ** 2) + 14000 * np.exp(-((h - 19) / 3) ** 2)
             - 7000 * np.exp(-((h - 4.5) / 1.8) ** 2))
    dow = (t // 48) % 7
    wk = np.where(dow >= 5, 0.8, 1.0)
    weekend_shape = 10000 + 16000 * np.exp(-((h - 14) / 5) ** 2)
    x = (np.where(dow >= 5, weekend_shape, daily * wk) * (1 + rng.normal(0, 0.05, n))
         * (1 + 0.1 * np.sin(2 * np.pi * t / (48 * 120))))
    days = rng.choice(np.arange(40, n // 48 - 2), 3, replace=False)
    anoms = []
    d0 = int(days[0]) * 48  # holiday: weekend profile on a weekday
    x[d0:d0 + 48] = weekend_shape[d0:d0 + 48] * (1 + rng.normal(0, 0.05, 48))
    anoms.append(d0 + 24)
    d1 = int(days[1]) * 48  # storm: demand collapses
    x[d1:d1 + 48] *= 0.35
    anoms.append(d1 + 24)
    d2 = int(days[2]) * 48 + 2  # night event
    x[d2:d2 + 10] *= 1.8
    anoms.append(d2 + 5)
    return x, anoms

def cpu(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = 18000
    t = np.arange(n)
    x = 40 + 8 * (np.sin(2 * np.pi * t / 144) > 0.7) + rng.normal(0, 2, n)
    a = int(rng.integers(int(0.6 * n), int(0.9 * n)))
    x[a:] += 25 + rng.normal(0, 4, n - a)
    return np.clip(x, 0, 100), [a]

def spiky(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    """A busy server's CPU: normal means frequent short spikes and plateaus at random times (the
    detector must learn they are normal); the anomaly is a lasting change of its level and spread."""
    n = 16000
    x = 30 + rng.normal(0, 3, n)
    for i in np.flatnonzero(rng.random(n) < 0.005):
        x[i:i + int(rng.integers(1, 4))] += rng.uniform(20, 50)
    for i in np.flatnonzero(rng.random(n) < 0.001):
        x[i:i + int(rng.integers(6, 30))] += 15
    a = int(rng.integers(int(0.5 * n), int(0.85 * n)))
    x[a:a + 600] += 12 + rng.normal(0, 5, len(x[a:a + 600]))
    return np.clip(x, 0, 100), [a]


def latency(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = 4000
    x = 45 * np.exp(rng.normal(0, 0.05, n))
    spikes = rng.random(n) < 0.01
    x[spikes] *= rng.uniform(1.5, 3, spikes.sum())
    anoms = sorted(rng.choice(np.arange(900, n - 100, 400), 3, replace=False).tolist())
    for a in anoms:
        x[a:a + 24] *= rng.uniform(1.8, 3.0)
    return x, [int(a) for a in anoms]

def keystroke(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = int(rng.choice([1900, 5300]))
    x = rng.gamma(4, 25, n)
    a = int(rng.integers(int(0.4 * n), int(0.7 * n)))
    b = int(rng.integers(a + int(0.1 * n), n - 50))
    x[a:a + 200] = rng.gamma(3, 45, len(x[a:a + 200]))
    x[b:] = rng.gamma(5, 30, n - b)
    return x, [a, b]

def ambient(rng: np.random.Generator) -> tuple[npt.NDArray[np.float64], list[int]]:
    n = 7300  # hourly
    t = np.arange(n)
    x = (71 + 2 * np.sin(2 * np.pi * t / 24) + 3 * np.sin(2 * np.pi * t / 8760) + ar1(rng, n, 0.98, 0.3)
         + rng.normal(0, 0.3, n))
    a = int(rng.integers(2000, 4000))
    b = int(rng.integers(5000, 7000))
    x[a:a + 72] -= np.concatenate([np.linspace(0, 6, 24), np.full(24, 6), np.linspace(6, 0, 24)])
    x[b:b + 6] += 5
    return x, [a + 24, b + 3]

KINDS: dict[str, Callable[[np.random.Generator], tuple[npt.NDArray[np.float64], list[int]]]] = {
    "machine": machine, "taxi": taxi, "cpu": cpu, "spiky": spiky, "latency": latency, "keystroke": keystroke,
    "ambient": ambient}
STEP_S = {"spiky": 300, "machine": 300, "taxi": 1800, "cpu": 300, "latency": 300, "keystroke": 300, "ambient": 3600}

def devset(seeds: tuple[int, ...] = (1, 2, 3, 4)) -> list[Series]:
    """(name, values, windows, probationary rows, step seconds) per series: 7 kinds x 4 seeds."""
    out: list[Series] = []
    for s in seeds:
        for k, f in KINDS.items():
            rng = np.random.default_rng(1000 * s + len(k))
            x, anoms = f(rng)
            n = len(x)
            p = min(int(0.15 * n), 750)
            out.append((f"{k}-{s}", x, windows_for(n, anoms, p), p, STEP_S[k]))
    return out
