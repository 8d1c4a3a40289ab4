"""Three turbines on one device: one SensorIngest per asset (the built-in recipe for turbine-1, copies of
it under other component names for turbine-2 and turbine-3, as docs/components.md says), one model, one
detector on ``sensors/+/raw`` and one ProtectiveAction with ``assets: [turbine-1, turbine-2, turbine-3]``,
all real processes under a real daemon.

What the multi-asset walk found, each checked here:

* a copy of the ingest recipe named the built-in (``com.nucleus.SensorIngest: invalid configuration``)
  in its refusal of a bad configuration, so the deployment's error named two components;
* an asset whose batches all reach the detector but are all dropped (here: turbine-3's ingest
  publishes two channels of the model's four) was never scored, and its protective action stayed
  ``normal`` for good: the detector heartbeat (one for all assets) and turbine-3's own sensor stream were
  both alive. ``policy.windowTimeoutS`` now puts that asset alone in its safe state;
* the detector heartbeat's totals could not say which asset that was: ``per_asset`` now does.

The rest is the multi-asset contract, asserted on the same run: windows are cut per asset (no sample of
one turbine in another's window, window ends step by exactly one hop per asset), and a fault injected on
turbine-2 trips turbine-2 alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_pipeline_updates import HOP, RATE, build_model

from components.protective_action.config import PolicyConfig
from components.protective_action.policy import AssetPolicy, State
from ipc import Client

REPO = Path(__file__).resolve().parents[2]
INGEST, DETECTOR, ACTION = "com.nucleus.SensorIngest", "com.nucleus.AnomalyDetector", "com.nucleus.ProtectiveAction"
ASSETS = ("turbine-1", "turbine-2", "turbine-3")


def ingest_copy(asset: str, directory: Path) -> tuple[str, Path]:
    """The built-in ingest recipe under another component name, for another asset (and noise seed)."""
    doc = yaml.safe_load((REPO / "recipes" / f"{INGEST}-1.0.0.yaml").read_text())
    name = f"com.farm.SensorIngest-{asset}"
    doc["ComponentName"] = name
    doc["ComponentConfiguration"]["DefaultConfiguration"]["asset"] = asset
    doc["ComponentConfiguration"]["DefaultConfiguration"]["simulator"]["seed"] = int(asset.rsplit("-", 1)[1])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-1.0.0.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return name, path


class Farm:
    """A declared local client that sees every asset's windows, decisions and the detector heartbeat."""

    def __init__(self, daemon: Any, tmp: Path) -> None:
        policy = {"aws.greengrass.ipc.pubsub": {
            "watch": {"operations": ["aws.greengrass#SubscribeToTopic"],
                      "resources": ["anomaly/+", "actions/+", "heartbeat/anomaly_detector"]},
            "control": {"operations": ["aws.greengrass#PublishToTopic"], "resources": ["control/+/fault"]}}}
        (tmp / "farm-policy.json").write_text(json.dumps(policy))
        token = daemon.cli("client", "add", "test.farm", "--policy", str(tmp / "farm-policy.json")).stdout
        self.client = Client(daemon.socket, token.strip().splitlines()[-1], name="test.farm")
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.actions: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.subscribed = 0

    async def collect(self, topic: str, into: list[Any], with_topic: bool = False) -> None:
        async with self.client.subscribe(topic, queue_size=100_000, policy="block") as msgs:
            self.subscribed += 1
            async for m in msgs:
                into.append((m.topic, m.payload) if with_topic else m.payload)

    def windows(self, asset: str) -> list[dict[str, Any]]:
        return [p for t, p in self.events if t == f"anomaly/{asset}"]

    async def until(self, pred: Any, within_s: float, what: str) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if pred():
                return
            await asyncio.sleep(0.05)
        hb = self.heartbeats[-1] if self.heartbeats else None
        decided = [(a["asset"], a["state"]) for a in self.actions]
        raise AssertionError(f"timed out waiting for {what}; decisions {decided}; last heartbeat {hb}")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_three_turbines_one_detector_one_action(daemon_factory: Any, short_tmp: Path) -> None:
    out = short_tmp / "out"
    model = build_model(out, "1.0.0", "isolation_forest", seed=0)
    model2 = build_model(out, "2.0.0", "pca", seed=1)
    copies = dict(ingest_copy(a, short_tmp / "recipes") for a in ASSETS[1:])
    name_of = {"turbine-1": INGEST, **{a: f"com.farm.SensorIngest-{a}" for a in ASSETS[1:]}}
    config = {
        DETECTOR: {"MERGE": {"trustedKeys": [model.public_key], "heartbeatIntervalS": 0.2}},
        ACTION: {"MERGE": {"assets": list(ASSETS),
                           "policy": {"cooldownS": 0, "heartbeatTimeoutS": 5, "sensorTimeoutS": 2,
                                      "windowTimeoutS": 2, "startupGraceS": 20}}},
    }
    daemon = daemon_factory()
    farm = Farm(daemon, short_tmp)
    marks: dict[str, int] = {}
    spans: dict[str, list[dict[str, Any]]] = {}

    async def scenario() -> None:
        async with farm.client, asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(farm.collect("anomaly/+", farm.events, with_topic=True)),
                     tg.create_task(farm.collect("actions/+", farm.actions)),
                     tg.create_task(farm.collect("heartbeat/anomaly_detector", farm.heartbeats))]
            await farm.until(lambda: farm.subscribed == 3, 10, "subscriptions")
            builtins = (str(REPO / "recipes" / f"{n}-1.0.0.yaml") for n in (INGEST, DETECTOR, ACTION))
            stack = [str(model.recipe), *builtins, *(str(p) for p in copies.values())]
            await asyncio.to_thread(daemon.cli, "deploy", *stack, "--artifacts", str(out / "artifacts"),
                                    "--update-config", json.dumps(config))
            await farm.until(lambda: all(len(farm.windows(a)) >= 8 for a in ASSETS), 40, "windows of every asset")

            # A fault on turbine-2 trips turbine-2, and only it.
            fault = {"fault": "bearing_outer_race", "severity": 1.0}
            reply = await farm.client.request("control/turbine-2/fault", fault)
            assert reply["ok"], reply
            await farm.until(lambda: any(a["asset"] == "turbine-2" for a in farm.actions), 15, "turbine-2's trip")
            await farm.client.request("control/turbine-2/fault", {"action": "clear_all"})

            # A new model version alone swaps for every asset, none losing a window.
            marks.update({a: len(farm.windows(a)) for a in ASSETS})
            await asyncio.to_thread(daemon.cli, "deploy", str(model2.recipe), "--artifacts", str(out / "artifacts"))
            await farm.until(lambda: all(sum(e["model"]["version"] == "2.0.0" for e in farm.windows(a)) >= 4
                                         for a in ASSETS), 20, "windows of every asset scored by model 2.0.0")
            spans.update({a: farm.windows(a)[marks[a] - 4:] for a in ASSETS})

            # A bad key for turbine-3's copy: the refusal names that copy, not the built-in it was made from.
            bad = await asyncio.to_thread(daemon.cli, "deploy", "--update-config",
                                          json.dumps({name_of["turbine-3"]: {"MERGE": {"batchSise": 50}}}), check=False)
            refusal = bad.stdout + bad.stderr
            assert "batchSise" in refusal and name_of["turbine-3"] in refusal, refusal
            assert f"{INGEST}:" not in refusal, f"a copy's refusal names the built-in ingest: {refusal}"

            # turbine-3's ingest now publishes two of the model's four channels: every batch arrives, none is scored.
            await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(
                {name_of["turbine-3"]: {"MERGE": {"simulator": {"channels": ["vib_x", "vib_y"]}}}}))
            await farm.until(lambda: any(a["asset"] == "turbine-3" for a in farm.actions), 20,
                             "turbine-3's safe state: its windows are no longer scored")
            t1_windows = len(farm.windows("turbine-1"))
            await farm.until(lambda: len(farm.windows("turbine-1")) >= t1_windows + 4, 10, "turbine-1 still scored")
            for t in tasks:
                t.cancel()

    asyncio.run(scenario())

    per_asset = farm.heartbeats[-1]["per_asset"]
    # Windows per asset: each event on its own asset's topic; no batch of another asset in its stream (which
    # the windower would count as duplicate, out of order or a restart); across the swap, window ends one
    # hop apart, the old model's windows then the new one's.
    for asset in ASSETS:
        assert {e["asset"] for e in farm.windows(asset)} == {asset}
        mixed = {k: v for k, v in per_asset[asset]["skipped"].items() if k in ("duplicate", "out_of_order", "restart")}
        assert not mixed, f"{asset}: {mixed}"
        versions = [e["model"]["version"] for e in spans[asset]]
        assert versions == sorted(versions) and versions[0] == "1.0.0" and versions[-1] == "2.0.0", versions
        steps = set(np.round(np.diff([e["window"]["t_end"] for e in spans[asset]]) * RATE).astype(int).tolist())
        assert steps == {HOP}, f"{asset}: window ends step by {steps} across the model swap, not one hop ({HOP})"
    # Decisions: turbine-2 latched by its fault, turbine-3 in its safe state for its unscored windows, turbine-1 none.
    by_asset = {a: [(d["state"], d["reason"]) for d in farm.actions if d["asset"] == a] for a in ASSETS}
    assert by_asset["turbine-1"] == [], by_asset
    assert [s for s, _ in by_asset["turbine-2"]] == ["latched"], by_asset
    trip = next(d for d in farm.actions if d["asset"] == "turbine-2")
    assert trip["timing"]["event_to_actuator_ms"] >= 0 and all(o["ok"] for o in trip["outcomes"]), trip
    (state, reason), = by_asset["turbine-3"]
    assert state == "safe_state" and "scored windows of turbine-3" in reason, by_asset
    # The heartbeat names the asset that is not watched, and why.
    assert set(per_asset) == set(ASSETS), per_asset
    t3 = per_asset["turbine-3"]
    assert t3["skipped"].get("missing_channel", 0) > 0 and t3["batch_age_s"] < 1.0 and t3["window_age_s"] > 1.0, t3
    for asset in ("turbine-1", "turbine-2"):
        assert per_asset[asset]["windows"] >= 8 and per_asset[asset]["window_age_s"] < 1.0, per_asset[asset]
    print(f"turbine-2 trip timing {trip['timing']}; heartbeat per_asset {per_asset}")


