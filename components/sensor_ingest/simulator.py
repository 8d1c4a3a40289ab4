"""A simulated wind-turbine drivetrain: vibration on three axes and nacelle temperature.

Pure and vectorised: :meth:`TurbineSimulator.generate` computes a whole batch with numpy from
the absolute sample index, so the deterministic part of the signal (shaft, gear mesh, bearing
and crack impacts) is phase-continuous across batches whatever their size, and one seed gives
the same output for the same sequence of calls. No clock and no I/O: the service decides when a
batch is due and what its ``t0`` is.

The physics is the textbook picture a vibration analyst expects to find in a spectrum:

* shaft speed ``f_r`` with a slow ±1 % wobble (the phase is the exact integral of the speed);
* 1x and 2x shaft components (residual imbalance and misalignment) on the radial axes;
* gear mesh at ``teeth · f_r`` and its second harmonic, strongest on the axial axis (helical gear);
* rolling-element bearing defect frequencies from the geometry::

      BPFO = n/2 · f_r · (1 - d/D · cos φ)      BPFI = n/2 · f_r · (1 + d/D · cos φ)

* broadband Gaussian noise;
* nacelle temperature: a slow drift around a base value plus a little noise.

Faults (:class:`FaultKind`) change that picture the way the real defect does: an outer-race
defect produces an impact each time a roller passes it (at BPFO), each impact ringing a
structural resonance; an inner-race defect does the same at BPFI, modulated once per revolution
as the defect passes through the load zone; a cracked gear tooth gives one impact per revolution
and modulates the mesh (sidebands at GMF ± f_r); imbalance raises the 1x amplitude; an
over-temperature ramps the temperature up; a dropout replaces samples with NaN or zeros; a stuck
sensor repeats the value it had when the fault began.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

VIBRATION_CHANNELS = ("vib_x", "vib_y", "vib_z")
KNOWN_CHANNELS = (*VIBRATION_CHANNELS, "temp")

# How each vibration axis sees each source: (1x, 2x, gear mesh, bearing/crack impacts, 1x phase).
# x and y are the radial axes 90° apart (so imbalance shows as a rotating vector), z is axial.
_AXIS_GAINS: dict[str, tuple[float, float, float, float, float]] = {
    "vib_x": (1.0, 1.0, 0.6, 1.0, 0.0),
    "vib_y": (0.9, 0.8, 0.5, 0.8, math.pi / 2),
    "vib_z": (0.3, 0.5, 1.0, 0.4, 0.0),
}


class FaultKind(StrEnum):
    BEARING_OUTER_RACE = "bearing_outer_race"
    BEARING_INNER_RACE = "bearing_inner_race"
    GEAR_TOOTH_CRACK = "gear_tooth_crack"
    IMBALANCE = "imbalance"
    OVER_TEMPERATURE = "over_temperature"
    DROPOUT = "dropout"
    STUCK = "stuck"


SENSOR_FAULTS = frozenset({FaultKind.DROPOUT, FaultKind.STUCK})


@dataclass(slots=True, frozen=True)
class BearingGeometry:
    """Rolling-element bearing geometry (defaults: a 6205 deep-groove ball bearing)."""

    rollers: int = 9
    roller_diameter_mm: float = 7.94
    pitch_diameter_mm: float = 39.04
    contact_angle_deg: float = 0.0

    def _ratio(self) -> float:
        return self.roller_diameter_mm / self.pitch_diameter_mm * math.cos(math.radians(self.contact_angle_deg))

    @property
    def bpfo_order(self) -> float:
        """Ball-pass frequency, outer race, in multiples of the shaft speed."""
        return self.rollers / 2 * (1 - self._ratio())

    @property
    def bpfi_order(self) -> float:
        """Ball-pass frequency, inner race, in multiples of the shaft speed."""
        return self.rollers / 2 * (1 + self._ratio())


@dataclass(slots=True, frozen=True)
class TurbineParams:
    rate_hz: float = 1000.0
    shaft_hz: float = 25.0
    speed_wobble: float = 0.01  # relative amplitude of the slow speed variation
    wobble_hz: float = 0.05
    gear_teeth: int = 13
    bearing: BearingGeometry = field(default_factory=BearingGeometry)
    amp_1x: float = 0.2  # g
    amp_2x: float = 0.05
    amp_mesh: float = 0.3
    amp_mesh_2: float = 0.1
    noise_rms: float = 0.1
    resonance_hz: float | None = None  # structural resonance rung by impacts; default 0.3 · rate
    impact_decay_s: float | None = None  # default 1 resonance period: impacts stay impulsive
    bearing_impact_g: float = 2.0  # impact amplitude at severity 1
    crack_impact_g: float = 1.5
    crack_mesh_modulation: float = 0.5
    imbalance_gain: float = 5.0  # 1x amplitude becomes (1 + gain · severity) times
    temp_base_c: float = 45.0
    temp_drift_c: float = 0.5
    temp_drift_period_s: float = 600.0
    temp_noise_c: float = 0.02
    over_temp_rate_c_per_s: float = 2.0  # at severity 1
    over_temp_max_rise_c: float = 60.0  # at severity 1
    dropout_block: int = 50  # samples dropped together

    def check(self) -> None:
        """Raise ValueError naming the parameter when the model would alias or make no sense."""
        nyquist = self.rate_hz / 2
        if self.rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        if self.shaft_hz <= 0:
            raise ValueError("shaft_hz must be positive")
        peak_speed = self.shaft_hz * (1 + abs(self.speed_wobble))
        mesh = self.gear_teeth * peak_speed
        if mesh >= nyquist:
            raise ValueError(
                f"gear_teeth: gear mesh at {mesh:.0f} Hz is above the Nyquist frequency {nyquist:.0f} Hz of "
                f"rate_hz={self.rate_hz:g} and would alias; lower gear_teeth or shaft_hz, or raise rate_hz")
        if self.resolved_resonance_hz >= nyquist:
            raise ValueError(f"resonance_hz: {self.resolved_resonance_hz:g} Hz is above Nyquist {nyquist:g} Hz")

    @property
    def resolved_resonance_hz(self) -> float:
        return self.resonance_hz if self.resonance_hz is not None else 0.3 * self.rate_hz

    @property
    def resolved_decay_s(self) -> float:
        return self.impact_decay_s if self.impact_decay_s is not None else 1.0 / self.resolved_resonance_hz

    def frequencies(self) -> dict[str, float]:
        """Characteristic frequencies at nominal speed, in Hz (for documentation and tests)."""
        f = self.shaft_hz
        return {"shaft": f, "mesh": self.gear_teeth * f, "bpfo": self.bearing.bpfo_order * f,
                "bpfi": self.bearing.bpfi_order * f}


@dataclass(slots=True, frozen=True)
class Fault:
    kind: FaultKind
    severity: float = 1.0  # 0..1
    channel: str | None = None  # sensor faults: the channel (None = every channel)
    mode: Literal["nan", "zero"] = "nan"  # dropout: what the lost samples read as

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fault": self.kind.value, "severity": self.severity}
        if self.channel is not None:
            out["channel"] = self.channel
        if self.kind is FaultKind.DROPOUT:
            out["mode"] = self.mode
        return out


@dataclass(slots=True)
class _Active:
    fault: Fault
    since_index: int
    held: npt.NDArray[np.float64] | None = None  # stuck: the values being repeated


class TurbineSimulator:
    """Generates channel-major batches; faults are injected and cleared between batches."""

    def __init__(self, params: TurbineParams, channels: tuple[str, ...] = KNOWN_CHANNELS, seed: int = 0) -> None:
        params.check()
        unknown = [c for c in channels if c not in KNOWN_CHANNELS]
        if unknown or not channels:
            raise ValueError(f"channels: unknown {unknown}; the simulator provides {list(KNOWN_CHANNELS)}")
        self.params = params
        self.channels = tuple(channels)
        self._rng = np.random.default_rng(seed)
        self._index = 0  # absolute sample index of the next sample
        self._faults: dict[tuple[FaultKind, str | None], _Active] = {}
        self._last = np.zeros(len(self.channels))

    @property
    def sample_index(self) -> int:
        return self._index

    # --- faults ---------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        if not 0.0 <= fault.severity <= 1.0 or math.isnan(fault.severity):
            raise ValueError(f"severity must be within 0..1, got {fault.severity}")
        if fault.channel is not None and fault.channel not in self.channels:
            raise ValueError(f"channel {fault.channel!r} is not one of {list(self.channels)}")
        unseen = self._unseen(fault.kind)
        if unseen:
            raise ValueError(unseen)
        channel = fault.channel if fault.kind in SENSOR_FAULTS else None
        fault = Fault(fault.kind, fault.severity, channel, fault.mode)
        held = None
        if fault.kind is FaultKind.STUCK:
            held = self._last.copy()
        self._faults[(fault.kind, channel)] = _Active(fault, self._index, held)

    def clear(self, kind: FaultKind, channel: str | None = None) -> bool:
        """Clear a fault. For a sensor fault, ``channel`` clears that channel's; without one, every one of
        that kind (a stuck temp cleared as ``{"fault": "stuck"}`` used to answer ok, cleared false, and
        stay stuck)."""
        if kind in SENSOR_FAULTS and channel is None:
            keys = [k for k in self._faults if k[0] is kind]
            for k in keys:
                del self._faults[k]
            return bool(keys)
        return self._faults.pop((kind, channel if kind in SENSOR_FAULTS else None), None) is not None

    def clear_all(self) -> None:
        self._faults.clear()

    def _unseen(self, kind: FaultKind) -> str | None:
        """Why ``kind`` would change none of this simulator's channels (None: it shows). An over-temperature
        without the temp channel was accepted and answered ok while the stream did not change at all."""
        if kind is FaultKind.OVER_TEMPERATURE and "temp" not in self.channels:
            return f"{kind.value} shows on the temp channel, which is not one of {list(self.channels)}"
        if kind not in SENSOR_FAULTS and kind is not FaultKind.OVER_TEMPERATURE and \
                not any(c in VIBRATION_CHANNELS for c in self.channels):
            return f"{kind.value} shows on vibration channels, and none of {list(self.channels)} is one"
        return None

    def adopt_faults(self, other: TurbineSimulator) -> list[dict[str, Any]]:
        """Take over ``other``'s active faults (this simulator replaces it after a configuration change).

        An over-temperature keeps how long it has been ramping (in seconds: the rate may have changed),
        and a stuck channel the value it is stuck at. Returns the faults left behind because their
        channel is not one of this simulator's.
        """
        dropped: list[dict[str, Any]] = []
        for (kind, channel), active in other._faults.items():
            if (channel is not None and channel not in self.channels) or self._unseen(kind):
                dropped.append(active.fault.describe())
                continue
            elapsed_s = (other._index - active.since_index) / other.params.rate_hz
            since = self._index - round(elapsed_s * self.params.rate_hz)
            held = None
            if active.held is not None:
                held = self._last.copy()
                for row, name in enumerate(self.channels):
                    if name in other.channels:
                        held[row] = active.held[other.channels.index(name)]
            self._faults[(kind, channel)] = _Active(active.fault, since, held)
        return dropped

    def active(self) -> list[dict[str, Any]]:
        return [a.fault.describe() for a in self._faults.values()]

    def _fault(self, kind: FaultKind) -> _Active | None:
        return self._faults.get((kind, None))

    # --- signal -------------------------------------------------------------------------------
    def skip(self, n: int) -> None:
        """Advance time by ``n`` samples without producing them (the pacer dropped a backlog)."""
        self._index += max(0, n)

    def generate(self, n: int) -> npt.NDArray[np.float32]:
        """The next ``n`` samples of every channel, shape (channels, n), float32."""
        p = self.params
        idx = np.arange(self._index, self._index + n, dtype=np.float64)
        t = idx / p.rate_hz
        wobble_phase = 2 * np.pi * p.wobble_hz * t
        # Phase is the integral of f_r · (1 + w · sin(2π f_w t)).
        phase = 2 * np.pi * p.shaft_hz * (t + p.speed_wobble / (2 * np.pi * p.wobble_hz) * (1 - np.cos(wobble_phase)))
        speed = p.shaft_hz * (1 + p.speed_wobble * np.sin(wobble_phase))

        imbalance = self._fault(FaultKind.IMBALANCE)
        amp_1x = p.amp_1x * (1 + p.imbalance_gain * imbalance.fault.severity if imbalance else 1.0)
        crack = self._fault(FaultKind.GEAR_TOOTH_CRACK)
        mesh_mod = 1.0 + (p.crack_mesh_modulation * crack.fault.severity * np.cos(phase) if crack else 0.0)
        mesh = p.amp_mesh * np.sin(p.gear_teeth * phase)
        if 2 * p.gear_teeth * p.shaft_hz * (1 + p.speed_wobble) < p.rate_hz / 2:  # a real sensor's filter
            mesh += p.amp_mesh_2 * np.sin(2 * p.gear_teeth * phase + 0.3)  # removes what would alias
        mesh = mesh_mod * mesh
        impacts = self._impacts(phase, speed)

        out = np.empty((len(self.channels), n), dtype=np.float64)
        for row, name in enumerate(self.channels):
            if name == "temp":
                out[row] = self._temperature(t, n)
                continue
            g1, g2, gm, gi, ph = _AXIS_GAINS[name]
            out[row] = (g1 * amp_1x * np.sin(phase + ph) + g2 * p.amp_2x * np.sin(2 * phase + 0.7 + ph)
                        + gm * mesh + gi * impacts + p.noise_rms * self._rng.standard_normal(n))
        self._apply_sensor_faults(out)
        if n:
            self._last = out[:, -1].copy()
        self._index += n
        return out.astype(np.float32)

    def _impacts(self, phase: npt.NDArray[np.float64], speed: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Decaying resonance rung at each impact: outer/inner race passes and cracked-tooth mesh."""
        p = self.params
        total = np.zeros_like(phase)
        f_res = p.resolved_resonance_hz
        decay = p.resolved_decay_s
        revs = phase / (2 * np.pi)
        sources: list[tuple[float, float, npt.NDArray[np.float64] | float]] = []
        outer = self._fault(FaultKind.BEARING_OUTER_RACE)
        if outer:
            sources.append((p.bearing.bpfo_order, p.bearing_impact_g * outer.fault.severity, 1.0))
        inner = self._fault(FaultKind.BEARING_INNER_RACE)
        if inner:  # the defect rotates with the shaft through the load zone once per revolution
            sources.append((p.bearing.bpfi_order, p.bearing_impact_g * inner.fault.severity,
                            0.5 * (1 + np.cos(phase))))
        crack = self._fault(FaultKind.GEAR_TOOTH_CRACK)
        if crack:
            sources.append((1.0, p.crack_impact_g * crack.fault.severity, 1.0))
        for order, amp, modulation in sources:
            # Time since the last impact: fraction of the current impact period, over the impact rate.
            cycles = revs * order
            tau = (cycles - np.floor(cycles)) / (order * speed)
            total += amp * modulation * np.exp(-tau / decay) * np.sin(2 * np.pi * f_res * tau)
        return total

    def _temperature(self, t: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
        p = self.params
        temp = (p.temp_base_c + p.temp_drift_c * np.sin(2 * np.pi * t / p.temp_drift_period_s)
                + p.temp_noise_c * self._rng.standard_normal(n))
        hot = self._fault(FaultKind.OVER_TEMPERATURE)
        if hot:
            since = (self._index - hot.since_index + np.arange(n)) / p.rate_hz
            sev = hot.fault.severity
            temp = temp + np.minimum(p.over_temp_rate_c_per_s * sev * since, p.over_temp_max_rise_c * sev)
        return temp

    def _apply_sensor_faults(self, out: npt.NDArray[np.float64]) -> None:
        n = out.shape[1]
        for (kind, channel), active in self._faults.items():
            rows = [self.channels.index(channel)] if channel is not None else list(range(len(self.channels)))
            if kind is FaultKind.STUCK:
                assert active.held is not None
                for r in rows:
                    out[r] = active.held[r]
            elif kind is FaultKind.DROPOUT:
                lost = self._dropout_mask(n, active.fault.severity)
                fill = np.nan if active.fault.mode == "nan" else 0.0
                for r in rows:
                    out[r, lost] = fill

    def _dropout_mask(self, n: int, severity: float) -> npt.NDArray[np.bool_]:
        """Samples lost, in blocks aligned to the absolute index; severity is the fraction lost."""
        if severity >= 1.0:
            return np.ones(n, dtype=bool)
        block = self.params.dropout_block
        first, last = self._index // block, (self._index + n - 1) // block
        # A hash of the block number, not the RNG: the same block is lost whatever the batch size.
        blocks = np.arange(first, last + 1, dtype=np.uint64)
        h = (blocks * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        lost_blocks = (h.astype(np.float64) / float(1 << 24)) < severity
        return np.repeat(lost_blocks, block)[self._index - first * block:][:n]
