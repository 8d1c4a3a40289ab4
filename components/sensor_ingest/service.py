"""The ingest component's I/O: a source, a pacer and the bus.

Everything that decides *what* to publish is pure and lives elsewhere; this module owns the event
loop work: sleeping until a batch is due, publishing it with the next sequence number, answering
fault-injection requests on ``control/<asset>/fault`` and restarting the source when the
configuration changes (the sequence number carries on, so a consumer sees no false gap).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from components.configuration import component_name, config_changes
from components.sensor_ingest.batch import Batch, Sequencer
from components.sensor_ingest.config import IngestConfig, load_config
from components.sensor_ingest.mqtt_source import MqttSource
from components.sensor_ingest.pacing import Pacer
from components.sensor_ingest.problems import log_due
from components.sensor_ingest.replay import CsvReplay, ReplayError
from components.sensor_ingest.simulator import SENSOR_FAULTS, Fault, FaultKind, TurbineSimulator
from ipc import Client, IpcError

log = structlog.get_logger(__name__)

COMPONENT = "com.nucleus.SensorIngest"



@dataclass(slots=True)
class Clocks:
    """Monotonic for pacing, wall for timestamps: injected so tests can drive both."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


_REQUEST_KEYS = ("fault", "severity", "channel", "mode", "action")


def handle_fault_request(sim: TurbineSimulator | None, request: Any) -> dict[str, Any]:
    """The reply to a ``control/<asset>/fault`` request; never raises on bad input.

    A key the request does not use is refused rather than ignored, as an unknown configuration key is:
    ``{"fault": "imbalance", "sevrity": 0.2}`` would otherwise inject at full severity and say ok, and
    a channel given for a machine fault (imbalance is the drivetrain's, not one sensor's) would be
    dropped while the requester believes one channel has it.
    """
    if sim is None:
        return {"ok": False, "error": "fault injection needs the simulator source (source: sim)", "active": []}
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a map with 'fault' and 'action'", "active": sim.active()}

    def refuse(error: str) -> dict[str, Any]:
        return {"ok": False, "error": error, "active": sim.active()}

    unknown = [k for k in request if k not in _REQUEST_KEYS]
    if unknown:
        return refuse(f"unknown key(s) {unknown}; a fault request has {list(_REQUEST_KEYS)}")
    action = request.get("action", "inject")
    if action == "clear_all":
        sim.clear_all()
        log.info("ingest.fault_cleared", fault="all")
        return {"ok": True, "active": sim.active()}
    if action not in ("inject", "clear"):
        return refuse(f"action must be inject, clear or clear_all, got {action!r}")
    try:
        kind = FaultKind(str(request.get("fault")))
    except ValueError:
        return refuse(f"unknown fault {request.get('fault')!r}; known: {[k.value for k in FaultKind]}")
    channel = request.get("channel")
    if channel is not None and not isinstance(channel, str):
        return refuse("channel must be a string")
    if channel is not None and kind not in SENSOR_FAULTS:
        return refuse(f"channel applies to the sensor faults {sorted(k.value for k in SENSOR_FAULTS)} only; "
                      f"{kind.value} is the machine's, on every channel")
    if action == "clear":
        cleared = sim.clear(kind, channel)
        log.info("ingest.fault_cleared", fault=kind.value, channel=channel, was_active=cleared)
        return {"ok": True, "cleared": cleared, "active": sim.active()}
    severity = request.get("severity", 1.0)
    if not isinstance(severity, int | float) or isinstance(severity, bool):
        return refuse(f"severity must be a number in 0..1, got {severity!r:.40}")
    if "mode" in request and kind is not FaultKind.DROPOUT:
        return refuse(f"mode applies to dropout only, not to {kind.value}")
    mode = request.get("mode", "nan")
    if mode not in ("nan", "zero"):
        return refuse(f"mode must be 'nan' or 'zero', got {mode!r:.40}")
    try:
        sim.inject(Fault(kind, float(severity), channel, mode))
    except ValueError as exc:
        return refuse(str(exc))
    log.info("ingest.fault_injected", fault=kind.value, severity=severity, channel=channel)
    return {"ok": True, "active": sim.active()}