def _policy(**kw: Any) -> AssetPolicy:
    cfg = PolicyConfig(heartbeat_timeout_s=1.0, sensor_timeout_s=1.0, startup_grace_s=5.0, **kw)
    return AssetPolicy("turbine-3", cfg, started=0.0)


def test_window_timeout_puts_an_unscored_asset_in_its_safe_state() -> None:
    """Detector heartbeat and sensor stream alive, no scored window for this asset: the safe state,
    naming the asset's windows; and never with windowTimeoutS 0 (the default, as before)."""
    from components.protective_action.events import Observation

    watched, unwatched = _policy(window_timeout_s=1.5), _policy()
    for p in (watched, unwatched):
        p.on_heartbeat(0.0)
        p.on_sensor(0.0)
        p.on_event(Observation("e1", "turbine-3", 0.1, 1.0, 0.0, None, None), 0.0, 1000.0)
    for t in np.arange(0.1, 3.0, 0.1):  # heartbeat and batches keep coming, windows do not
        for p in (watched, unwatched):
            p.on_heartbeat(float(t))
            p.on_sensor(float(t))
        assert unwatched.on_tick(float(t), 1000.0 + t) is None
        d = watched.on_tick(float(t), 1000.0 + t)
        if d is not None:
            assert t > 1.5 and d.state is State.SAFE_STATE, (t, d)
            assert d.reason.startswith("fail-safe: scored windows of turbine-3 silent for"), d.reason
            break
    else:
        raise AssertionError("no safe state although no window was scored for 3 s")
    # Never a window since start: after the startup grace, as for the other inputs.
    fresh = _policy(window_timeout_s=1.5)
    fresh.on_heartbeat(5.5)
    fresh.on_sensor(5.5)
    d = fresh.on_tick(5.6, 1005.6)
    assert d is not None and "no scored windows of turbine-3 since start" in d.reason, d


