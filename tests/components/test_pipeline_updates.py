"""Issue #4, point 5: each part of the anomaly pipeline is updatable on its own.

All four components (SensorIngest, the TurbineModel component, AnomalyDetector, ProtectiveAction)
run under a real daemon. While a bearing fault is switched on and off (so decisions keep flowing),
a new model version is deployed alone, then a new detector version alone.

What "no protective decision is missed" means here, precisely:

* The action is configured so that every scored window can matter: k=1 of n=1, not latching,
  release after 1 window below the threshold (tripRatio = releaseRatio = 1), no cooldown. Its state
  is then a pure function of the sequence of anomaly events: it trips on a window whose score is at
  or above that window's threshold while normal, and releases on a window below it while tripped.
* The test sees every anomaly event (``anomaly/turbine-1``, lossless subscription opened before the
  stack is deployed) and every decision (``actions/turbine-1``). It replays the rule over the events
  and requires the decisions to be exactly the expected ones: each expected trip/release has a
  decision naming that very event (``event_ids``), with the trip's actuator calls done; and there
  is no other decision — in particular no ``safe_state``, which a heartbeat or sensor silence
  longer than the configured budget would cause.
* During the model update no window may be lost either: window ends step by exactly one hop
  across the swap and the detector keeps its PID (the model is a SOFT dependency).
* A new detector version necessarily restarts the detector: windows that complete while it is
  down are not scored (no event exists, so the action cannot act on them). That blind gap is what
  ``heartbeatTimeoutS`` bounds: it is set to 10 s, far above the restart gap (0.5 to 1 s on a 2-core VM:
  stop, start the interpreter with numpy/onnxruntime, load and verify the model), so the action stays
  armed through a planned update, and would go to the safe state if the detector did not come back.
  (With 0.3 s this test fails: the action goes to ``safe_state`` during the detector update.)
  The gap itself is reported in the assertion messages, not asserted (timings go to benchmarks/).

The other components keep their PIDs through both updates; the model component, which runs once
and ends FINISHED, keeps its version and state through the detector update.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from components.anomaly import signing
from components.anomaly.features import FeatureExtractor, default_spec
from components.model_builder import data as datamod
from components.model_builder.package import Package, make_card, write_package
from components.model_builder.training import TrainParams, train
from components.sensor_ingest.simulator import KNOWN_CHANNELS, TurbineParams, TurbineSimulator
from ipc import Client

REPO = Path(__file__).resolve().parents[2]
ASSET = "turbine-1"
MODEL = "com.nucleus.TurbineModel"
INGEST, DETECTOR, ACTION = "com.nucleus.SensorIngest", "com.nucleus.AnomalyDetector", "com.nucleus.ProtectiveAction"
RATE, WINDOW, HOP = 1000.0, 256, 128
HEARTBEAT_TIMEOUT_S = 10.0


def build_model(out: Path, version: str, kind: Any, seed: int) -> Package:
    """A small real model trained on the simulator's healthy signal (another noise seed than the ingest's)."""
    channels = list(KNOWN_CHANNELS)
    sim = TurbineSimulator(TurbineParams(rate_hz=RATE), KNOWN_CHANNELS, seed=100 + seed)
    dataset = datamod.Dataset(channels, [sim.generate(60_000).astype(np.float64)], RATE, ["simulator"])
    spec = default_spec(channels, bands=4)
    features = FeatureExtractor(spec, channels, WINDOW).extract(datamod.windows(dataset, WINDOW, HOP))
    model = train(features, TrainParams(kind=kind, n_estimators=50, seed=seed, quantile=0.999, margin=1.2),
                  rate_hz=RATE, hop=HOP)
    card = make_card(model, component=MODEL, version=version, channels=channels, spec=spec, window=WINDOW, hop=HOP,
                     rate_hz=RATE, sources=["simulator"], rows=dataset.rows)
    key = signing.load_or_create_key(out / "keys" / "model.key")[0]
    return write_package(model, card, out, key)


def detector_recipe(version: str, directory: Path) -> Path:
    """A second version of the built-in detector: the same recipe under another version number."""
    doc = yaml.safe_load((REPO / "recipes" / f"{DETECTOR}-1.0.0.yaml").read_text())
    doc["ComponentVersion"] = version
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{DETECTOR}-{version}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expected_decisions(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(state, event_id) of each decision the configured policy must take, replayed over the events."""
    state, out = "normal", []
    for e in events:
        above = e["score"] >= e["threshold"]
        if state == "normal" and above:
            state = "tripped"
            out.append((state, e["event_id"]))
        elif state == "tripped" and not above:
            state = "normal"
            out.append((state, e["event_id"]))
    return out