class IngestService:
    def __init__(self, client: Client, cfg: IngestConfig, clocks: Clocks | None = None,
                 sequencer: Sequencer | None = None, faults_from: TurbineSimulator | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.clocks = clocks or Clocks()
        self.sequencer = sequencer or Sequencer(cfg.asset, cfg.source)
        self.sim: TurbineSimulator | None = None
        self._faults_from = faults_from  # the simulator this one replaces: its injected faults carry on
        self.mqtt: MqttSource | None = None
        self.published = 0
        self.skipped_batches = 0
        self.behind_events = 0  # times the pacer dropped a backlog (sim) or moved the schedule (csv)

    def _behind(self, event: str, **fields: Any) -> None:
        """Log falling behind at its 1st, 10th, 100th, ... occurrence with the totals: an ingest that
        cannot keep up (a rate the CPU cannot sustain) falls behind hundreds of times a second, and a line
        each time filled the log at 250 lines/s."""
        old = self.behind_events
        self.behind_events += 1
        if log_due(old, self.behind_events):
            log.warning(event, asset=self.cfg.asset, count=self.behind_events, **fields)

    # --- sources --------------------------------------------------------------------------------
    async def _sim_batches(self, pacer: Pacer) -> AsyncIterator[Batch]:
        cfg = self.cfg
        sim = TurbineSimulator(cfg.simulator.params(cfg.rate_hz), cfg.simulator.channels, seed=cfg.simulator.seed)
        if self._faults_from is not None:
            # A configuration change (a new rate, batch size) is not a repair: the faults a test injected
            # stay until it clears them. One on a channel the new configuration lacks cannot.
            dropped = sim.adopt_faults(self._faults_from)
            if self._faults_from.active():
                log.info("ingest.faults_kept", asset=cfg.asset, active=sim.active(), dropped=dropped)
            if dropped:
                log.warning("ingest.faults_dropped", asset=cfg.asset, dropped=dropped,
                            reason="the channels they show on are not in simulator.channels any more")
        self.sim = sim
        n, period = cfg.batch_size, cfg.batch_size / cfg.rate_hz
        epoch = self.clocks.wall()  # t0 of sample 0; every t0 after is epoch + index / rate: no drift
        while True:
            step = pacer.step(self.clocks.monotonic(), period)
            if step.skipped:
                sim.skip(step.skipped * n)
                self.skipped_batches += step.skipped
                self._behind("ingest.behind_skipped", batches=step.skipped, total_batches=self.skipped_batches,
                             max_burst=pacer.max_burst)
            if step.delay_s > 0:
                await asyncio.sleep(step.delay_s)
            t0 = epoch + sim.sample_index / cfg.rate_hz
            # After a skipped backlog the samples jump while seq does not: say so, or a consumer's window
            # would join both sides of the jump.
            yield Batch(t0, cfg.rate_hz, sim.channels, sim.generate(n), follows_gap=step.skipped > 0)

    async def _csv_batches(self, pacer: Pacer) -> AsyncIterator[Batch]:
        cfg = self.cfg
        assert cfg.csv is not None
        c = cfg.csv
        try:
            replay = CsvReplay(c.path, batch_size=cfg.batch_size, rate_hz=cfg.rate_hz, columns=c.columns,
                               channel_names=c.channel_names, timestamp_column=c.timestamp_column,
                               timestamp_unit=c.timestamp_unit, loop=c.loop,
                               on_problem=self._replay_problem)
        except ReplayError as exc:  # checked when the configuration was, so the file went since
            log.error("ingest.replay_failed", asset=cfg.asset, path=str(c.path), error=str(exc))  # noqa: TRY400
            return
        log.info("ingest.replay_started", asset=cfg.asset, path=str(c.path), channels=list(replay.channels),
                 speed=c.speed, timestamps=replay.has_timestamps,
                 timestamp_unit=replay.timestamp_unit if replay.has_timestamps else None)
        shift: float | None = None
        published = 0
        try:
            for batch in replay.batches():
                if shift is None:
                    shift = self.clocks.wall() - batch.t0 if (c.shift_to_now or not replay.has_timestamps) else 0.0
                period = batch.duration_s / c.speed if c.speed > 0 else 0.0
                step = pacer.step(self.clocks.monotonic(), period)
                if step.skipped:  # replay never drops data: the schedule moves, the data does not
                    self._behind("ingest.behind_rescheduled", periods=step.skipped)
                if step.delay_s > 0:
                    await asyncio.sleep(step.delay_s)
                elif period == 0:
                    await asyncio.sleep(0)
                published += 1
                yield dataclasses.replace(batch, t0=batch.t0 + shift)
        except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # e.g. a truncated .gz, a file removed
            # One line naming the file; the ingest then waits for a new configuration rather than crash-loop
            # on the same file (the stream stops, which sends the protective action to its safe state).
            log.error("ingest.replay_failed", asset=cfg.asset, path=str(c.path),  # noqa: TRY400
                      rows=replay.stats.rows, error=f"{type(exc).__name__}: {exc}")
            return
        s = replay.stats
        if not published:  # every row refused (no timestamp parsed, say): silence must not look like success
            log.error("ingest.replay_failed", asset=cfg.asset, path=str(c.path), rows=s.rows,
                      bad_timestamps=s.bad_timestamps, error="no row of the file could be replayed")
            return
        log.info("ingest.replay_finished", asset=cfg.asset, path=str(c.path), rows=s.rows, bad_values=s.bad_values,
                 bad_timestamps=s.bad_timestamps, short_rows=s.short_rows, long_rows=s.long_rows, gaps=s.gaps)

    def _replay_problem(self, reason: str, detail: str, count: int, where: str | None) -> None:
        event = "ingest.replay_gap" if reason == "gaps" else "ingest.replay_bad_input"
        log.warning(event, asset=self.cfg.asset, reason=reason, detail=detail, count=count, at=where)

    async def _mqtt_batches(self) -> AsyncIterator[Batch]:
        source = self.mqtt = MqttSource(self.cfg.mqtt, self.cfg.rate_hz, self.cfg.batch_size, self.clocks.wall)
        async for batch in source.batches():
            yield batch

    async def publish_leftover(self) -> None:
        """Publish the samples the MQTT source holds in a partial batch (its source was just stopped for a
        new configuration): they were received, and dropping them lost up to a batch less one unseen."""
        partial = self.mqtt.assembler.flush() if self.mqtt is not None else None
        if partial is not None:
            payload = self.sequencer.payload(partial)
            payload["published_at"] = self.clocks.wall()
            await self.client.publish(self.cfg.topic, payload)
            self.published += 1

    def _batches(self) -> AsyncIterator[Batch]:
        pacer = Pacer(self.cfg.max_burst)
        if self.cfg.source == "sim":
            return self._sim_batches(pacer)
        if self.cfg.source == "csv":
            return self._csv_batches(pacer)
        return self._mqtt_batches()

    # --- bus ------------------------------------------------------------------------------------
    async def publish_forever(self) -> None:
        """Publish the configured source's batches until cancelled (or a finite replay ends)."""
        topic = self.cfg.topic
        self.sequencer.source = self.cfg.source
        gen = self._batches()
        try:
            async for batch in gen:
                payload = self.sequencer.payload(batch)
                # Wall time of the hand-over to the bus: where end-to-end latency budgets start.
                payload["published_at"] = self.clocks.wall()
                await self.client.publish(topic, payload)
                self.published += 1
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    async def serve_faults(self) -> None:
        async with self.client.subscribe(f"control/{self.cfg.asset}/fault", queue_size=64) as requests:
            async for m in requests:
                try:
                    payload = m.payload
                except IpcError:
                    payload = None
                reply = handle_fault_request(self.sim, payload)
                if not reply["ok"]:
                    log.warning("ingest.fault_request_rejected", asset=self.cfg.asset, error=reply["error"])
                if m.reply_to is not None:
                    await m.reply(reply)


async def _save_leftover(service: IngestService) -> None:
    """Publish the samples the stopped source still holds, within 2 s (a stop has a grace period)."""
    try:
        async with asyncio.timeout(2):
            await service.publish_leftover()
    except (IpcError, TimeoutError) as exc:
        log.warning("ingest.leftover_lost", asset=service.cfg.asset, error=f"{type(exc).__name__}: {exc}")


def _config_changes(client: Client) -> AsyncIterator[IngestConfig]:
    return config_changes(client, lambda doc: load_config(doc, component_name(COMPONENT)), "ingest.config_rejected")


async def run(client: Client, cfg: IngestConfig | None = None, clocks: Clocks | None = None) -> None:
    """The component: publish, serve fault requests, restart the source on a valid configuration change.

    ``cfg`` given means a fixed configuration (development against ``ipc.devserver``): no watch.

    A change that keeps the asset keeps the sequencer, ``stream`` included: the numbering carries on, so
    the detector sees one stream and no restart (a new ``stream`` would make it discard its partial
    window, as after an ingest restart). A "change" to the configuration already running restarts
    nothing (each restart would reconnect the MQTT source): the SDK yields one configuration per
    deployment however many keys it set, but the first one it yields may be the one read at start.
    """
    watching = cfg is None
    if cfg is None:
        cfg = load_config(await client.get_configuration(), component_name(COMPONENT))
    changes = _config_changes(client) if watching else None

    async def next_change() -> IngestConfig | None:
        if changes is None:  # a fixed configuration: no change ever comes
            await asyncio.Event().wait()
            return None
        return await anext(changes, None)

    sequencer = Sequencer(cfg.asset, cfg.source)
    previous_sim: TurbineSimulator | None = None
    while True:
        service = IngestService(client, cfg, clocks, sequencer, faults_from=previous_sim)
        log.info("ingest.started", asset=cfg.asset, source=cfg.source, rate_hz=cfg.rate_hz,
                 batch_size=cfg.batch_size, topic=cfg.topic, first_seq=sequencer.next_seq)
        try:
            async with asyncio.TaskGroup() as tg:
                pub = tg.create_task(service.publish_forever())
                faults = tg.create_task(service.serve_faults())
                finished = False
                while True:
                    watch = tg.create_task(next_change())
                    await asyncio.wait({pub, watch}, return_when=asyncio.FIRST_COMPLETED)
                    if not watch.done():  # a finite replay ended: keep answering, wait for a new configuration
                        if not finished:
                            log.info("ingest.source_finished", asset=cfg.asset, published=service.published)
                            finished = True
                        await asyncio.wait({watch})
                    new = watch.result()
                    if new is None or new.source_settings() != cfg.source_settings():
                        break
                    if new != cfg:  # only a section this source does not read (simulator.seed under mqtt)
                        log.info("ingest.config_changed_source_kept", asset=cfg.asset, source=cfg.source)
                        cfg = service.cfg = new
                pub.cancel()
                faults.cancel()
        except asyncio.CancelledError:  # SIGTERM (nucleus stop, a new version): keep what was received
            await _save_leftover(service)
            raise
        await _save_leftover(service)
        if new is None:
            return  # the nucleus closed the watch stream: we are being stopped
        log.info("ingest.config_changed", asset=new.asset, source=new.source)
        if new.asset != cfg.asset:
            sequencer = Sequencer(new.asset, new.source)  # another asset: its own numbering from 0
            previous_sim = None  # another machine: its faults are not this one's
        else:
            # The source starts afresh (the replay from its first row, the simulator's phase from 0, the
            # MQTT source reconnected) while seq and stream carry on: the next batch does not continue
            # this one's samples, and must say so or the detector would join both into one window.
            sequencer.mark_gap()
            previous_sim = service.sim
        cfg = new
