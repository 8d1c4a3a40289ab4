"""Feature extraction: equal to the textbook definitions (scipy as the reference), batch == single,
spec errors name the field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from components.anomaly.errors import FeatureSpecError
from components.anomaly.features import (
    ChannelGroup,
    FeatureExtractor,
    FeatureSpec,
    channel_of,
    default_spec,
    spectral_spec,
    univariate_spec,
)

CH = ["vib_x", "vib_y", "temp"]


def test_moments_match_scipy() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_gamma(2.0, size=(3, 512)) * [[1.0], [3.0], [0.1]]).astype(np.float32)
    fx = FeatureExtractor(default_spec(CH), CH, 512)
    f = dict(zip(fx.names, fx.extract(w), strict=True))
    for i, c in enumerate(CH[:2]):
        x = w[i].astype(np.float64)
        assert f[f"{c}.kurtosis"] == pytest.approx(stats.kurtosis(x), rel=1e-4)
        assert f[f"{c}.skewness"] == pytest.approx(stats.skew(x), rel=1e-4)
        rms = np.sqrt(np.mean(x * x))
        assert f[f"{c}.rms"] == pytest.approx(rms, rel=1e-5)
        assert f[f"{c}.peak"] == pytest.approx(np.abs(x).max(), rel=1e-6)
        assert f[f"{c}.crest"] == pytest.approx(np.abs(x).max() / rms, rel=1e-5)
        bands = [f[f"{c}.band{b:02d}"] for b in range(8)]
        assert sum(bands) == pytest.approx(1.0, rel=1e-5)
    assert f["temp.mean"] == pytest.approx(w[2].mean(), rel=1e-5)
    assert "temp.kurtosis" not in f


def test_trend_is_least_squares_change_over_window() -> None:
    n = 100
    ramp = np.vstack([np.zeros(n), np.zeros(n), 2.0 + 0.5 * np.arange(n)]).astype(np.float32)
    fx = FeatureExtractor(default_spec(CH), CH, n)
    f = dict(zip(fx.names, fx.extract(ramp), strict=True))
    assert f["temp.trend"] == pytest.approx(0.5 * (n - 1), rel=1e-5)
    assert f["vib_x.kurtosis"] == 0.0 and f["vib_x.crest"] == 0.0  # constant channel: defined, not NaN


def test_tone_lands_in_its_band() -> None:
    n = 1024
    t = np.arange(n) / 1000.0
    tone = np.sin(2 * np.pi * 300 * t)  # 300 Hz of a 500 Hz Nyquist, 8 bands of 62.5 Hz -> band 4
    w = np.vstack([tone, tone, np.zeros(n)]).astype(np.float32)
    fx = FeatureExtractor(default_spec(CH), CH, n)
    f = dict(zip(fx.names, fx.extract(w), strict=True))
    assert max(range(8), key=lambda b: f[f"vib_x.band{b:02d}"]) == 4
    assert f["vib_x.band04"] > 0.9


def test_log_relative_bands_match_a_reference_periodogram() -> None:
    """log10(share of Hann-windowed, mean-removed energy per band + 1e-6), bands of equal bin count
    over bins 1..N/2, computed here the slow, obvious way."""
    n, bands = 512, 16
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, n)) * [[1.0], [50.0], [0.01]]
    w[0] += np.sin(2 * np.pi * 37 * np.arange(n) / n) * 4
    fx = FeatureExtractor(spectral_spec(CH, bands=bands), CH, n)
    f = dict(zip(fx.names, fx.extract(w.astype(np.float32)), strict=True))
    assert fx.names[:bands] == [f"vib_x.band{b:02d}" for b in range(bands)]
    assert "temp.mean" in f and "temp.band00" not in f  # slow channels keep level + trend
    for i, c in enumerate(CH[:2]):
        x = w[i].astype(np.float32).astype(np.float64)
        spec = np.fft.rfft((x - x.mean()) * np.hanning(n))
        power = np.abs(spec) ** 2
        edges = np.linspace(1, n // 2 + 1, bands + 1).astype(int)
        energy = np.array([power[edges[b]:edges[b + 1]].sum() for b in range(bands)])
        expected = np.log10(energy / energy.sum() + 1e-6)
        got = np.array([f[f"{c}.band{b:02d}"] for b in range(bands)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Gain invariance, the reason for the preset: x50 amplitude gives the same features
    scaled = fx.extract((w * [[50.0], [1.0], [1.0]]).astype(np.float32))
    np.testing.assert_allclose(scaled[:bands], fx.extract(w.astype(np.float32))[:bands], atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=8, max_value=300), st.integers(min_value=1, max_value=5), st.integers(0, 2**31))
def test_batch_equals_single(n: int, batch: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(batch, 3, n)).astype(np.float32) * 10
    fx = FeatureExtractor(default_spec(CH, bands=min(4, n // 2)), CH, n)
    many = fx.extract(w)
    assert many.shape == (batch, fx.n_features) and many.dtype == np.float32
    for i in range(batch):
        np.testing.assert_allclose(many[i], fx.extract(w[i]), rtol=1e-6, atol=1e-6)
    assert np.isfinite(many).all()


def test_feature_names_order_and_channel_of() -> None:
    spec = FeatureSpec(groups=[ChannelGroup(channels=["a.b", "c"], stats=["rms"], bands=2)])
    assert spec.feature_names() == ["a.b.rms", "a.b.band00", "a.b.band01", "c.rms", "c.band00", "c.band01"]
    assert channel_of("a.b.band01") == "a.b"
    fx = FeatureExtractor(spec, ["c", "a.b"], 16)  # window channel order differs from the spec's
    w = np.vstack([np.zeros(16), np.ones(16) * 2]).astype(np.float32)
    f = dict(zip(fx.names, fx.extract(w), strict=True))
    assert f["a.b.rms"] == pytest.approx(2.0) and f["c.rms"] == 0.0


def test_univariate_zlast() -> None:
    fx = FeatureExtractor(univariate_spec(), ["value"], 10)
    x = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 10]], dtype=np.float32)
    f = dict(zip(fx.names, fx.extract(x), strict=True))
    assert f["value.last"] == 10 and f["value.zlast"] == pytest.approx(9 / np.sqrt(9))


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(FeatureSpecError) as e:
        FeatureExtractor(default_spec(["x", "missing"]), ["x"], 64)
    assert e.value.field == "groups[0].channels"
    with pytest.raises(FeatureSpecError) as e:
        FeatureExtractor(default_spec(["x"], bands=40), ["x"], 64)
    assert e.value.field == "groups[0].bands"
    fx = FeatureExtractor(default_spec(["x"]), ["x"], 64)
    with pytest.raises(FeatureSpecError, match="does not match"):
        fx.extract(np.zeros((1, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="stats, bands or samples"):
        ChannelGroup(channels=["x"])
