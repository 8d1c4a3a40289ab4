"""MQTT source: samples published by a device or gateway to a broker, re-batched for the bus.

Devices publish JSON in one of two shapes, and both are accepted on the same topic:

* one sample: ``{"ts": 1700000000.125, "vib_x": 0.01, "vib_y": -0.02, "vib_z": 0.0, "temp": 45.1}``
  (``ts`` in epoch seconds, optional: the arrival time is used; a configured channel that is missing
  reads NaN);
* a block: ``{"t0": 1700000000.0, "rate_hz": 1000, "channels": ["vib_x", ...], "data": [[...], ...]}``
  (channel-major lists, like the bus payload; ``rate_hz`` optional, and refused unless it is rateHz).

:class:`SampleAssembler` is pure (no broker, no clock): it turns those messages into
:class:`~components.sensor_ingest.batch.Batch` objects of ``batch_size`` samples at the configured
rate, counts what it had to refuse or fill in, and reports each count when it passes 1, 10, 100, ...
(:class:`MqttSource` logs those as ``ingest.mqtt_bad_input`` / ``ingest.mqtt_gap``: a counter nobody
can read is no better than silence). :class:`MqttSource` is the aiomqtt client around it,
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
from components.sensor_ingest.problems import ProblemReport, log_due

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class AssemblerStats:
    messages: int = 0
    samples: int = 0
    malformed: int = 0  # refused: not JSON, not an object, a bad ts/t0, a block of the wrong shape
    rate_mismatch: int = 0  # refused: a block whose rate_hz is not the configured rateHz
    other_topic: int = 0  # refused: from another topic than the one this source takes samples from
    missing_values: int = 0  # configured channels absent from a message (NaN)
    bad_values: int = 0  # values that were not finite numbers (NaN): "x", true, NaN, Infinity, 1e400
    unknown_channels: int = 0  # channels in a message that are not configured (ignored)
    gaps: int = 0  # a message's own time was not the next sample's: the batch was ended before it
    out_of_order: int = 0  # refused: samples timed at or before one already taken (a QoS 1 duplicate, a late one)


@dataclass(slots=True)
class SampleAssembler:
    channels: tuple[str, ...]
    rate_hz: float
    batch_size: int
    on_problem: ProblemReport | None = None  # called when a count in ``stats`` passes 1, 10, 100, ...
    stats: AssemblerStats = field(default_factory=AssemblerStats)
    _t0: float | None = None
    _rows: list[list[float]] = field(default_factory=list)
    _next_t: float | None = None  # the time the sample after the last taken batch is due
    _after_gap: bool = False  # the batch being filled does not continue the last taken one
    _topic: str | None = None  # the topic samples are taken from: the first that delivered a valid one
    _current: str | None = None  # the topic of the message being fed

    def feed(self, raw: bytes, arrived: float, topic: str | None = None) -> list[Batch]:
        """One MQTT message in, zero or more complete batches out."""
        self.stats.messages += 1
        self._current = topic
        if topic is not None and self._topic is not None and topic != self._topic:
            # One source is one asset: samples of two devices interleaved into one batch are nobody's data.
            self._problem("other_topic", f"refused: this source takes samples from {self._topic!r} only "
                                         "(one topic per asset; a wildcard topic must match one device)")
            return []
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._problem("malformed", f"not JSON: {bytes(raw[:40])!r}")
            return []
        if not isinstance(doc, dict):
            self._problem("malformed", f"not a JSON object: {type(doc).__name__}")
            return []
        out = self._block(doc, arrived) if "data" in doc else self._sample(doc, arrived)
        if out is None:
            return []
        if self._topic is None:
            self._topic = topic
        return out

    def _problem(self, reason: str, detail: str, n: int = 1) -> None:
        old = getattr(self.stats, reason)
        setattr(self.stats, reason, old + n)
        if self.on_problem is not None and log_due(old, old + n):
            self.on_problem(reason, detail, old + n, self._current)

    def _sample(self, doc: dict[str, Any], arrived: float) -> list[Batch] | None:
        timed = "ts" in doc
        ts = doc.get("ts", arrived)
        if not _finite(ts) or ts > MAX_EPOCH_S:
            self._problem("malformed", _bad_time("ts", ts))
            return None
        missing = [name for name in self.channels if name not in doc]
        if missing:
            self._problem("missing_values", f"no {missing} in the sample (read as NaN); configured: "
                                            f"{list(self.channels)}", len(missing))
        unknown = [k for k in doc if k != "ts" and k not in self.channels]
        if unknown:
            self._problem("unknown_channels", f"{unknown[:8]} not configured (ignored); configured: "
                                              f"{list(self.channels)}", len(unknown))
        row = [self._number(name, doc[name]) if name in doc else math.nan for name in self.channels]
        return self._append(float(ts), [row], timed)

    def _number(self, name: str, v: Any) -> float:
        # json.loads takes NaN, Infinity and 1e400 (inf): no sensor measures an infinity, and a NaN the
        # device sent is a missing value like any other, so both are NaN and counted, never passed on unseen.
        if _finite(v):
            return float(v)
        self._problem("bad_values", f"{name!r} is {v!r:.40}, not a finite number (read as NaN)")
        return math.nan

    def _block(self, doc: dict[str, Any], arrived: float) -> list[Batch] | None:
        chans, data, t0, rate = doc.get("channels"), doc.get("data"), doc.get("t0", arrived), doc.get("rate_hz")
        if not _finite(t0) or t0 > MAX_EPOCH_S:
            self._problem("malformed", "block: " + _bad_time("t0", t0))
            return None
        if not isinstance(chans, list) or not all(isinstance(c, str) for c in chans):
            self._problem("malformed", "block: 'channels' must be a list of channel names")
            return None
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError):
            self._problem("malformed", "block: 'data' is not a numeric 2-D array (one list per channel)")
            return None
        if arr.ndim != 2 or arr.shape[0] != len(chans):
            self._problem("malformed", f"block: 'data' has shape {list(arr.shape)} for {len(chans)} channel(s); "
                                       "expected one list of samples per channel")
            return None
        if rate is not None and not (_finite(rate) and math.isclose(float(rate), self.rate_hz, rel_tol=1e-9)):
            self._problem("rate_mismatch", f"block rate_hz {rate!r:.40} is not this source's rateHz "
                                           f"{self.rate_hz:g} (refused: its samples would be stamped wrongly)")
            return None
        missing = [name for name in self.channels if name not in chans]
        if missing:
            self._problem("missing_values", f"no {missing} in the block (read as NaN); configured: "
                                            f"{list(self.channels)}", len(missing) * arr.shape[1])
        unknown = [c for c in chans if c not in self.channels]
        if unknown:
            self._problem("unknown_channels", f"{unknown[:8]} not configured (ignored); configured: "
                                              f"{list(self.channels)}", len(unknown))
        rows = np.full((arr.shape[1], len(self.channels)), np.nan)
        for j, name in enumerate(self.channels):
            if name in chans:
                rows[:, j] = arr[chans.index(name)]
        bad = int(np.count_nonzero(~np.isfinite(rows[:, [j for j, n in enumerate(self.channels) if n in chans]])))
        if bad:
            rows[~np.isfinite(rows)] = np.nan
            self._problem("bad_values", f"block: {bad} value(s) not finite numbers (NaN, Infinity; read as NaN)", bad)
        return self._append(float(t0), rows.tolist(), "t0" in doc)

    def _append(self, t0: float, rows: list[list[float]], timed: bool) -> list[Batch]:
        """Rows from ``t0`` on at the configured rate, for a message that carries its own time (``ts``,
        ``t0``) checked against the next sample's slot, to within half a sample period (one period of
        slack would let a lost or a duplicated sample shift every later sample by a period, unseen):

        * samples timed at or before one already taken (a QoS 1 redelivery, a late message) are refused
          as ``out_of_order``: publishing them again would repeat data and run time backwards;
        * a message further ahead (lost messages, a device that paused) or more than
          ``CLOCK_STEP_S`` behind (the device's clock was set back) ends the batch first,
          so ``t0 + i / rate_hz`` stays true in a batch."""
        out: list[Batch] = []
        expected = self._t0 + len(self._rows) / self.rate_hz if self._t0 is not None else self._next_t
        half = 0.5 / self.rate_hz
        if timed and rows and expected is not None and -CLOCK_STEP_S <= t0 - expected < -half:
            stale = min(len(rows), round((expected - t0) * self.rate_hz))
            self._problem("out_of_order", f"{stale} sample(s) from {t0:.6f} are at or before the last one taken "
                                          f"(the next is due at {expected:.6f}): refused, not published twice",
                          stale)
            rows = rows[stale:]
            t0 += stale / self.rate_hz
            if not rows:
                return out
        if timed and rows and expected is not None and abs(t0 - expected) > half:
            # also after a flush (the device went quiet): the next batch must not look continuous
            self._problem("gaps", f"sample time {t0:.6f} is {t0 - expected:+.6f} s off the next sample's "
                                  f"at {self.rate_hz:g} Hz: the batch ends before it")
            if self._rows:
                out.append(self._take())
            self._after_gap = True
        for i, row in enumerate(rows):
            if self._t0 is None:
                self._t0 = t0 + i / self.rate_hz
            self._rows.append(row)
            self.stats.samples += 1
            if len(self._rows) >= self.batch_size:
                out.append(self._take())
        return out

    def mark_gap(self) -> None:
        """Samples were lost here (the broker went away): the next batch must not look continuous, even
        when its messages carry no time of their own to show the hole."""
        if self._rows or self._next_t is not None:
            self._after_gap = True

    def flush(self) -> Batch | None:
        """The partial batch, if any (the device went quiet: don't sit on its last samples)."""
        return self._take() if self._rows else None

    def _take(self) -> Batch:
        assert self._t0 is not None
        data = np.asarray(self._rows, dtype=np.float32).T.copy()
        batch = Batch(self._t0, self.rate_hz, self.channels, data, follows_gap=self._after_gap)
        self._next_t = self._t0 + len(self._rows) / self.rate_hz
        self._rows, self._t0, self._after_gap = [], None, False
        return batch


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


CLOCK_STEP_S = 10.0  # a sample this far behind the next slot is a clock set back, not a late message

MAX_EPOCH_S = 1e11  # the year 5138 in seconds, 1973 in milliseconds: above it, a time is in milliseconds


def _bad_time(key: str, v: Any) -> str:
    if _finite(v) and v > MAX_EPOCH_S:  # the usual device mistake; taken as seconds it is 50,000 years ahead
        return f"{key!r} {v!r:.40} looks like milliseconds; epoch seconds expected"
    return f"{key!r} must be epoch seconds (a finite number), got {v!r:.40}"


def _honour_cancellation() -> None:
    """Raise the cancellation aiomqtt may have swallowed.

    aiomqtt awaits the broker's CONNACK and SUBACK with ``asyncio.wait_for``, which in Python 3.11
    returns the result instead of raising when a cancel lands as the answer arrives (fixed in 3.12).
    The ingest cancels its source to apply a new configuration; a swallowed cancel left the old source
    running and the ingest waiting for it for ever, so no later configuration was applied either,
    while every deployment said SUCCEEDED.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class MqttSource:
    """Subscribes to the configured topic and yields batches; reconnects forever with backoff."""

    def __init__(self, cfg: MqttConfig, rate_hz: float, batch_size: int,
                 wall: Callable[[], float]) -> None:
        self.cfg = cfg
        self.assembler = SampleAssembler(cfg.channels, rate_hz, batch_size, on_problem=self._report)
        self._wall = wall
        self.connected = asyncio.Event()

    def _report(self, reason: str, detail: str, count: int, topic: str | None) -> None:
        event = "ingest.mqtt_gap" if reason == "gaps" else "ingest.mqtt_bad_input"
        log.warning(event, reason=reason, detail=detail, count=count, topic=topic)

    async def batches(self) -> AsyncIterator[Batch]:
        import aiomqtt  # only this source needs it; sim and csv ingest never pay for the import

        delay = self.cfg.reconnect_initial_s
        while True:
            try:
                async with aiomqtt.Client(self.cfg.host, self.cfg.port, identifier=self.cfg.client_id,
                                          username=self.cfg.username, password=self.cfg.password) as client:
                    _honour_cancellation()
                    await client.subscribe(self.cfg.topic, qos=self.cfg.qos)
                    _honour_cancellation()
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
                self.assembler.mark_gap()  # what devices publish meanwhile is lost (clean session)
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
            for batch in self.assembler.feed(bytes(raw), self._wall(), str(message.topic)):
                yield batch
