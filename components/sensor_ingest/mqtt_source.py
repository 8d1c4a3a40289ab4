"""MQTT source: samples published by a device or gateway to a broker, re-batched for the bus.

Devices publish JSON in one of two shapes, and both are accepted on the same topic:

* one sample: ``{"ts": 1700000000.125, "vib_x": 0.01, "vib_y": -0.02, "vib_z": 0.0, "temp": 45.1}``
  (``ts`` optional: the arrival time is used; a configured channel that is missing reads NaN);
* a block: ``{"t0": 1700000000.0, "rate_hz": 1000, "channels": ["vib_x", ...], "data": [[...], ...]}``
  (channel-major lists, like the bus payload).

:class:`SampleAssembler` is pure (no broker, no clock): it turns those messages into
:class:`~components.sensor_ingest.batch.Batch` objects of ``batch_size`` samples at the configured
rate, and counts what it had to reject. :class:`MqttSource` is the aiomqtt client around it,
reconnecting with backoff; a broken broker never ends the component.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from components.sensor_ingest.batch import Batch
from components.sensor_ingest.config import MqttConfig

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class AssemblerStats:
    messages: int = 0
    samples: int = 0
    malformed: int = 0  # not JSON, not an object, or a block with a wrong shape
    missing_values: int = 0  # configured channels absent from a sample (NaN)
    bad_values: int = 0  # values that were not numbers (NaN)
    unknown_channels: int = 0  # block channels that are not configured (ignored)


@dataclass(slots=True)
class SampleAssembler:
    channels: tuple[str, ...]
    rate_hz: float
    batch_size: int
    stats: AssemblerStats = field(default_factory=AssemblerStats)
    _t0: float | None = None
    _rows: list[list[float]] = field(default_factory=list)

    def feed(self, raw: bytes, arrived: float) -> list[Batch]:
        """One MQTT message in, zero or more complete batches out."""
        self.stats.messages += 1
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.stats.malformed += 1
            return []
        if not isinstance(doc, dict):
            self.stats.malformed += 1
            return []
        if "data" in doc:
            return self._block(doc, arrived)
        ts = doc.get("ts", arrived)
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            self.stats.malformed += 1
            return []
        row = []
        for name in self.channels:
            if name not in doc:
                self.stats.missing_values += 1
                row.append(math.nan)
            else:
                row.append(self._number(doc[name]))
        return self._append(float(ts), [row])

    def _number(self, v: Any) -> float:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        self.stats.bad_values += 1
        return math.nan

    def _block(self, doc: dict[str, Any], arrived: float) -> list[Batch]:
        chans, data, t0 = doc.get("channels"), doc.get("data"), doc.get("t0", arrived)
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError):
            self.stats.malformed += 1
            return []
        ok_t0 = isinstance(t0, int | float) and not isinstance(t0, bool) and math.isfinite(t0)
        if (not isinstance(chans, list) or arr.ndim != 2 or arr.shape[0] != len(chans) or not ok_t0
                or not all(isinstance(c, str) for c in chans)):
            self.stats.malformed += 1
            return []
        rows = np.full((arr.shape[1], len(self.channels)), np.nan)
        for j, name in enumerate(self.channels):
            if name in chans:
                rows[:, j] = arr[chans.index(name)]
            else:
                self.stats.missing_values += arr.shape[1]
        self.stats.unknown_channels += sum(1 for c in chans if c not in self.channels)
        return self._append(float(t0), rows.tolist())

    def _append(self, t0: float, rows: list[list[float]]) -> list[Batch]:
        out: list[Batch] = []
        for i, row in enumerate(rows):
            if self._t0 is None:
                self._t0 = t0 + i / self.rate_hz
            self._rows.append(row)
            self.stats.samples += 1
            if len(self._rows) >= self.batch_size:
                out.append(self._take())
        return out

    def flush(self) -> Batch | None:
        """The partial batch, if any (the device went quiet: don't sit on its last samples)."""
        return self._take() if self._rows else None

    def _take(self) -> Batch:
        assert self._t0 is not None
        data = np.asarray(self._rows, dtype=np.float32).T.copy()
        batch = Batch(self._t0, self.rate_hz, self.channels, data)
        self._rows, self._t0 = [], None
        return batch


class MqttSource:
    """Subscribes to the configured topic and yields batches; reconnects forever with backoff."""

    def __init__(self, cfg: MqttConfig, rate_hz: float, batch_size: int,
                 wall: Callable[[], float]) -> None:
        self.cfg = cfg
        self.assembler = SampleAssembler(cfg.channels, rate_hz, batch_size)
        self._wall = wall
        self.connected = asyncio.Event()

    async def batches(self) -> AsyncIterator[Batch]:
        import aiomqtt  # only this source needs it; sim and csv ingest never pay for the import

        delay = self.cfg.reconnect_initial_s
        while True:
            try:
                async with aiomqtt.Client(self.cfg.host, self.cfg.port, identifier=self.cfg.client_id,
                                          username=self.cfg.username, password=self.cfg.password) as client:
                    await client.subscribe(self.cfg.topic, qos=self.cfg.qos)
                    log.info("ingest.mqtt_connected", host=self.cfg.host, port=self.cfg.port, topic=self.cfg.topic)
                    self.connected.set()
                    delay = self.cfg.reconnect_initial_s
                    async for batch in self._receive(client):
                        yield batch
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                log.warning("ingest.mqtt_disconnected", host=self.cfg.host, port=self.cfg.port, error=str(exc),
                            retry_in_s=delay)
                partial = self.assembler.flush()
                if partial is not None:
                    yield partial
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _receive(self, client: Any) -> AsyncIterator[Batch]:
        messages = aiter(client.messages)
        while True:
            try:
                async with asyncio.timeout(self.cfg.flush_after_s):
                    message = await anext(messages)
            except TimeoutError:
                partial = self.assembler.flush()
                if partial is not None:
                    yield partial
                continue
            payload = message.payload
            raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            for batch in self.assembler.feed(bytes(raw), self._wall()):
                yield batch
