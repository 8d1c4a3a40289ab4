"""The ingest component's configuration (the recipe's ``ComponentConfiguration``), validated once.

Keys are camelCase as Greengrass configurations usually are (``rateHz``); snake_case is accepted
too. Unknown keys are errors, not silently ignored: a misspelt ``batchSize`` would otherwise run
with the default and nobody would notice. ``accessControl`` belongs to the nucleus and is dropped
(the rule all built-in components share: ``components/configuration.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from components.configuration import parse_config
from components.sensor_ingest.replay import CsvReplay, ReplayError
from components.sensor_ingest.simulator import KNOWN_CHANNELS, BearingGeometry, TurbineParams

_ASSET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class BearingConfig(_Model):
    rollers: int = Field(9, ge=1)
    roller_diameter_mm: float = Field(7.94, gt=0)
    pitch_diameter_mm: float = Field(39.04, gt=0)
    contact_angle_deg: float = Field(0.0, ge=0, lt=90)


class SimulatorConfig(_Model):
    seed: int = 0
    channels: tuple[str, ...] = KNOWN_CHANNELS
    shaft_hz: float = Field(25.0, gt=0)
    speed_wobble: float = Field(0.01, ge=0, lt=0.5)
    gear_teeth: int = Field(13, ge=1)
    bearing: BearingConfig = BearingConfig()
    noise_rms: float = Field(0.1, ge=0)
    amp_1x: float = Field(0.2, ge=0)
    amp_mesh: float = Field(0.3, ge=0)
    resonance_hz: float | None = Field(None, gt=0)
    temp_base_c: float = 45.0
    over_temp_rate_c_per_s: float = Field(2.0, ge=0)
    over_temp_max_rise_c: float = Field(60.0, ge=0)

    @field_validator("channels")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in KNOWN_CHANNELS]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"channels must be distinct names from {list(KNOWN_CHANNELS)}; got {list(v)}")
        return v

    def params(self, rate_hz: float) -> TurbineParams:
        b = self.bearing
        return TurbineParams(
            rate_hz=rate_hz, shaft_hz=self.shaft_hz, speed_wobble=self.speed_wobble, gear_teeth=self.gear_teeth,
            bearing=BearingGeometry(b.rollers, b.roller_diameter_mm, b.pitch_diameter_mm, b.contact_angle_deg),
            noise_rms=self.noise_rms, amp_1x=self.amp_1x, amp_mesh=self.amp_mesh, resonance_hz=self.resonance_hz,
            temp_base_c=self.temp_base_c, over_temp_rate_c_per_s=self.over_temp_rate_c_per_s,
            over_temp_max_rise_c=self.over_temp_max_rise_c,
        )


class CsvConfig(_Model):
    path: Path
    columns: tuple[str, ...] | None = None  # default: every column but the timestamp
    channel_names: tuple[str, ...] | None = None  # default: the column names
    timestamp_column: str | None = "auto"  # "auto": a column named timestamp/time/ts if present; None: no column
    # of numeric timestamps; "auto": by the first row's size (epoch s, ms, µs or ns); ISO-8601 needs none
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns"] = "auto"
    speed: float = Field(1.0, ge=0)  # 1 = real time, 60 = a minute per second, 0 = as fast as the bound allows
    loop: bool = True
    shift_to_now: bool = True  # data timestamps are moved so the first row is the replay start


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic: str = "turbine/+/vibration"
    qos: int = Field(0, ge=0, le=1)
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    channels: tuple[str, ...] = ("vib_x", "vib_y", "vib_z", "temp")
    flush_after_s: float = Field(0.5, gt=0)  # publish a partial batch if no sample came for this long
    reconnect_initial_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)

    @field_validator("topic")
    @classmethod
    def _topic_filter(cls, v: str) -> str:
        """The MQTT rules for a topic filter, checked with the configuration: the client library refuses a
        bad one only when it subscribes, and that crashed the ingest at every start until it was BROKEN,
        after a deployment that said SUCCEEDED."""
        levels = v.split("/")
        if not v or "\0" in v or len(v.encode()) > 65535:
            raise ValueError(f"{v!r} is not an MQTT topic filter (empty, or a NUL character, or too long)")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError(f"{v!r}: '#' must be a whole level and the last one (as in 'turbine/#')")
            if "+" in level and level != "+":
                raise ValueError(f"{v!r}: '+' must be a whole level (as in 'turbine/+/vibration')")
        return v

    @field_validator("channels")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"channels must be one or more distinct names; got {list(v)}")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> MqttConfig:
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise ValueError(f"reconnectInitialS {self.reconnect_initial_s:g} is above reconnectMaxS "
                             f"{self.reconnect_max_s:g}: the first retry would wait longer than the longest")
        return self


class IngestConfig(_Model):
    asset: str = "turbine-1"
    source: Literal["sim", "csv", "mqtt"] = "sim"
    rate_hz: float = Field(1000.0, gt=0, le=1_000_000)  # samples per second per channel
    batch_size: int = Field(100, ge=1, le=1_000_000)  # samples per channel per batch
    max_burst: int = Field(10, ge=0)  # catch-up batches sent back to back before the backlog is skipped
    simulator: SimulatorConfig = SimulatorConfig()
    csv: CsvConfig | None = None
    mqtt: MqttConfig = MqttConfig()

    @field_validator("asset")
    @classmethod
    def _asset(cls, v: str) -> str:
        if not _ASSET.match(v):
            raise ValueError("asset must be 1-64 characters of letters, digits, '_', '.', '-' (it is a topic level)")
        return v

    @field_validator("csv")
    @classmethod
    def _csv_file(cls, v: CsvConfig | None, info: ValidationInfo) -> CsvConfig | None:
        """The file, its header and the columns, checked when the replay is the source: a deployment that
        names a missing file or column is refused naming it, instead of succeeding and leaving the
        ingest to fail at every start until it is BROKEN. Only the header row is read."""
        if v is not None and info.data.get("source") == "csv":
            try:
                CsvReplay(v.path, batch_size=1, rate_hz=info.data.get("rate_hz"), columns=v.columns,
                          channel_names=v.channel_names, timestamp_column=v.timestamp_column,
                          timestamp_unit=v.timestamp_unit)
            except ReplayError as exc:
                raise ValueError(str(exc)) from exc
        return v

    @model_validator(mode="after")
    def _source_settings(self) -> IngestConfig:
        if self.source == "csv" and self.csv is None:
            raise ValueError("source is 'csv' but there is no csv section (csv.path is required)")
        if self.source == "sim":
            try:
                self.simulator.params(self.rate_hz).check()
            except ValueError as exc:
                raise ValueError(f"simulator: {exc}") from exc
        return self

    def source_settings(self) -> tuple[Any, ...]:
        """What the running source depends on: a change elsewhere (the simulator section under the MQTT
        source, a csv section left behind) needs no restart, which would reconnect the broker, lose what
        devices send meanwhile and start the detector's window afresh."""
        section = {"sim": self.simulator, "csv": self.csv, "mqtt": self.mqtt}[self.source]
        return (self.asset, self.source, self.rate_hz, self.batch_size, self.max_burst, section)

    @property
    def topic(self) -> str:
        return f"sensors/{self.asset}/raw"


def load_config(raw: Any, component: str = "com.nucleus.SensorIngest") -> IngestConfig:
    return parse_config(IngestConfig, raw, component)
