"""Feature extraction from channel-major windows, driven by the model card's feature spec.

The builder and the detector call the same :class:`FeatureExtractor`, so a model is always scored on
exactly the features it was trained on. Everything is plain numpy over the last axis: a window is
``(n_channels, n_samples)`` and a batch of windows ``(n_windows, n_channels, n_samples)``, which is
how the builder extracts a whole training set in one call and the detector a backlog in one call.
Moments are computed from one centred copy (``scipy.stats.kurtosis`` costs ~10x more per window and
scipy is not imported by the detector at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.anomaly.errors import FeatureSpecError

StatName = Literal["mean", "std", "rms", "peak", "crest", "kurtosis", "skewness", "min", "max", "last", "trend",
                   "zlast", "zseason"]
STAT_NAMES: tuple[str, ...] = ("mean", "std", "rms", "peak", "crest", "kurtosis", "skewness", "min", "max", "last",
                               "trend", "zlast", "zseason")
MIN_SEASON_DIFFS = 8  # zseason needs at least this many seasonal differences in a window
_TINY = 1e-12
LOG_FLOOR = 1e-6  # added to a band's energy share before log10 ("log_relative")


class ChannelGroup(BaseModel):
    """Features computed identically for each channel listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: list[str] = Field(min_length=1)
    stats: list[StatName] = Field(default_factory=list)
    bands: int = Field(default=0, ge=0, le=256)
    band_scale: Literal["relative", "log", "log_relative"] = "relative"
    # Samples per season (e.g. one day) for "zseason"; 0 = no seasonal statistic.
    season: int = Field(default=0, ge=0)
    # The newest ``samples`` values of each channel as features, oldest first: the window's shape itself,
    # for slow series where a few samples are the whole pattern (a nearest-neighbour model compares them).
    samples: int = Field(default=0, ge=0, le=1024)

    @model_validator(mode="after")
    def _something(self) -> ChannelGroup:
        if not self.stats and self.bands == 0 and self.samples == 0:
            raise ValueError("a channel group needs stats, bands or samples")
        if ("zseason" in self.stats) != (self.season > 0):
            raise ValueError("'zseason' needs season > 0 and season > 0 needs 'zseason'")
        return self


CalendarPeriod = Literal["day", "week"]
CALENDAR_SECONDS: dict[str, float] = {"day": 86_400.0, "week": 7 * 86_400.0}


class Calendar(BaseModel):
    """Where the window ends in the day and the week, as points on circles (sin, cos) of radius
    ``weight``: the context that makes a weekday that looks like a Sunday (a holiday) or a busy hour
    at night unusual, when the values alone have been seen before. Taken from the window's end time
    (seconds since the epoch, UTC; a device in local time passes local seconds). Not standardized by
    the training data: a few days of training would make a week's phase look like a huge deviation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    periods: list[CalendarPeriod] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)


class FeatureSpec(BaseModel):
    """Which features, in which order. ``feature_names`` is the model's input layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["nucleus.features/1"] = "nucleus.features/1"
    groups: list[ChannelGroup] = Field(min_length=1)
    calendar: Calendar | None = None

    @model_validator(mode="after")
    def _each_feature_once(self) -> FeatureSpec:
        """A feature listed twice (a channel in two groups with the same stat, or twice in one group)
        weighed double in the model and made its name ambiguous in contributions."""
        names = self.feature_names()
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"features {', '.join(twice)} are listed more than once")
        return self

    def channels(self) -> list[str]:
        seen: dict[str, None] = {}
        for g in self.groups:
            for c in g.channels:
                seen.setdefault(c, None)
        return list(seen)

    def feature_names(self) -> list[str]:
        names: list[str] = []
        for g in self.groups:
            for c in g.channels:
                names.extend(f"{c}.{s}" for s in g.stats)
                names.extend(f"{c}.band{i:02d}" for i in range(g.bands))
                names.extend(f"{c}.s{i:02d}" for i in range(g.samples))
        if self.calendar is not None:
            for period in self.calendar.periods:
                names.extend((f"calendar.{period}_sin", f"calendar.{period}_cos"))
        return names

    def unscaled(self) -> list[int]:
        """Indices of features a model must take as they are (the calendar's), not standardized."""
        n = len(self.feature_names())
        return list(range(n - 2 * len(self.calendar.periods), n)) if self.calendar is not None else []


def default_spec(channels: list[str], *, bands: int = 8, slow: tuple[str, ...] = ("temp",)) -> FeatureSpec:
    """The vibration preset: shape statistics and relative band energies per fast channel; level and
    trend for slow channels (temperature). Relative bands and shape statistics do not scale with
    load, which a plain RMS does as much as a fault does."""
    fast = [c for c in channels if c not in slow]
    slow_present = [c for c in channels if c in slow]
    groups: list[ChannelGroup] = []
    if fast:
        groups.append(ChannelGroup(channels=fast, stats=["rms", "peak", "crest", "kurtosis", "skewness"],
                                   bands=bands, band_scale="relative"))
    if slow_present:
        groups.append(ChannelGroup(channels=slow_present, stats=["mean", "trend"]))
    return FeatureSpec(groups=groups)