class Watch:
    """A declared local client that sees every event and decision, and toggles the fault."""

    def __init__(self, daemon: Any, tmp: Path) -> None:
        policy = {"aws.greengrass.ipc.pubsub": {
            "watch": {"operations": ["aws.greengrass#SubscribeToTopic"],
                      "resources": [f"anomaly/{ASSET}", f"actions/{ASSET}", "heartbeat/anomaly_detector"]},
            "control": {"operations": ["aws.greengrass#PublishToTopic"], "resources": [f"control/{ASSET}/fault"]}}}
        (tmp / "watch-policy.json").write_text(json.dumps(policy))
        token = daemon.cli("client", "add", "test.watch", "--policy", str(tmp / "watch-policy.json")).stdout
        self.client = Client(daemon.socket, token.strip().splitlines()[-1], name="test.watch")
        self.events: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.heartbeats: list[tuple[float, dict[str, Any]]] = []
        self.subscribed = 0
        self.toggles = 0

    async def collect(self, topic: str, into: list[Any], stamp: bool = False) -> None:
        async with self.client.subscribe(topic, queue_size=100_000, policy="block") as msgs:
            self.subscribed += 1
            async for m in msgs:
                into.append((time.monotonic(), m.payload) if stamp else m.payload)

    async def toggle_fault(self, on_s: float = 0.5, off_s: float = 0.5) -> None:
        """Bearing defect on, off, on, ... until cancelled; always left off."""
        try:
            while True:
                await self.client.request(f"control/{ASSET}/fault", {"fault": "bearing_outer_race", "severity": 1.0})
                self.toggles += 1
                await asyncio.sleep(on_s)
                await self.client.request(f"control/{ASSET}/fault", {"action": "clear_all"})
                await asyncio.sleep(off_s)
        finally:
            await asyncio.shield(self.client.request(f"control/{ASSET}/fault", {"action": "clear_all"}))

    async def until(self, pred: Any, within_s: float, what: str) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if pred():
                return
            await asyncio.sleep(0.05)
        hb = self.heartbeats[-1][1] if self.heartbeats else None
        raise AssertionError(f"timed out waiting for {what}; last heartbeat {hb}")

    def versions_since(self, start: int) -> set[str]:
        return {e["model"]["version"] for e in self.events[start:]}


