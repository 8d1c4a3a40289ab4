"""The detector's I/O: bus subscriptions, model discovery and hot swap, scoring loop, events, heartbeat.

Tasks (one TaskGroup, all owned by :meth:`Detector.run`):

* ``ingest``  -- ``sensors/+/raw`` -> per-asset :class:`Windower` -> bounded queue of windows. Each
  queued window carries the model it was cut for, so windows cut before a swap are scored by the
  old model and windows cut after by the new one: a swap never drops or mis-scores a window.
* ``score``   -- takes one window, then whatever else is already queued (up to ``maxBatch``): when the
  detector is behind it scores a backlog in one ONNX call instead of one call per window.
* ``models``  -- ``models/<component>/available`` announcements plus a ``components.get`` poll; a new
  version is verified, loaded and warmed up in a worker thread, then swapped in between two messages.
  A model that fails any check is logged ``model.rejected`` and the current one stays.
* ``heartbeat`` -- every ``heartbeatIntervalS``: model version, windows scored, skip counters, lag.
* ``trim``    -- ``malloc_trim`` in a worker thread every ``trimMemoryEveryS`` and once a backlog has
  drained (at most once a second): the windows a burst queued are freed heap glibc would keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from components.anomaly import signing
from components.anomaly.announce import topic_for
from components.anomaly.errors import AnomalyError
from components.anomaly.model_card import CARD_FILE, MODEL_FILE, SIGNATURE_FILE
from components.anomaly_detector import knn_store, memory
from components.anomaly_detector.asset import AssetState
from components.anomaly_detector.capture import CapturePolicy
from components.anomaly_detector.config import COMPONENT, RESTART_KEYS, DetectorConfig, load_config
from components.anomaly_detector.scoring import LoadedModel, load_model
from components.anomaly_detector.windowing import Window, Windower
from components.configuration import component_name, config_changes
from ipc import Client, IpcError, ResourceNotFound

log = structlog.get_logger("anomaly_detector")


@dataclass(slots=True)
class _Pending:
    asset: str
    window: Window
    model: LoadedModel



_Stamp = tuple[tuple[int, ...] | None, ...]
_ModelKey = tuple[str, str, _Stamp]  # version, artifacts path, the files' stamp


def _files_stamp(directory: Path) -> _Stamp:
    """Inode, size and modification time of each model file (None: absent): changes when a deployment
    puts other files there, so a refused version is looked at again."""
    out: list[tuple[int, ...] | None] = []
    for name in (MODEL_FILE, CARD_FILE, SIGNATURE_FILE):
        try:
            st = (directory / name).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def asset_of(topic: str) -> str:
    parts = topic.split("/")
    return parts[1] if len(parts) >= 3 else topic


class Detector:
    def __init__(self, client: Client, config: DetectorConfig) -> None:
        self.client = client
        self.config = config
        self.model: LoadedModel | None = None
        self.windowers: dict[str, Windower] = {}
        # Per asset, the alarm state (and knn memory) of the model it belongs to (a new model starts afresh).
        self.alarms: dict[str, AssetState] = {}
        self.alarms_raised = 0
        self.skipped: Counter[str] = Counter()  # counts not tied to an asset's windower
        self.asset_skipped: dict[str, Counter[str]] = {}  # the same, per asset (no_model, overload, ...)
        self.windows_scored = 0
        self.anomalies = 0
        # Per asset: windows scored, anomalous ones, and when a batch / a scored window last came (monotonic).
        # The totals cannot say which of several assets is not being watched (heartbeat ``per_asset``).
        self.asset_windows: Counter[str] = Counter()
        self.asset_anomalies: Counter[str] = Counter()
        self.last_batch: dict[str, float] = {}
        self.last_window: dict[str, float] = {}
        self.captured = 0
        self.asset_captured: Counter[str] = Counter()
        self.lag_s: float | None = None
        self.rejected: dict[_ModelKey, dict[str, Any]] = {}
        self.last_rejection: dict[str, Any] | None = None
        self._loaded: _ModelKey | None = None  # the model in use: version, path, its files' stamp
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=config.max_pending_windows)
        self.capture = CapturePolicy(config.capture_low_confidence_below, config.capture_normal_every,
                                     config.capture_max_per_minute)
        self._check_models = asyncio.Event()
        self._backlog_drained = asyncio.Event()
        self._trusted = self._trusted_keys(config)
        self._log_times: dict[tuple[str, str], float] = {}
        self._logged_counts: dict[tuple[str, str], int] = {}  # per (asset, kind): the total last logged

    @staticmethod
    def _trusted_keys(config: DetectorConfig) -> dict[str, Any]:
        trusted: dict[str, Any] = {}
        for text in config.trusted_keys:
            try:
                trusted |= signing.trusted_key_map([text])
            except AnomalyError as exc:
                log.error("detector.trusted_key_invalid", **exc.fields())  # noqa: TRY400 - fields say it all
        return trusted

    async def run(self) -> None:
        log.info("detector.started", model_component=self.config.model_component,
                 trusted_keys=sorted(self._trusted), sensor_topic=self.config.sensor_topic)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._models())
                tg.create_task(self._announcements())
                tg.create_task(self._config_watch())
                tg.create_task(self._heartbeat())
                tg.create_task(self._score_loop())
                tg.create_task(self._ingest())
                if self.config.trim_memory_every_s > 0:
                    tg.create_task(self._trim_memory())
                if self.config.memory_save_every_s > 0:
                    tg.create_task(self._save_memories_every())
        finally:
            self.save_memories()  # stopping (SIGTERM, a new version): keep what the models learnt

    # --- knn run-time memory across restarts -------------------------------------------------------
    def _memory_path(self, asset: str, model: LoadedModel) -> Path:
        return knn_store.path_for(Path(self.config.memory_dir), model.component, model.version, asset)

    def _snapshots(self) -> list[tuple[Path, dict[str, Any]]]:
        """Copies of every learning asset's memory, taken on the loop (the disk write may happen off it)."""
        return [(self._memory_path(a, st.model), st.memory.snapshot()) for a, st in list(self.alarms.items())
                if st.memory is not None]

    @staticmethod
    def _write_memory(path: Path, snapshot: dict[str, Any]) -> None:
        try:
            knn_store.save(path, snapshot)
        except OSError as exc:  # a full disk must not stop the detector; the previous file stays
            log.warning("detector.memory_not_saved", path=str(path), error=str(exc)[:200])

    def save_memories(self) -> None:
        for path, snapshot in self._snapshots():
            self._write_memory(path, snapshot)

    async def _save_memories_every(self) -> None:
        while True:
            await asyncio.sleep(self.config.memory_save_every_s)
            for path, snapshot in self._snapshots():
                await asyncio.to_thread(self._write_memory, path, snapshot)

    # --- input -------------------------------------------------------------------------------
    async def _ingest(self) -> None:
        async with self.client.subscribe(self.config.sensor_topic, queue_size=self.config.subscription_queue) as msgs:
            async for m in msgs:
                if m.dropped:
                    self._skip("bus_dropped", m.dropped)
                self._on_batch(m.topic, m.payload)

    def _on_batch(self, topic: str, payload: Any) -> None:
        model = self.model
        claimed = payload.get("asset") if isinstance(payload, dict) else None
        # The batch's own asset names it (a sensorTopic of another shape may put it at another level), but
        # only if the topic carries it too: publishing is authorized per topic, and a batch on
        # sensors/turbine-3/raw that says turbine-1 must not add samples to turbine-1's windows.
        mismatch = isinstance(claimed, str) and bool(claimed) and claimed not in topic.split("/")
        asset = claimed if isinstance(claimed, str) and claimed and not mismatch else asset_of(topic)
        self.last_batch[asset] = time.monotonic()
        if model is None:
            self._skip("no_model", 1, asset=asset)
            return
        if not isinstance(payload, dict):
            self._skip("malformed", 1, asset=asset)
            return
        w = self.windowers.get(asset)
        if w is None:
            card = model.card
            w = self.windowers[asset] = Windower(list(card.channels), card.window, card.hop, card.sample_rate_hz)
        if mismatch:
            w.skipped["asset_mismatch"] += 1
            self._log_skips(asset, w)
            return
        before = sum(w.skipped.values())
        try:
            windows = w.push(payload)
        except Exception as exc:  # a batch the Windower's checks missed must cost that batch, not the detector
            w.skipped["malformed"] += 1
            w.reset()
            log.exception("input.batch_failed", asset=asset, error=str(exc)[:300])
            windows = []
        if sum(w.skipped.values()) != before:
            self._log_skips(asset, w)
        for win in windows:
            try:
                self.queue.put_nowait(_Pending(asset, win, model))
            except asyncio.QueueFull:
                self._skip("overload", 1, asset=asset)

    def _skip(self, kind: str, n: int, **fields: Any) -> None:
        """Count what the detector itself skips (not a windower's defects) and log it, at most every 5 s per
        kind: these were counted in the heartbeat only, so the log never said why windows went missing."""
        self.skipped[kind] += n
        if isinstance(asset := fields.get("asset"), str):  # per_asset says it too, beside the windower's
            self.asset_skipped.setdefault(asset, Counter())[kind] += n
        now = time.monotonic()
        if now - self._log_times.get(("", kind), -1e9) >= 5.0:
            self._log_times[("", kind)] = now
            log.warning("input.skipped", kind=kind, total=self.skipped[kind], **fields)

    def _log_skips(self, asset: str, w: Windower) -> None:
        now = time.monotonic()
        for kind, count in w.skipped.items():
            # only kinds whose count moved: every kind ever seen was logged again with its old total
            # whenever another one changed, so a new NaN read like a new duplicate and gap as well
            if count == self._logged_counts.get((asset, kind), 0):
                continue
            last = self._log_times.get((asset, kind), -1e9)
            if now - last >= 5.0:
                self._log_times[(asset, kind)] = now
                log.warning("input.skipped", asset=asset, kind=kind, total=count,
                            new=count - self._logged_counts.get((asset, kind), 0),
                            **({"last": w.why[kind]} if kind in w.why else {}))
                self._logged_counts[(asset, kind)] = count

    # --- scoring -----------------------------------------------------------------------------
    async def _score_loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.config.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            # Windows queued across a swap belong to two models: score each run with its own model.
            start = 0
            while start < len(batch):
                model = batch[start].model
                end = start
                while end < len(batch) and batch[end].model is model:
                    end += 1
                await self._score(model, batch[start:end])
                start = end
            if len(batch) > 1 and self.queue.empty():
                self._backlog_drained.set()

    async def _score(self, model: LoadedModel, items: list[_Pending]) -> None:
        try:
            scored = model.score(np.stack([p.window.data for p in items]),
                                 np.array([p.window.t_end for p in items], dtype=np.float64))
        except Exception as exc:  # never let one bad window kill the detector; count and say why
            for p in items:
                self.asset_skipped.setdefault(p.asset, Counter())["score_error"] += 1
            self.skipped["score_error"] += len(items)
            log.exception("window.score_failed", error=str(exc)[:300], model_version=model.version, windows=len(items))
            return
        now = time.time()
        finite = np.isfinite(scored.scores) & np.isfinite(scored.features).all(axis=1)
        for i, p in enumerate(items):
            if not finite[i]:
                self._skip("nonfinite_features", 1, asset=p.asset, model_version=model.version)
                continue
            judged = self._asset_state(p.asset, model).judge(float(scored.scores[i]), scored.features[i],
                                                             p.window.data, p.window.follows)
            score, decision = judged.score, judged.decision
            shares = scored.shares[i]
            if judged.contributions is not None:  # the score came from the run-time memory: explain that
                total = float(judged.contributions.sum())
                shares = judged.contributions / total if total > 0 else np.zeros_like(judged.contributions)
            is_anomaly = decision.is_anomaly
            confidence = model.card.confidence(score)
            event = {
                "event_id": str(uuid.uuid4()), "asset": p.asset, "ts": now,
                "window": {"seq_first": p.window.seq_first, "seq_last": p.window.seq_last, "t_end": p.window.t_end},
                "score": score, "threshold": model.threshold, "is_anomaly": is_anomaly, "confidence": confidence,
                "alarm": decision.alarm, "tail_probability": decision.tail,
                "contributions": model.top(shares, self.config.top_contributors),
                "model": model.describe(), "published_at": time.time(),
            }
            await self.client.publish(f"{self.config.anomaly_topic_prefix}/{p.asset}", event)
            self.windows_scored += 1
            self.anomalies += int(is_anomaly)
            self.asset_windows[p.asset] += 1
            self.asset_anomalies[p.asset] += int(is_anomaly)
            self.last_window[p.asset] = time.monotonic()
            self.alarms_raised += int(decision.alarm)
            self.lag_s = now - p.window.t_end
            kind = self.capture.decide(asset=p.asset, is_anomaly=is_anomaly, confidence=confidence, now=now)
            if kind is not None:
                sample: dict[str, Any] = {"kind": kind, "asset": p.asset, "score": score, "threshold": model.threshold,
                                          "features": scored.features[i], "feature_names": model.card.feature_names,
                                          "model_version": model.version, "model_component": model.component,
                                          "ts": now, "event_id": event["event_id"]}
                if self.config.capture_include_window:
                    sample["window"] = p.window.data
                await self.client.publish(f"{self.config.retraining_topic_prefix}/{p.asset}", sample)
                self.captured += 1
                self.asset_captured[p.asset] += 1

    def _asset_state(self, asset: str, model: LoadedModel) -> AssetState:
        held = self.alarms.get(asset)
        if held is None or held.model is not model:
            c = self.config
            held = self.alarms[asset] = AssetState.start(
                model, mode=c.alarm_mode, holdoff_windows=c.alarm_holdoff_windows,
                tail_probability=c.alarm_tail_probability)
            if held.memory is not None:
                path = self._memory_path(asset, model)
                snap = knn_store.load(path)
                if snap is not None and held.memory.restore(snap):
                    log.info("detector.memory_restored", asset=asset, model_version=model.version,
                             windows=len(held.memory))
                elif snap is not None:  # it was silently dropped: say so, the memory starts empty
                    log.warning("detector.memory_unreadable", path=str(path),
                                error="not this model's memory (width, dtype or non-finite values)")
        return held

    async def _trim_memory(self) -> None:
        """A backlog's windows (16 KB each at 1024 x 4) are malloc'ed and freed in bursts; glibc keeps the
        freed heap until trimmed (measured: +4.5 MB RSS after the pipeline benchmark's saturation)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._backlog_drained.wait(), self.config.trim_memory_every_s)
            self._backlog_drained.clear()
            await asyncio.to_thread(memory.release_free_memory)
            await asyncio.sleep(1.0)

    # --- models ------------------------------------------------------------------------------
    async def _announcements(self) -> None:
        async with self.client.subscribe(topic_for(self.config.model_component), queue_size=16) as msgs:
            async for m in msgs:
                log.info("model.announced", payload_version=(m.payload or {}).get("version")
                         if isinstance(m.payload, dict) else None)
                self._check_models.set()

    async def _config_watch(self) -> None:
        """Each valid new configuration, applied; the SDK's configuration_changes also answers the
        nucleus's validation of proposed configurations with the same parser."""

        with contextlib.suppress(IpcError):
            async for new in config_changes(self.client, lambda doc: load_config(doc, component_name(COMPONENT)),
                                          "detector.config_rejected"):
                self._apply_config(new)

    def _apply_config(self, new: DetectorConfig) -> None:
        self._trusted = self._trusted_keys(new)
        alarm_keys = ("alarm_mode", "alarm_holdoff_windows", "alarm_tail_probability")
        if any(getattr(self.config, k) != getattr(new, k) for k in alarm_keys):
            self.save_memories()
            self.alarms.clear()  # the next window starts each asset's alarm state under the new policy
        capture_keys = ("capture_low_confidence_below", "capture_normal_every", "capture_max_per_minute")
        if any(getattr(self.config, k) != getattr(new, k) for k in capture_keys):
            self.capture = CapturePolicy(new.capture_low_confidence_below, new.capture_normal_every,
                                         new.capture_max_per_minute)
        # Everything but the keys read at start (a change to those restarts the detector: RESTART_KEYS)
        self.config = new.model_copy(update={k: getattr(self.config, k) for k in RESTART_KEYS})
        log.info("detector.config_applied")
        self.rejected.clear()  # a newly trusted key may make a rejected model good
        self._check_models.set()

    async def _models(self) -> None:
        while True:
            await self._check_model_once()
            self._check_models.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_models.wait(), self.config.model_poll_interval_s)

    async def _check_model_once(self) -> None:
        name = self.config.model_component
        try:
            info = await self.client.get_component(name)
        except ResourceNotFound:
            self._once("model.not_deployed", component=name)
            return
        except IpcError as exc:
            self._once("model.lookup_failed", component=name, code=exc.code, error=str(exc))
            return
        version = str(info.get("version"))
        path = info.get("artifacts_path")
        if not path:
            root = os.environ.get("NUCLEUS_ROOT", "")
            path = str(Path(root) / "packages" / "artifacts" / name / version)
        # The files' identity is part of the key: a version refused for its files (tampered, corrupt, a bad
        # card) and then deployed again with good ones is tried again; by (version, path) alone it stayed
        # refused, with the fixed model on disk, until the detector restarted. Likewise the version in use,
        # deployed again with other files, is loaded again: the detector scores what is on disk.
        key = (version, str(path), _files_stamp(Path(path)))
        if self.model is not None and self._loaded == key:
            return
        if key in self.rejected:
            return
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(load_model, Path(path), component=name, version=version,
                                            trusted=self._trusted, threads=self.config.intra_op_threads)
        except AnomalyError as exc:
            fields = exc.fields()
            self.rejected[key] = fields
            self.last_rejection = fields
            log.error("model.rejected", kept_version=self.model.version if self.model else None,  # noqa: TRY400
                      **fields)
            return
        self._swap(model, (time.perf_counter() - started) * 1000)
        self._loaded = key
        if self.config.release_memory_after_load:
            released = await asyncio.to_thread(memory.release, unmap_shared=True)
            log.info("memory.released", rss_before_mb=released.rss_before_mb, rss_after_mb=released.rss_after_mb,
                     mappings=released.mappings, trimmed=released.trimmed)

    def _swap(self, model: LoadedModel, load_ms: float) -> None:
        """No await in here: between two bus messages the windowers and the model change together."""
        old = self.model
        card = model.card
        for w in self.windowers.values():
            w.reconfigure(list(card.channels), card.window, card.hop, card.sample_rate_hz)
        self.model = model
        # A rejection is about what was deployed last; once a model loads after it (that version deployed
        # again with good files, or a newer one) it is history, kept in the log: the heartbeat went on
        # saying a version was rejected next to the newer model_version that replaced it.
        self.last_rejection = None
        log.info("model.swapped", component=model.component, version=model.version, key_id=model.key_id,
                 previous=old.version if old else None, load_ms=round(load_ms, 1), kind=card.kind,
                 threshold=model.threshold)

    def _once(self, event: str, **fields: Any) -> None:
        key = (event, str(fields.get("code", "")))
        if key not in self._log_times:
            self._log_times[key] = time.monotonic()
            log.warning(event, **fields)

    # --- heartbeat -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        skipped = Counter(self.skipped)
        for w in self.windowers.values():
            skipped.update(w.skipped)
        m = self.model
        return {"ts": time.time(), "ready": m is not None, "model_component": self.config.model_component,
                "model_version": m.version if m else None, "model_key_id": m.key_id if m else None,
                "windows": self.windows_scored, "anomalies": self.anomalies, "alarms": self.alarms_raised,
                "captured": self.captured,
                "skipped": dict(skipped), "lag_s": self.lag_s, "pending": self.queue.qsize(),
                "assets": sorted(self.windowers.keys() | self.last_batch.keys()), "model_rejected": self.last_rejection,
                "per_asset": self.per_asset()}

    def per_asset(self) -> dict[str, dict[str, Any]]:
        """Each asset seen on the sensor topic: what was scored, what was skipped and why, and how long
        ago its last batch and its last scored window were (None: never). An asset whose batches keep
        coming while no window is scored (a channel the model needs is missing, another sample rate) is
        an asset nobody watches: the totals beside hide it behind the other assets' windows."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for asset in sorted(self.last_batch.keys() | self.windowers.keys()):
            w = self.windowers.get(asset)
            batch, window = self.last_batch.get(asset), self.last_window.get(asset)
            out[asset] = {"windows": self.asset_windows[asset], "anomalies": self.asset_anomalies[asset],
                          "captured": self.asset_captured[asset],
                          "skipped": dict((w.skipped if w is not None else Counter())
                                          + self.asset_skipped.get(asset, Counter())),
                          "batch_age_s": None if batch is None else round(now - batch, 3),
                          "window_age_s": None if window is None else round(now - window, 3)}
        return out

    async def _heartbeat(self) -> None:
        while True:
            await self.client.publish(self.config.heartbeat_topic, self.status())
            await asyncio.sleep(self.config.heartbeat_interval_s)


async def main(client: Client) -> None:
    """An invalid configuration (an unknown key too) ends the detector here with ConfigError, which
    ipc.run_component logs (``component.failed``) and reports ERRORED, as the other components do."""
    await Detector(client, load_config(await client.get_configuration(), component_name(COMPONENT))).run()