def spectral_spec(channels: list[str], *, bands: int = 16, slow: tuple[str, ...] = ("temp",)) -> FeatureSpec:
    """The load-invariant preset: per fast channel only the spectrum's shape, as log10 of each band's
    share of the window's energy (``log_relative``). A change of load scales the whole spectrum (RMS,
    peak) and changes impulsiveness (kurtosis, crest) of a healthy machine; the share of energy per band
    moves much less, while a tooth or bearing fault moves energy between bands. The log makes a band
    that falls from 1e-2 to 1e-4 of the energy count as much as one that rises tenfold."""
    fast = [c for c in channels if c not in slow]
    slow_present = [c for c in channels if c in slow]
    groups: list[ChannelGroup] = []
    if fast:
        groups.append(ChannelGroup(channels=fast, bands=bands, band_scale="log_relative"))
    if slow_present:
        groups.append(ChannelGroup(channels=slow_present, stats=["mean", "trend"]))
    return FeatureSpec(groups=groups)


def shape_spec(channel: str = "value", *, samples: int = 8,
               calendar: tuple[CalendarPeriod, ...] = ()) -> FeatureSpec:
    """A preset for slow univariate series judged by whether their recent course has been seen before:
    the newest ``samples`` values themselves (for the ``knn`` model: a window is novel when no
    training or already-seen window lies near it, wherever it sits in level and shape), optionally
    with its place in the day/week."""
    return FeatureSpec(groups=[ChannelGroup(channels=[channel], samples=samples)],
                       calendar=Calendar(periods=list(calendar)) if calendar else None)


def univariate_spec(channel: str = "value") -> FeatureSpec:
    """A preset for slow univariate series (NAB): level, spread, trend and the newest value."""
    return FeatureSpec(groups=[ChannelGroup(channels=[channel],
                                            stats=["mean", "std", "min", "max", "last", "trend", "zlast"])])


def surprise_spec(channel: str = "value", *, season: int = 0) -> FeatureSpec:
    """A preset for slow univariate series judged by how surprising the newest value is: ``zlast``
    (distance from the window's mean in the window's standard deviations: a rolling standardisation
    that follows drift) and, with ``season`` samples per season, ``zseason`` (the same for the change
    since one season ago, so a day that differs from the day before stands out even where the daily
    swing dwarfs it)."""
    stats: list[StatName] = ["zlast", "zseason"] if season else ["zlast"]
    return FeatureSpec(groups=[ChannelGroup(channels=[channel], stats=stats, season=season)])


@dataclass(slots=True)
class _Group:
    rows: npt.NDArray[np.intp]  # channel rows in the window
    stats: tuple[str, ...]
    bands: int
    band_scale: str
    band_edges: npt.NDArray[np.intp]
    season: int
    samples: int