def test_two_ingests_on_one_asset_are_named_interleaved_not_restarts() -> None:
    """A copy of the ingest recipe left on the built-in's asset: two streams alternate on one topic. Every
    batch restarts the window, so the asset is never scored; the count says why (a real restart never goes
    back to the stream it left)."""
    from components.anomaly_detector.windowing import Windower

    w = Windower(["vib_x"], 256, 128, RATE)
    data = np.zeros((1, 100), np.float32)
    windows = []
    for i in range(12):  # ingest A and its copy B, both asset turbine-1, each with its own numbering
        stream, seq = ("A", i // 2) if i % 2 == 0 else ("B", 1000 + i // 2)
        windows += w.push({"seq": seq, "stream": stream, "t0": i / 10, "rate_hz": RATE, "channels": ["vib_x"],
                           "data": data})
    assert windows == [] and w.skipped["interleaved"] == 10 and w.skipped["restart"] == 1, w.skipped
    # A genuine restart (a new stream id each time) stays a restart, and is followed.
    w = Windower(["vib_x"], 256, 128, RATE)
    for i, stream in enumerate(["A", "A", "B", "B", "B", "C", "C", "C"]):
        windows += w.push({"seq": i, "stream": stream, "t0": i / 10, "rate_hz": RATE, "channels": ["vib_x"],
                           "data": data})
    assert w.skipped == {"restart": 2} and len(windows) == 2, (w.skipped, len(windows))


async def test_a_slow_actuator_of_one_asset_does_not_hold_back_another_assets_trip(short_tmp: Path) -> None:
    """One action process for two assets, a command actuator whose brake takes long for t2 only (it ends
    when the test lets it). t1's trip, decided while t2's brake is still running, is acted on and
    acknowledged at once: before, every decision waited behind the one being actuated, whatever its
    asset, so one turbine's slow relay delayed another's protection by up to ``actuator.timeoutS``."""
    import uuid

    from ingest_action_kit import action_component, bus_server, client

    started, release = short_tmp / "t2-started", short_tmp / "t2-release"
    script = short_tmp / "brake.sh"
    script.write_text(f'#!/bin/sh\nif [ "$NUCLEUS_ASSET" = t2 ]; then\n  touch {started}\n  i=0\n'
                      f'  while [ ! -e {release} ] && [ $i -lt 400 ]; do sleep 0.02; i=$((i+1)); done\nfi\n')
    script.chmod(0o755)
    config = {"assets": ["t1", "t2"], "checkIntervalS": 0.02,
              "policy": {"k": 1, "n": 1, "cooldownS": 0, "heartbeatTimeoutS": 60, "sensorTimeoutS": 60,
                         "startupGraceS": 60, "tripActions": ["engage_brake"], "safeStateActions": ["engage_brake"]},
              "actuator": {"kind": "command", "timeoutS": 20, "commands": {"engage_brake": str(script)}}}

    def event(asset: str) -> dict[str, Any]:
        return {"event_id": uuid.uuid4().hex, "asset": asset, "ts": time.time(), "score": 2.0, "threshold": 1.0,
                "is_anomaly": True, "published_at": time.time()}

    async with bus_server(short_tmp) as server, action_component(server, config, short_tmp), \
            client(server.socket_path) as tc, tc.subscribe("actions/+") as actions:
        await tc.publish("anomaly/t2", event("t2"))
        for _ in range(500):  # bounded: t2's brake command starts within milliseconds
            if started.exists():
                break
            await asyncio.sleep(0.01)
        assert started.exists(), "t2's brake command did not start"
        await tc.publish("anomaly/t1", event("t1"))
        try:
            async with asyncio.timeout(5):  # t2's command runs until released (or 8 s): t1 must not wait for it
                first = (await anext(actions)).payload
        finally:
            release.touch()
        async with asyncio.timeout(20):
            second = (await anext(actions)).payload
    assert (first["asset"], first["state"]) == ("t1", "latched"), first
    assert (second["asset"], second["state"]) == ("t2", "latched"), second
    assert all(o["ok"] for o in first["outcomes"] + second["outcomes"]), (first, second)


async def test_decisions_of_many_assets_side_by_side_are_all_audited(short_tmp: Path) -> None:
    """Decisions of different assets are applied concurrently (the test above), so the audit log's one
    SQLite connection is used from the event loop (each write-ahead intent) and the audit worker (each
    durable outcome) at once. Without the audit log's lock, transactions interleaved: 'cannot start a
    transaction within a transaction', 'Safety level may not be changed inside a transaction', and
    decisions acted on but never recorded."""
    import sqlite3
    import uuid

    from test_protective_action import running

    from components.protective_action.config import load_config

    assets = [f"a{i}" for i in range(6)]
    cfg = load_config({"assets": assets, "policy": {
        "k": 1, "n": 1, "latch": False, "releaseCount": 1, "releaseRatio": 1.0, "cooldownS": 0,
        "heartbeatTimeoutS": 60, "sensorTimeoutS": 60, "startupGraceS": 60}})
    flips = 60
    async with running(short_tmp, cfg) as (service, tc), \
            tc.subscribe("actions/+", queue_size=10_000, policy="block") as acks:
        for i in range(flips):  # every event flips its asset: tripped, normal, tripped, ...
            for a in assets:
                await tc.publish(f"anomaly/{a}", {"event_id": uuid.uuid4().hex, "asset": a, "ts": time.time(),
                                                  "score": 2.0 if i % 2 == 0 else 0.1, "threshold": 1.0})
        acked = 0  # a decision whose audit failed is never acknowledged: wait for the others, bounded
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while acked < flips * len(assets):
                    await anext(acks)
                    acked += 1
    with sqlite3.connect(short_tmp / "audit.db") as conn:
        recorded = conn.execute("SELECT count(*) FROM decisions").fetchone()[0]
    assert service.stats.audit_failures == 0, service.stats.audit_failures
    assert recorded == acked == flips * len(assets), (recorded, acked)


async def test_a_hung_keepalive_of_one_asset_does_not_starve_another_assets_dead_man_timer(short_tmp: Path) -> None:
    """actuator.keepaliveS with a command: t2's keepalive program hangs (until the test releases it), t1's
    returns at once. t1's external timer must keep being refreshed meanwhile; before, the assets were
    refreshed one after the other, so t1's refresh waited for t2's program (up to timeoutS) and t1's
    dead-man timer could run out although t1's protection was working."""
    from ingest_action_kit import action_component, bus_server, client

    t1_log, release = short_tmp / "t1-keepalives", short_tmp / "t2-release"
    script = short_tmp / "keepalive.sh"
    script.write_text(f'#!/bin/sh\nif [ "$NUCLEUS_ASSET" = t2 ]; then\n  i=0\n'
                      f'  while [ ! -e {release} ] && [ $i -lt 400 ]; do sleep 0.02; i=$((i+1)); done\n'
                      f'else\n  echo . >> {t1_log}\nfi\n')
    script.chmod(0o755)
    config = {"assets": ["t1", "t2"], "checkIntervalS": 0.02,
              "policy": {"heartbeatTimeoutS": 60, "sensorTimeoutS": 60, "startupGraceS": 60},
              "actuator": {"kind": "command", "timeoutS": 20, "keepaliveS": 0.1,
                           "commands": {"engage_brake": "/bin/true", "pitch_to_feather": "/bin/true",
                                        "keepalive": str(script)}}}

    def refreshes() -> int:
        return len(t1_log.read_text().splitlines()) if t1_log.exists() else 0

    async with bus_server(short_tmp) as server, action_component(server, config, short_tmp), \
            client(server.socket_path) as tc:
        await tc.publish("heartbeat/anomaly_detector", {})
        await tc.publish("sensors/t1/raw", {})
        await tc.publish("sensors/t2/raw", {})
        try:
            for _ in range(400):  # bounded (4 s): t2's program hangs for 8 s unless released
                if refreshes() >= 5:
                    break
                await asyncio.sleep(0.01)
            seen = refreshes()
        finally:
            release.touch()
    assert seen >= 5, f"t1 refreshed {seen} times in 4 s while t2's keepalive hung (keepaliveS 0.1)"


def test_a_batch_on_one_assets_topic_never_joins_another_assets_windows(tmp_path: Path) -> None:
    """Publishing is authorized per topic: a producer allowed sensors/turbine-3/raw that says
    ``asset: turbine-1`` in its batch fed turbine-1's windows (and turbine-1's scored windows went out on
    anomaly/turbine-1), so one asset's samples were mixed into another's. Now the batch's own asset
    counts only if the topic carries it; otherwise the batch is dropped and counted under the topic's
    asset as ``asset_mismatch``."""
    from anomaly_models import BATCH, build, healthy
    from anomaly_models import batch as sensor_batch

    from components.anomaly import signing
    from components.anomaly_detector.config import load_config
    from components.anomaly_detector.scoring import load_model
    from components.anomaly_detector.service import Detector

    pkg = build(tmp_path, "1.0.0")
    detector = Detector(None, load_config({"trustedKeys": [pkg.public_key]}))  # type: ignore[arg-type]
    detector.model = load_model(pkg.model_dir, component="com.nucleus.TurbineModel", version="1.0.0",
                                trusted=signing.trusted_key_map([pkg.public_key]))
    for seq in range(4):  # turbine-1's own stream, and turbine-3's producer claiming turbine-1
        data = healthy(BATCH, start=seq * BATCH)
        detector._on_batch("sensors/turbine-1/raw", sensor_batch(seq, data, asset="turbine-1"))
        detector._on_batch("sensors/turbine-3/raw", sensor_batch(100 + seq, data * 50, asset="turbine-1"))
    per_asset = detector.per_asset()
    assert per_asset["turbine-1"]["skipped"] == {}, per_asset  # one stream, in order: nothing else got in
    assert per_asset["turbine-3"]["skipped"] == {"asset_mismatch": 4}, per_asset
    assert {p.asset for p in list(detector.queue._queue)} == {"turbine-1"}  # type: ignore[attr-defined]
    assert detector.queue.qsize() == (4 * BATCH - 128) // 64 + 1  # turbine-1's windows only (window 128, hop 64)
    # A sensorTopic of another shape: the batch's asset is one of the topic's levels, and is used.
    detector._on_batch("plant/north/turbine-7/raw", sensor_batch(0, healthy(BATCH), asset="turbine-7"))
    assert "turbine-7" in detector.windowers and "north" not in detector.windowers


async def test_a_skipped_simulator_backlog_is_marked_as_a_gap() -> None:
    """On a busy box (three ingests, a detector and an action on two cores) an ingest can stall past
    ``maxBurst``. The simulator then skips the backlog in whole batches, so the next batch's samples
    start later, but its ``seq`` is the next one: without ``follows_gap`` the detector joined the two
    sides of the jump into one window, and the asset's heartbeat counted no gap at all."""
    from components.sensor_ingest.batch import Sequencer
    from components.sensor_ingest.config import load_config as ingest_config
    from components.sensor_ingest.pacing import Pacer
    from components.sensor_ingest.service import Clocks, IngestService

    now = [0.0]
    cfg = ingest_config({"asset": "turbine-2", "batchSize": 100, "rateHz": 1000, "maxBurst": 3})
    service = IngestService(None, cfg, Clocks(monotonic=lambda: now[0], wall=lambda: 1000.0))  # type: ignore[arg-type]
    batches = service._sim_batches(Pacer(cfg.max_burst))
    sequencer = Sequencer(cfg.asset, "sim")
    payloads = [sequencer.payload(await anext(batches))]  # the schedule's anchor: sleeps one period (0.1 s)
    now[0] = 5.0  # the ingest stalled for ~5 s: 3 batches of burst, then the backlog is skipped
    payloads += [sequencer.payload(await anext(batches)) for _ in range(6)]
    await batches.aclose()
    jumps = [i for i in range(1, len(payloads)) if payloads[i]["t0"] - payloads[i - 1]["t0"] > 0.1 + 1e-6]
    assert len(jumps) == 1 and service.skipped_batches > 0, (jumps, service.skipped_batches)
    assert [bool(p.get("follows_gap")) for p in payloads] == [i in jumps for i in range(len(payloads))]
    assert [p["seq"] for p in payloads] == list(range(len(payloads)))  # seq stays consecutive: the flag says it