def pids(daemon: Any) -> dict[str, Any]:
    return {n: c.get("pids") for n, c in daemon.components().items()}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_model_then_detector_update_alone_keep_the_others_running_and_miss_no_decision(
        daemon_factory: Any, short_tmp: Path) -> None:
    out = short_tmp / "out"
    v1 = build_model(out, "1.0.0", "isolation_forest", seed=0)
    v2 = build_model(out, "2.0.0", "pca", seed=1)
    artifacts = str(out / "artifacts")
    detector_101 = detector_recipe("1.0.1", short_tmp / "recipes")
    config = {
        DETECTOR: {"MERGE": {"trustedKeys": [v1.public_key], "heartbeatIntervalS": 0.2, "modelPollIntervalS": 1.0}},
        ACTION: {"MERGE": {"policy": {"k": 1, "n": 1, "latch": False, "tripRatio": 1.0, "releaseRatio": 1.0,
                                      "releaseCount": 1, "cooldownS": 0, "tripActions": ["engage_brake"],
                                      "heartbeatTimeoutS": HEARTBEAT_TIMEOUT_S, "windowTimeoutS": HEARTBEAT_TIMEOUT_S,
                                      "sensorTimeoutS": 5}}},
    }
    daemon = daemon_factory()
    watch = Watch(daemon, short_tmp)
    gaps: dict[str, float] = {}
    marks: dict[str, int] = {}

    async def scenario() -> None:
        async with watch.client, asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(watch.collect(f"anomaly/{ASSET}", watch.events)),
                     tg.create_task(watch.collect(f"actions/{ASSET}", watch.actions)),
                     tg.create_task(watch.collect("heartbeat/anomaly_detector", watch.heartbeats, stamp=True))]
            await watch.until(lambda: watch.subscribed == 3, 10, "subscriptions")
            # The whole stack in one deployment, with the built-in recipes' defaults plus this test's policy.
            stack = [str(v1.recipe), *(str(REPO / "recipes" / f"{n}-1.0.0.yaml") for n in (INGEST, DETECTOR, ACTION))]
            args = ["deploy", *stack, "--artifacts", artifacts, "--update-config", json.dumps(config)]
            await asyncio.to_thread(daemon.cli, *args)
            await watch.until(lambda: len(watch.events) >= 3, 30, "scored windows from model 1.0.0")
            before = await asyncio.to_thread(pids, daemon)
            assert all(before[n] for n in (INGEST, DETECTOR, ACTION)), before
            toggler = tg.create_task(watch.toggle_fault())
            await watch.until(lambda: any(a["state"] == "tripped" for a in watch.actions), 15, "a first trip")

            # 1. A new model version alone.
            swap_from = marks["model"] = len(watch.events)
            await asyncio.to_thread(daemon.cli, "deploy", str(v2.recipe), "--artifacts", artifacts)
            await watch.until(lambda: "2.0.0" in watch.versions_since(swap_from), 20, "windows scored by model 2.0.0")
            await asyncio.sleep(2.5)
            after_model = await asyncio.to_thread(pids, daemon)
            gaps["model"] = float(np.max(np.diff([e["published_at"] for e in watch.events[swap_from - 5:]])))
            model_span = watch.events[swap_from - 5:]

            # 2. A new detector version alone (the model stays 2.0.0; its configuration carries over).
            restart_from = marks["detector"] = len(watch.events)
            t_hb = time.monotonic()
            await asyncio.to_thread(daemon.cli, "deploy", str(detector_101))
            await watch.until(lambda: len(watch.events) >= restart_from + 10, 30, "windows from detector 1.0.1")
            await asyncio.sleep(2.5)
            after_detector = await asyncio.to_thread(pids, daemon)
            stamps = [t for t, _ in watch.heartbeats if t >= t_hb - 1]
            gaps["detector_heartbeat"] = float(np.max(np.diff(stamps)))
            ends = [e["published_at"] for e in watch.events[restart_from - 3:]]
            gaps["detector_events"] = float(np.max(np.diff(ends)))

            # Stop the fault and let every decision arrive.
            toggler.cancel()
            await asyncio.gather(toggler, return_exceptions=True)
            settled = len(watch.events)
            await watch.until(lambda: len(watch.events) >= settled + 8, 20, "healthy windows after the fault")
            await watch.until(lambda: len(watch.actions) >= len(expected_decisions(watch.events))
                              or any(a["state"] not in ("normal", "tripped") for a in watch.actions), 10,
                              "the decisions of every flipping window")
            for t in tasks:
                t.cancel()

            # --- the model update ---
            assert after_model == before, f"PIDs changed by the model update: {before} -> {after_model}"
            versions = [e["model"]["version"] for e in model_span]
            assert versions == sorted(versions) and versions[-1] == "2.0.0", versions
            steps = np.round(np.diff([e["window"]["t_end"] for e in model_span]) * RATE).astype(int)
            assert set(steps.tolist()) == {HOP}, f"window lost or repeated across the model swap: {steps.tolist()}"
            # --- the detector update ---
            comps = await asyncio.to_thread(daemon.components)
            assert comps[DETECTOR]["version"] == "1.0.1" and comps[DETECTOR]["state"] == "RUNNING"
            assert after_detector[DETECTOR] != before[DETECTOR], "a new detector version runs in a new process"
            for name in (INGEST, ACTION):
                assert after_detector[name] == before[name], f"{name} restarted by the detector update"
            assert comps[MODEL]["version"] == "2.0.0" and comps[MODEL]["state"] == "FINISHED", comps[MODEL]
            assert watch.versions_since(restart_from) == {"2.0.0"}, "detector 1.0.1 found the current model"

    asyncio.run(scenario())

    # --- no decision missed, none invented ---
    expected = expected_decisions(watch.events)
    got = [(a["state"], a["event_ids"][-1] if a["event_ids"] else None) for a in watch.actions]
    bad = [a for a in watch.actions if a["state"] not in ("normal", "tripped")]
    assert not bad, f"unexpected decisions (gaps {gaps}): {[(a['state'], a['reason']) for a in bad]}"
    assert watch.toggles >= 6 and len(expected) >= 8, (watch.toggles, len(expected))
    assert got == expected, (f"decisions differ from the policy replayed over {len(watch.events)} events "
                             f"(gaps {gaps}): missing {set(expected) - set(got)}, extra {set(got) - set(expected)}")
    trips = [a for a in watch.actions if a["state"] == "tripped"]
    assert all(a["actions"] == ["engage_brake"] and all(o["ok"] for o in a["outcomes"]) for a in trips)
    # Decisions flowed during each update, not only before or after them.
    index = {e["event_id"]: i for i, e in enumerate(watch.events)}
    at = [index[eid] for _, eid in expected]
    assert any(marks["model"] <= i < marks["detector"] for i in at), (marks, at)
    assert any(i >= marks["detector"] for i in at), (marks, at)
    print(f"events {len(watch.events)}, decisions {len(got)}, toggles {watch.toggles}, marks {marks}, gaps {gaps}")
