"""The simulated turbine: determinism, phase continuity, the spectral signature of each fault."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.sensor_ingest.simulator import (
    BearingGeometry,
    Fault,
    FaultKind,
    TurbineParams,
    TurbineSimulator,
)

FS = 1000.0


def envelope_peak(x: np.ndarray, fs: float, lo: float, hi: float) -> float:
    """Frequency of the largest envelope-spectrum line in [lo, hi] (squared-signal demodulation)."""
    env = (x - x.mean()) ** 2
    spec = np.abs(np.fft.rfft((env - env.mean()) * np.hanning(len(env))))
    freqs = np.fft.rfftfreq(len(env), 1 / fs)
    band = (freqs >= lo) & (freqs <= hi)
    return float(freqs[band][np.argmax(spec[band])])


def test_bearing_defect_frequencies_from_geometry() -> None:
    g = BearingGeometry(rollers=9, roller_diameter_mm=7.94, pitch_diameter_mm=39.04, contact_angle_deg=0)
    # SKF 6205: BPFO 3.585x, BPFI 5.415x shaft speed
    assert g.bpfo_order == pytest.approx(3.585, abs=1e-3)
    assert g.bpfi_order == pytest.approx(5.415, abs=1e-3)
    assert g.bpfo_order + g.bpfi_order == pytest.approx(9)  # n/2 (1-r) + n/2 (1+r)


def test_same_seed_same_output_and_different_seed_differs() -> None:
    a = TurbineSimulator(TurbineParams(), seed=7)
    b = TurbineSimulator(TurbineParams(), seed=7)
    c = TurbineSimulator(TurbineParams(), seed=8)
    xa, xb, xc = a.generate(500), b.generate(500), c.generate(500)
    assert xa.dtype == np.float32 and xa.shape == (4, 500)
    assert np.array_equal(xa, xb)
    assert not np.array_equal(xa, xc)


def test_deterministic_part_is_continuous_across_batch_sizes() -> None:
    p = TurbineParams(noise_rms=0.0, temp_noise_c=0.0)
    one = TurbineSimulator(p).generate(1000)
    sim = TurbineSimulator(p)
    parts = np.concatenate([sim.generate(n) for n in (1, 99, 300, 600)], axis=1)
    np.testing.assert_allclose(parts, one, rtol=0, atol=1e-5)


def test_healthy_spectrum_has_shaft_and_mesh_lines() -> None:
    sim = TurbineSimulator(TurbineParams(speed_wobble=0.0), seed=1)
    x = sim.generate(8192)[0].astype(np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / FS)
    top = set(np.round(freqs[np.argsort(spec)[-6:]]).astype(int))
    assert any(abs(f - 25) <= 1 for f in top), top  # 1x
    assert any(abs(f - 325) <= 1 for f in top), top  # gear mesh, 13 teeth


def test_outer_race_fault_shows_impacts_at_bpfo() -> None:
    p = TurbineParams(speed_wobble=0.0)
    sim = TurbineSimulator(p, seed=2)
    healthy = sim.generate(8192)[0].astype(np.float64)
    sim.inject(Fault(FaultKind.BEARING_OUTER_RACE, 1.0))
    faulty = sim.generate(8192)[0].astype(np.float64)
    kurt = lambda v: float(((v - v.mean()) ** 4).mean() / v.var() ** 2)  # noqa: E731
    assert kurt(faulty) > kurt(healthy) + 0.5  # impulsive
    assert faulty.std() > 2 * healthy.std()
    bpfo = p.bearing.bpfo_order * p.shaft_hz
    assert envelope_peak(faulty, FS, 60, 120) == pytest.approx(bpfo, abs=1.0)


def test_inner_race_fault_impacts_at_bpfi() -> None:
    p = TurbineParams(speed_wobble=0.0)
    sim = TurbineSimulator(p, seed=2)
    sim.inject(Fault(FaultKind.BEARING_INNER_RACE, 1.0))
    x = sim.generate(16384)[0].astype(np.float64)
    assert envelope_peak(x, FS, 110, 160) == pytest.approx(p.bearing.bpfi_order * p.shaft_hz, abs=1.0)


def test_gear_crack_adds_mesh_sidebands_and_once_per_rev_impacts() -> None:
    p = TurbineParams(speed_wobble=0.0, noise_rms=0.0)
    healthy = TurbineSimulator(p).generate(8000)[2].astype(np.float64)
    sim = TurbineSimulator(p)
    sim.inject(Fault(FaultKind.GEAR_TOOTH_CRACK, 1.0))
    cracked = sim.generate(8000)[2].astype(np.float64)
    freqs = np.fft.rfftfreq(8000, 1 / FS)

    def line(x: np.ndarray, f: float) -> float:
        return float(np.abs(np.fft.rfft(x))[np.argmin(np.abs(freqs - f))])

    assert line(cracked, 300) > 10 * line(healthy, 300)  # GMF - f_r
    assert line(cracked, 350) > 10 * line(healthy, 350)  # GMF + f_r
    assert envelope_peak(cracked, FS, 15, 40) == pytest.approx(25, abs=0.5)


def test_imbalance_raises_the_1x_amplitude() -> None:
    p = TurbineParams(speed_wobble=0.0, noise_rms=0.0)
    base = TurbineSimulator(p).generate(4000)[0]
    sim = TurbineSimulator(p)
    sim.inject(Fault(FaultKind.IMBALANCE, 0.5))
    out = sim.generate(4000)[0]
    freqs = np.fft.rfftfreq(4000, 1 / FS)
    k = np.argmin(np.abs(freqs - 25))
    ratio = abs(np.fft.rfft(out)[k]) / abs(np.fft.rfft(base)[k])
    assert ratio == pytest.approx(1 + p.imbalance_gain * 0.5, rel=0.01)


def test_over_temperature_ramps_to_a_bound_and_clears() -> None:
    p = TurbineParams(temp_noise_c=0.0, temp_drift_c=0.0)
    sim = TurbineSimulator(p)
    sim.generate(100)
    sim.inject(Fault(FaultKind.OVER_TEMPERATURE, 0.5))
    temp = sim.generate(int(100 * FS))[3]  # 100 s
    assert temp[0] == pytest.approx(p.temp_base_c, abs=0.01)
    assert temp[int(5 * FS)] == pytest.approx(p.temp_base_c + 5 * 1.0, abs=0.01)  # 2 C/s x 0.5
    assert temp[-1] == pytest.approx(p.temp_base_c + 30.0, abs=0.01)  # capped at 60 C x 0.5
    assert sim.clear(FaultKind.OVER_TEMPERATURE)
    assert sim.generate(10)[3][0] == pytest.approx(p.temp_base_c, abs=0.01)


def test_dropout_nan_or_zero_on_one_channel_or_all() -> None:
    sim = TurbineSimulator(TurbineParams(), seed=3)
    sim.inject(Fault(FaultKind.DROPOUT, 1.0, channel="vib_y"))
    x = sim.generate(200)
    assert np.isnan(x[1]).all() and not np.isnan(x[[0, 2, 3]]).any()
    sim.clear_all()
    sim.inject(Fault(FaultKind.DROPOUT, 1.0, mode="zero"))
    assert (sim.generate(50) == 0).all()
    sim.clear_all()
    sim.inject(Fault(FaultKind.DROPOUT, 0.3, channel="vib_x"))
    frac = float(np.isnan(sim.generate(100_000)[0]).mean())
    assert 0.2 < frac < 0.4


def test_partial_dropout_loses_the_same_blocks_whatever_the_batch_size() -> None:
    def lost(sizes: list[int]) -> np.ndarray:
        sim = TurbineSimulator(TurbineParams())
        sim.inject(Fault(FaultKind.DROPOUT, 0.5, channel="temp"))
        return np.concatenate([np.isnan(sim.generate(n)[3]) for n in sizes])

    assert np.array_equal(lost([1000]), lost([7, 93, 400, 500]))


def test_stuck_sensor_repeats_its_last_value() -> None:
    sim = TurbineSimulator(TurbineParams(), seed=4)
    last = sim.generate(100)[:, -1]
    sim.inject(Fault(FaultKind.STUCK, 1.0, channel="vib_z"))
    x = sim.generate(300)
    assert (x[2] == last[2]).all()
    assert np.unique(x[0]).size > 100  # the others keep moving
    assert sim.active() == [{"fault": "stuck", "severity": 1.0, "channel": "vib_z"}]


def test_bad_fault_arguments_are_refused() -> None:
    sim = TurbineSimulator(TurbineParams())
    with pytest.raises(ValueError, match="severity"):
        sim.inject(Fault(FaultKind.IMBALANCE, 1.5))
    with pytest.raises(ValueError, match="severity"):
        sim.inject(Fault(FaultKind.IMBALANCE, math.nan))
    with pytest.raises(ValueError, match="channel"):
        sim.inject(Fault(FaultKind.DROPOUT, 1.0, channel="rpm"))
    assert sim.active() == []


def test_aliasing_configuration_is_rejected_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"gear_teeth.*Nyquist"):
        TurbineSimulator(TurbineParams(gear_teeth=40))
    with pytest.raises(ValueError, match="channels"):
        TurbineSimulator(TurbineParams(), channels=("vib_x", "rpm"))


def test_skip_advances_time_without_samples() -> None:
    p = TurbineParams(noise_rms=0.0, temp_noise_c=0.0)
    ref = TurbineSimulator(p).generate(300)
    sim = TurbineSimulator(p)
    sim.skip(200)
    np.testing.assert_allclose(sim.generate(100), ref[:, 200:], atol=1e-5)
    assert sim.sample_index == 300
