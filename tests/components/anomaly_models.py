"""Small, fast model packages for the anomaly tests: synthetic healthy vibration, a real build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components.anomaly import signing
from components.anomaly.features import FeatureExtractor, default_spec
from components.model_builder import data as datamod
from components.model_builder.package import Package, make_card, write_package
from components.model_builder.training import TrainParams, train

CHANNELS = ["vib_x", "temp"]
RATE = 1000.0
WINDOW = 128
HOP = 64
BATCH = 64


def healthy(n: int, *, seed: int = 0, start: int = 0) -> np.ndarray:
    """(2, n): a 50 Hz tone in noise and a slowly varying temperature."""
    rng = np.random.default_rng(seed)
    t = (np.arange(n) + start) / RATE
    vib = np.sin(2 * np.pi * 50 * t) + 0.3 * rng.standard_normal(n)
    temp = 40 + 0.001 * rng.standard_normal(n)
    return np.vstack([vib, temp]).astype(np.float32)


def faulty(n: int, *, seed: int = 1, start: int = 0) -> np.ndarray:
    """Healthy plus strong periodic impacts (a bearing defect: crest factor and kurtosis rise)."""
    x = healthy(n, seed=seed, start=start)
    x[0, ::25] += 8.0
    return x


def build(out: Path, version: str, *, kind: Any = "isolation_forest", key: Ed25519PrivateKey | None = None,
          name: str = "com.nucleus.TurbineModel", seed: int = 0, window: int = WINDOW, hop: int = HOP,
          online: bool = False) -> Package:
    dataset = datamod.Dataset(list(CHANNELS), [healthy(40_000, seed=seed).astype(np.float64)], RATE, ["synthetic"])
    spec = default_spec(CHANNELS, bands=4)
    features = FeatureExtractor(spec, CHANNELS, window).extract(datamod.windows(dataset, window, hop))
    model = train(features, TrainParams(kind=kind, n_estimators=30, seed=seed, quantile=0.999, margin=1.1,
                                        online=online, online_exclude_windows=-(-window // hop) - 1),
                  rate_hz=RATE, hop=hop)
    card = make_card(model, component=name, version=version, channels=list(CHANNELS), spec=spec, window=window,
                     hop=hop, rate_hz=RATE, sources=["synthetic"], rows=dataset.rows)
    key = key or signing.load_or_create_key(out / "keys" / "test.key")[0]
    return write_package(model, card, out, key)


def batch(seq: int, data: np.ndarray, *, asset: str = "t1", t0: float | None = None,
          channels: list[str] | None = None) -> dict[str, Any]:
    return {"asset": asset, "seq": seq, "t0": seq * BATCH / RATE if t0 is None else t0, "rate_hz": RATE,
            "channels": channels or list(CHANNELS), "data": data, "source": "sim"}