class FeatureExtractor:
    """Compiled spec for one channel layout and window length (index arrays, taper, band edges)."""

    def __init__(self, spec: FeatureSpec, channels: list[str], window: int) -> None:
        if window < 4:
            raise FeatureSpecError(f"window of {window} samples is too short (at least 4)", field="window")
        index = {c: i for i, c in enumerate(channels)}
        self.spec = spec
        self.channels = list(channels)
        self.window = window
        self.names = spec.feature_names()
        self._groups: list[_Group] = []
        n_bins = window // 2  # one-sided spectrum without DC
        for gi, g in enumerate(spec.groups):
            missing = [c for c in g.channels if c not in index]
            if missing:
                raise FeatureSpecError(f"feature group {gi} uses channels {missing} not in {channels}",
                                       field=f"groups[{gi}].channels")
            if g.bands > n_bins:
                raise FeatureSpecError(f"{g.bands} bands need at least {2 * g.bands} samples per window",
                                       field=f"groups[{gi}].bands")
            if g.samples > window:
                raise FeatureSpecError(f"{g.samples} samples as features need a window of at least {g.samples}",
                                       field=f"groups[{gi}].samples")
            if g.season and window < g.season + MIN_SEASON_DIFFS:
                raise FeatureSpecError(f"season of {g.season} samples needs a window of at least "
                                       f"{g.season + MIN_SEASON_DIFFS}", field=f"groups[{gi}].season")
            edges = np.linspace(1, n_bins + 1, g.bands + 1).astype(np.intp) if g.bands else np.zeros(0, np.intp)
            self._groups.append(_Group(np.array([index[c] for c in g.channels], dtype=np.intp), tuple(g.stats),
                                       g.bands, g.band_scale, edges, g.season, g.samples))
        self._taper = np.hanning(window)
        t = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
        self._t = t
        self._tt = float(t @ t)
        self.n_features = len(self.names)

    def extract(self, windows: npt.NDArray[np.floating],
                t_end: float | npt.NDArray[np.floating] | None = None) -> npt.NDArray[np.float32]:
        """Features of one window ``(C, N)`` -> ``(F,)`` or of a batch ``(B, C, N)`` -> ``(B, F)``;
        ``t_end`` (one per window, epoch seconds) is needed when the spec has a calendar."""
        x = np.asarray(windows, dtype=np.float64)
        if x.shape[-1] != self.window or x.shape[-2] != len(self.channels):
            raise FeatureSpecError(f"window shape {x.shape[-2:]} does not match ({len(self.channels)}, {self.window})",
                                   field="window")
        mean = x.mean(axis=-1)
        d = x - mean[..., None]
        d2 = d * d
        m2 = d2.mean(axis=-1)
        cols: list[npt.NDArray[np.float64]] = []
        need = {s for g in self._groups for s in g.stats}
        m3 = (d2 * d).mean(axis=-1) if "skewness" in need else None
        m4 = (d2 * d2).mean(axis=-1) if "kurtosis" in need else None
        std = np.sqrt(m2)
        rms = np.sqrt(m2 + mean * mean)
        peak = np.abs(x).max(axis=-1) if need & {"peak", "crest"} else None
        safe_m2 = np.where(m2 > _TINY, m2, 1.0)
        power = None
        if any(g.bands for g in self._groups):
            spec = np.fft.rfft(d * self._taper, axis=-1)
            power = spec.real ** 2 + spec.imag ** 2
        for g in self._groups:
            r = g.rows
            per: list[npt.NDArray[np.float64]] = []
            for s in g.stats:
                if s == "mean":
                    v = mean[..., r]
                elif s == "std":
                    v = std[..., r]
                elif s == "rms":
                    v = rms[..., r]
                elif s == "peak":
                    assert peak is not None
                    v = peak[..., r]
                elif s == "crest":
                    assert peak is not None
                    v = np.where(rms[..., r] > _TINY, peak[..., r] / np.where(rms[..., r] > _TINY, rms[..., r], 1.0),
                                 0.0)
                elif s == "kurtosis":
                    assert m4 is not None
                    v = np.where(m2[..., r] > _TINY, m4[..., r] / safe_m2[..., r] ** 2 - 3.0, 0.0)
                elif s == "skewness":
                    assert m3 is not None
                    v = np.where(m2[..., r] > _TINY, m3[..., r] / safe_m2[..., r] ** 1.5, 0.0)
                elif s == "min":
                    v = x[..., r, :].min(axis=-1)
                elif s == "max":
                    v = x[..., r, :].max(axis=-1)
                elif s == "last":
                    v = x[..., r, -1]
                elif s == "trend":  # least-squares change across the window, in signal units
                    v = (d[..., r, :] @ self._t) / self._tt * (self.window - 1)
                elif s == "zseason":  # zlast of the seasonal differences x[t] - x[t - season] in the window
                    ds = x[..., r, g.season:] - x[..., r, : -g.season]
                    dd = ds - ds.mean(axis=-1, keepdims=True)
                    sd = np.sqrt((dd * dd).mean(axis=-1))
                    v = np.where(sd > _TINY, dd[..., -1] / np.where(sd > _TINY, sd, 1.0), 0.0)
                else:  # zlast: how unusual the newest sample is within its own window
                    v = np.where(std[..., r] > _TINY, d[..., r, -1] / np.where(std[..., r] > _TINY, std[..., r], 1.0),
                                 0.0)
                per.append(v)
            if g.bands:
                assert power is not None
                bands = np.add.reduceat(power[..., r, :], g.band_edges[:-1], axis=-1)[..., : g.bands]
                if g.band_scale in ("relative", "log_relative"):
                    total = bands.sum(axis=-1, keepdims=True)
                    bands = np.where(total > _TINY, bands / np.where(total > _TINY, total, 1.0), 0.0)
                    if g.band_scale == "log_relative":  # floor 1e-6: a silent band is -6, not -inf
                        bands = np.log10(bands + LOG_FLOOR)
                else:
                    bands = np.log10(bands + _TINY)
            # Interleave per channel: stats, bands, samples of channel 0, then of channel 1, ...
            stacked = np.stack(per, axis=-1) if per else None
            recent = x[..., r, x.shape[-1] - g.samples:] if g.samples else None
            parts = [p for p in (stacked, bands if g.bands else None, recent) if p is not None]
            block = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
            cols.append(block.reshape(*block.shape[:-2], -1))
        if self.spec.calendar is not None:
            cols.append(self._calendar(self.spec.calendar, t_end, x.shape[:-2]))
        return np.concatenate(cols, axis=-1).astype(np.float32)

    @staticmethod
    def _calendar(cal: Calendar, t_end: float | npt.NDArray[np.floating] | None,
                  batch_shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
        if t_end is None:
            raise FeatureSpecError("calendar features need each window's end time", field="calendar")
        t = np.broadcast_to(np.asarray(t_end, dtype=np.float64), batch_shape)
        parts: list[npt.NDArray[np.float64]] = []
        for period in cal.periods:
            phase = 2.0 * np.pi * np.mod(t, CALENDAR_SECONDS[period]) / CALENDAR_SECONDS[period]
            parts += [cal.weight * np.sin(phase), cal.weight * np.cos(phase)]
        return np.stack(parts, axis=-1)


def channel_of(feature_name: str) -> str:
    """``"vib_x.kurtosis"`` -> ``"vib_x"`` (channel names may contain dots: split at the last)."""
    return feature_name.rsplit(".", 1)[0]
