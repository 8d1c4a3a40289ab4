"""The detector: windowing defects counted, model checks, capture policy (pure, fast); then the real
component on a real daemon: events per window, hot swap without a lost window, tampered model kept out."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from anomaly_models import BATCH, HOP, RATE, WINDOW, batch, build, faulty, healthy

from components.anomaly import signing
from components.anomaly.errors import DigestMismatchError, ModelLoadError, UntrustedKeyError
from components.anomaly_detector.capture import CapturePolicy
from components.anomaly_detector.config import COMPONENT, DetectorConfig, load_config
from components.anomaly_detector.scoring import load_model
from components.anomaly_detector.windowing import Windower
from components.configuration import ConfigError
from components.model_builder.package import recipe_document
from ipc import Client
from nucleus.config_store import apply_update

REPO = Path(__file__).resolve().parents[2]
NAME = "com.nucleus.TurbineModel"
DETECTOR_RECIPE = REPO / "recipes" / "com.nucleus.AnomalyDetector-1.0.0.yaml"


# --- windowing ---------------------------------------------------------------------------------

def stream(w: Windower, seqs: list[int], n: int = 10, **kw: Any) -> list[Any]:
    out = []
    for s in seqs:
        out += w.push(batch(s, np.vstack([np.arange(s * n, s * n + n)] * 2).astype(np.float32), **kw))
    return out


def test_windows_carry_sequence_and_time() -> None:
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    wins = stream(w, list(range(6)))
    assert [(x.seq_first, x.seq_last) for x in wins] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert wins[0].data[0, 0] == 0 and wins[-1].data[0, -1] == 59
    assert wins[0].t_end == pytest.approx(1 * BATCH / RATE + 9 / RATE)  # t0 of batch 1 + its 10th sample
    assert not w.skipped


def test_duplicates_and_out_of_order_are_dropped_and_counted() -> None:
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    wins = stream(w, [0, 1, 1, 0, 2])
    assert w.skipped == {"duplicate": 1, "out_of_order": 1}
    assert [x.data[0, -1] for x in wins] == [19, 29]  # batch 2 follows batch 1 seamlessly


def test_a_restarted_producer_is_followed_not_dropped_as_out_of_order() -> None:
    """A restarted ingest counts from 0 again: every batch used to be dropped as out_of_order until its
    seq caught up with the old one, while the stream looked alive to the fail-safe."""
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    data = np.ones((2, 10), dtype=np.float32)
    for s in range(50):
        w.push({**batch(s, data), "stream": "first"})
    wins = []
    for s in range(4):  # the new run of the numbering, later in time
        wins += w.push({**batch(s, data, t0=100.0 + s * BATCH / RATE), "stream": "second"})
    assert w.skipped == {"restart": 1} and [(x.seq_first, x.seq_last) for x in wins] == [(0, 1), (1, 2), (2, 3)]
    # a producer without stream ids: a lower seq stamped later is a restart, stamped earlier a late batch
    legacy = Windower(["vib_x", "temp"], 20, 10, RATE)
    for s in range(50):
        legacy.push(batch(s, data))
    legacy.push(batch(3, data))  # an old batch arriving late
    assert legacy.skipped == {"out_of_order": 1}
    assert legacy.push(batch(0, data, t0=100.0)) == [] and legacy.skipped["restart"] == 1
    assert [x.seq_last for x in legacy.push(batch(1, data, t0=100.0 + BATCH / RATE))] == [1]


def test_gap_resets_the_window() -> None:
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    wins = stream(w, [0, 1, 4, 5, 6])
    assert w.skipped == {"gap": 2}
    assert [(x.seq_first, x.seq_last) for x in wins] == [(0, 1), (4, 5), (5, 6)]  # nothing spans the gap


def test_a_batch_that_follows_a_time_gap_resets_the_window() -> None:
    """seq is consecutive across a jump in the samples' own times (the ingest ends a batch there and says
    so with follows_gap); a window used to join both sides."""
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    out = stream(w, [0, 1, 2])
    jumped = batch(3, np.ones((2, 10), dtype=np.float32))
    jumped["follows_gap"] = True
    out += w.push(jumped)
    out += stream(w, [4, 5])
    assert w.skipped == {"time_gap": 1}
    assert [(x.seq_first, x.seq_last) for x in out] == [(0, 1), (1, 2), (3, 4), (4, 5)]


def test_nan_missing_channel_malformed_and_rate() -> None:
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    bad = np.ones((2, 10), dtype=np.float32)
    bad[1, 3] = np.nan
    w.push(batch(0, np.ones((2, 10), dtype=np.float32)))
    assert w.push(batch(1, bad)) == []  # the window [0..19] holds a NaN
    assert w.skipped["nan"] == 1
    assert w.push(batch(2, np.ones((1, 10), np.float32), channels=["vib_x"])) == []
    assert w.skipped["missing_channel"] == 1
    assert w.push(batch(3, np.ones((3, 10), np.float32))) == []  # 3 rows for 2 channel names
    assert w.push({"seq": 4, "data": "x"}) == []
    assert w.skipped["malformed"] == 2
    slow = batch(5, np.ones((2, 10), np.float32))
    slow["rate_hz"] = 500.0
    assert w.push(slow) == []
    assert w.skipped["rate_mismatch"] == 1
    # extra channels are ignored and order follows the model's channel list
    data = np.vstack([np.full(10, 7.0), np.full(10, 1.0), np.full(10, 2.0)]).astype(np.float32)
    w.push(batch(6, data, channels=["other", "temp", "vib_x"]))
    out = w.push(batch(7, data, channels=["other", "temp", "vib_x"]))
    assert len(out) == 1 and out[0].data[0, 0] == 2.0 and out[0].data[1, 0] == 1.0


def test_reconfigure_keeps_buffered_samples() -> None:
    w = Windower(["vib_x", "temp"], 20, 10, RATE)
    stream(w, [0, 1])  # emitted [0,20); buffer holds 10..19
    w.reconfigure(["vib_x", "temp"], 30, 10, RATE)
    out = stream(w, [2, 3])
    assert [x.data[0, 0] for x in out] == [10]  # the next window starts where the old one would have
    w.reconfigure(["temp"], 30, 10, RATE)  # a different channel set cannot reuse the buffer
    assert stream(w, [4]) == []


def test_capture_policy() -> None:
    p = CapturePolicy(low_confidence_below=0.2, normal_every=3, max_per_minute=1)
    kinds = [p.decide(asset="t1", is_anomaly=False, confidence=0.9, now=0.0) for _ in range(6)]
    assert kinds == [None, None, "normal_sample", None, None, None]  # 2nd normal sample over budget
    assert p.decide(asset="t1", is_anomaly=True, confidence=0.1, now=61.0) == "low_confidence"


def test_capture_counts_each_asset_on_its_own() -> None:
    """Three turbines whose windows arrive in turn, one sample in three normal windows: each turbine's
    healthy state is sampled (with one shared count every sample came from t1), and t1's unsure model
    spending its budget does not stop the others' capture."""
    p = CapturePolicy(low_confidence_below=0.2, normal_every=3, max_per_minute=2)
    sampled = [asset for _ in range(3) for asset in ("t1", "t2", "t3")
               if p.decide(asset=asset, is_anomaly=False, confidence=0.9, now=0.0) == "normal_sample"]
    assert sampled == ["t1", "t2", "t3"]
    unsure = [p.decide(asset="t1", is_anomaly=True, confidence=0.1, now=0.0) for _ in range(2)]
    assert unsure == ["low_confidence", None]  # t1's minute: one normal sample and one unsure window
    assert p.decide(asset="t2", is_anomaly=True, confidence=0.1, now=0.0) == "low_confidence"


# --- model loading -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("models")
    return {"out": out, "v1": build(out, "1.0.0"), "v2": build(out, "2.0.0", kind="pca", seed=1),
            "wide": build(out, "3.0.0", window=256, hop=128)}


def copy_model(pkg: Any, dest: Path) -> Path:
    shutil.copytree(pkg.model_dir, dest)
    return dest


def test_config_refuses_an_unknown_key_naming_component_and_key(packages: dict[str, Any]) -> None:
    """A misspelt key used to be ignored (the default stayed, silently); what the recipe and the model
    builder write, accessControl included, must still be taken."""
    default = yaml.safe_load(DETECTOR_RECIPE.read_text())["ComponentConfiguration"]["DefaultConfiguration"]
    assert "accessControl" in default
    assert load_config(default) == DetectorConfig()
    builder = json.loads(packages["v1"].detector_config.read_text())[COMPONENT]["MERGE"]
    assert load_config({**default, **builder}).trusted_keys == [packages["v1"].public_key]
    assert load_config(None) == DetectorConfig()
    assert load_config({"top_contributors": 5}).top_contributors == 5  # snake_case is the same key
    with pytest.raises(ConfigError) as info:
        load_config({**default, "topContributor": 5})
    assert info.value.component == COMPONENT
    assert str(info.value) == (f"{COMPONENT}: invalid configuration: topContributor: unknown key (misspelt, or "
                               "left by another version: RESET /topContributor removes it)")
    # ... and the RESET it names does remove it (the recipe's defaults have no such key)
    fixed = apply_update({**default, "topContributor": 5}, default, reset=["/topContributor"])
    assert load_config(fixed) == DetectorConfig()
    # snake_case beside the recipe's camelCase is the same key twice: not "unknown", which reads as a typo
    with pytest.raises(ConfigError, match="top_contributors: the same key as topContributors, given twice"):
        load_config({**default, "top_contributors": 5})
    with pytest.raises(ConfigError, match="topContributors: Input should be less than or equal to 32"):
        load_config({**default, "topContributors": 99})


def test_load_verified_model_and_score(packages: dict[str, Any]) -> None:
    v1 = packages["v1"]
    m = load_model(v1.model_dir, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    good = np.stack([healthy(WINDOW, seed=s) for s in range(4)])
    bad = faulty(WINDOW)[None]
    s = m.score(np.concatenate([good, bad]))
    assert (s.scores[:4] < m.threshold).all() and s.scores[4] >= m.threshold
    top = m.top(s.shares[4], 2)
    assert next(iter(top["channels"])) == "vib_x"  # the impacts are on vib_x
    assert np.allclose(s.shares.sum(axis=1), 1.0)


def test_memory_release_keeps_a_loaded_model_scoring_the_same(packages: dict[str, Any]) -> None:
    """Paging library code out after a load must change nothing but the RSS: the same windows give
    the same scores, and the call reports what it did."""
    from components.anomaly_detector import memory

    v1 = packages["v1"]
    m = load_model(v1.model_dir, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    windows = np.stack([healthy(WINDOW, seed=3), faulty(WINDOW)])
    before = m.score(windows).scores
    released = memory.release()
    assert released.trimmed and released.mappings > 0  # Linux + glibc here; libraries are mapped
    assert released.rss_after_mb > 0 and released.rss_before_mb > 0
    np.testing.assert_array_equal(m.score(windows).scores, before)


def test_untrusted_tampered_corrupt_and_mismatched_models(packages: dict[str, Any], tmp_path: Path) -> None:
    v1, wide = packages["v1"], packages["wide"]
    trusted = signing.trusted_key_map([v1.public_key])
    with pytest.raises(UntrustedKeyError) as e:
        load_model(v1.model_dir, component=NAME, version="1.0.0", trusted={})
    assert e.value.key_id == v1.key_id and e.value.component == NAME
    d = copy_model(v1, tmp_path / "tampered")
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DigestMismatchError):
        load_model(d, component=NAME, version="1.0.0", trusted=trusted)
    key, _ = signing.load_or_create_key(packages["out"] / "keys" / "test.key")
    # Signed by a trusted key, but the ONNX file is garbage: refused at load, naming the key.
    d = copy_model(v1, tmp_path / "corrupt")
    (d / "model.onnx").write_bytes(b"\x08\x07not an onnx graph")
    signing.sign_model(d, component=NAME, version="1.0.0", key=key)
    with pytest.raises(ModelLoadError, match="does not load") as e2:
        load_model(d, component=NAME, version="1.0.0", trusted=trusted)
    assert e2.value.key_id == v1.key_id
    # Signed, loads, but its input width does not match the card's feature spec.
    d = copy_model(v1, tmp_path / "shape")
    card = json.loads((d / "model_card.json").read_text())
    card["features"]["groups"][0]["bands"] = 2
    card["feature_names"] = [n for n in card["feature_names"] if not n.endswith(("band02", "band03"))]
    card["feature_stats"] = {k: v[: len(card["feature_names"])] for k, v in card["feature_stats"].items()}
    card["onnx"]["n_features"] = len(card["feature_names"])
    (d / "model_card.json").write_text(json.dumps(card))
    signing.sign_model(d, component=NAME, version="1.0.0", key=key)
    with pytest.raises(ModelLoadError, match="does not match") as e3:
        load_model(d, component=NAME, version="1.0.0", trusted=trusted)
    assert e3.value.field == "onnx.n_features"
    assert wide.card.window == 256  # (used by the daemon test)


# --- the real component on a real daemon ---------------------------------------------------------

def model_recipe_from(pkg: Any, recipes: Path) -> Path:
    recipes.mkdir(parents=True, exist_ok=True)
    path = recipes / f"{NAME}-{pkg.card.version}.yaml"
    path.write_text(yaml.safe_dump(recipe_document(pkg.card, pkg.model_dir), sort_keys=False))
    return path


class Bus:
    """A declared client publishing sensor batches and collecting what the detector says."""

    def __init__(self, daemon: Any, tmp: Path) -> None:
        policy = {"aws.greengrass.ipc.pubsub": {"p": {"operations": ["aws.greengrass#PublishToTopic",
                                                                     "aws.greengrass#SubscribeToTopic"],
                                                      "resources": ["sensors/+/raw", "anomaly/+", "retraining/+",
                                                                    "heartbeat/anomaly_detector"]}}}
        (tmp / "policy.json").write_text(json.dumps(policy))
        token = daemon.cli("client", "add", "test.bus", "--policy", str(tmp / "policy.json")).stdout.strip()
        self.client = Client(daemon.socket, token.splitlines()[-1], name="test.bus")
        self.events: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.seq = 0

    async def collect(self, topic: str, into: list[dict[str, Any]]) -> None:
        async with self.client.subscribe(topic, queue_size=100_000, policy="block") as msgs:
            async for m in msgs:
                into.append(m.payload)

    async def until(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            await asyncio.sleep(0.05)
        hb = self.heartbeats[-1] if self.heartbeats else None
        raise AssertionError(f"timed out waiting for {what}; last heartbeat {hb}")

    async def send(self, n_batches: int, fault: bool = False, pause: float = 0.002) -> None:
        for _ in range(n_batches):
            start = self.seq * BATCH
            data = faulty(BATCH, start=start) if fault else healthy(BATCH, seed=self.seq + 1000, start=start)
            await self.client.publish("sensors/t1/raw", batch(self.seq, data))
            self.seq += 1
            await asyncio.sleep(pause)


def expected_windows(n_batches: int) -> int:
    samples = n_batches * BATCH
    return (samples - WINDOW) // HOP + 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_detector_on_real_daemon_swaps_models_without_losing_a_window(daemon_factory: Any, short_tmp: Path) -> None:
    out = short_tmp / "out"
    # v2 is a knn model that keeps learning (card section "online"): the detector's per-asset memory
    # starts with the swap and must not cost a window either.
    v1, v2 = build(out, "1.0.0"), build(out, "2.0.0", kind="knn", seed=1, online=True)
    assert v2.card.online is not None
    v3 = build(out, "3.0.0", seed=2)
    # v3 is tampered AFTER signing but re-listed with honest digests, so only the detector can catch it.
    card3 = v3.model_dir / "model_card.json"
    card3.write_text(card3.read_text().replace(f'"value": {v3.card.threshold.value!r}', '"value": 1e9'))
    assert "1e9" in card3.read_text()
    recipes = short_tmp / "recipes"
    r1, r2, r3 = (model_recipe_from(p, recipes) for p in (v1, v2, v3))
    config = json.dumps({"com.nucleus.AnomalyDetector": {"MERGE": {
        "trustedKeys": [v1.public_key], "heartbeatIntervalS": 0.2, "modelPollIntervalS": 0.5,
        "captureNormalEvery": 5}}})
    daemon = daemon_factory()
    daemon.cli("deploy", "--artifacts", str(out / "artifacts"), "--update-config", config, str(r1),
               str(DETECTOR_RECIPE))
    pid = daemon.wait_state("com.nucleus.AnomalyDetector", {"RUNNING"})["pids"]
    bus = Bus(daemon, short_tmp)

    async def scenario() -> None:
        async with bus.client, asyncio.TaskGroup() as tg:
            collectors = [tg.create_task(bus.collect("anomaly/t1", bus.events)),
                          tg.create_task(bus.collect("heartbeat/anomaly_detector", bus.heartbeats))]
            await bus.until(lambda: bus.heartbeats and bus.heartbeats[-1]["model_version"] == "1.0.0", 60,
                            "model 1.0.0 loaded")
            await bus.send(20)
            await bus.until(lambda: len(bus.events) >= expected_windows(20), 30, "healthy windows scored")
            assert sum(e["is_anomaly"] for e in bus.events) <= 1
            await bus.send(10, fault=True)
            await bus.until(lambda: len(bus.events) >= expected_windows(30), 30, "faulty windows scored")
            faulty_events = [e for e in bus.events if e["window"]["seq_first"] >= 20]
            assert faulty_events and all(e["is_anomaly"] for e in faulty_events)
            # A card without an alarm section keeps the plain threshold: every anomalous window is an alarm.
            assert all(e["alarm"] == e["is_anomaly"] and e["tail_probability"] is None for e in bus.events)
            assert next(iter(faulty_events[-1]["contributions"]["channels"])) == "vib_x"
            e = faulty_events[-1]
            assert e["model"] == {"component": NAME, "version": "1.0.0", "kind": "isolation_forest"}
            assert 0 <= e["confidence"] <= 1 and e["threshold"] == pytest.approx(v1.card.threshold.value)

            # Model 2 alone, while data keeps flowing: every window is scored exactly once.
            sender = tg.create_task(bus.send(100_000, pause=0.01))
            await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(out / "artifacts"), str(r2))
            await bus.until(lambda: bus.events[-1]["model"]["version"] == "2.0.0", 30, "model 2.0.0 in events")
            # Model 3 is tampered: rejected, naming component, version and key; model 2 stays.
            await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(out / "artifacts"), str(r3))
            await bus.until(lambda: (bus.heartbeats[-1].get("model_rejected") or {}).get("version") == "3.0.0", 30,
                            "model 3.0.0 rejected")
            await bus.until(lambda: sum(e["model"]["version"] == "2.0.0" for e in bus.events) >= 60, 30,
                            "60 windows scored by the learning knn model")
            sent_before_stop = bus.seq
            sender.cancel()
            await bus.until(lambda: bus.events[-1]["window"]["seq_last"] >= sent_before_stop - 2, 30, "drain")
            for c in collectors:
                c.cancel()

    asyncio.run(scenario())  # the collectors are cancelled at the end; the TaskGroup then exits

    rejected = bus.heartbeats[-1]["model_rejected"]
    assert rejected["component"] == NAME and rejected["key_id"] == v1.key_id
    assert rejected["code"] == "MODEL_DIGEST_MISMATCH"
    assert bus.heartbeats[-1]["model_version"] == "2.0.0"
    versions = [e["model"]["version"] for e in bus.events]
    assert "3.0.0" not in versions and versions.index("2.0.0") > 0
    assert versions == sorted(versions)  # one switch, never back
    knn = [e for e in bus.events if e["model"]["version"] == "2.0.0"]
    assert len(knn) >= 60 and {e["model"]["kind"] for e in knn} == {"knn"}
    assert all(np.isfinite(e["score"]) for e in knn)
    # healthy data the learning model has seen plenty of by the end: its latest windows are not novel
    assert sum(e["is_anomaly"] for e in knn[-50:]) <= 1
    # No window lost or duplicated across the swaps: window ends are exactly every HOP samples.
    ends = [e["window"]["t_end"] for e in bus.events]
    steps = np.round(np.diff(ends) * RATE).astype(int)
    assert set(steps.tolist()) == {HOP}, f"irregular window steps {sorted(set(steps.tolist()))}"
    assert bus.heartbeats[-1]["skipped"].get("gap", 0) == 0
    assert bus.heartbeats[-1]["captured"] >= 1
    assert daemon.components()["com.nucleus.AnomalyDetector"]["pids"] == pid  # the detector was never restarted
    # Configuration: a key the running detector can take applies without a restart (they used to be
    # ignored while the deployment said SUCCEEDED); a key it reads only at start restarts it.
    merge = {"com.nucleus.AnomalyDetector": {"MERGE": {"topContributors": 5}}}
    daemon.cli("deploy", "--update-config", json.dumps(merge))
    deadline = time.monotonic() + 20
    while "detector.config_applied" not in daemon.cli("logs", "com.nucleus.AnomalyDetector", "-n", "400").stdout:
        assert time.monotonic() < deadline, "the running detector never applied topContributors"
        time.sleep(0.2)
    assert daemon.components()["com.nucleus.AnomalyDetector"]["pids"] == pid
    # A value the detector cannot take is refused by the deployment, naming the detector and the field.
    refused = daemon.cli("deploy", "--update-config", json.dumps({"com.nucleus.AnomalyDetector": {"MERGE": {
        "topContributors": 99}}}), check=False)
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr, refused.stderr
    assert "com.nucleus.AnomalyDetector rejected its new configuration" in refused.stderr
    assert "topContributors" in refused.stderr
    # So is a key it does not know: a typo must not leave the default silently in place.
    refused = daemon.cli("deploy", "--update-config", json.dumps({"com.nucleus.AnomalyDetector": {"MERGE": {
        "topContributor": 4}}}), check=False)
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr, refused.stderr
    assert "com.nucleus.AnomalyDetector rejected its new configuration" in refused.stderr
    assert "topContributor: unknown key" in refused.stderr
    daemon.cli("deploy", "--update-config", json.dumps({"com.nucleus.AnomalyDetector": {"MERGE": {
        "memorySaveEveryS": 5}}}))
    assert daemon.wait_state("com.nucleus.AnomalyDetector", {"RUNNING"})["pids"] != pid


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_detector_with_an_unknown_key_fails_to_start_naming_it(packages: dict[str, Any], daemon_factory: Any,
                                                                short_tmp: Path) -> None:
    """At a first deployment no running detector is asked to validate: the detector itself refuses the
    key when it starts, as the ingest and the protective action do (it used to run with the default)."""
    model = model_recipe_from(packages["v1"], short_tmp / "recipes")
    typo = json.dumps({COMPONENT: {"MERGE": {"topContributor": 5}}})
    daemon = daemon_factory()
    # A settle time longer than three crashes take on a loaded machine: the deployment's outcome then does not
    # depend on whether the first crash comes within the default 0.5 s (it ends at BROKEN, not after 30 s).
    out = daemon.cli("deploy", "--failure-policy", "do-nothing", "--settle", "30", "--artifacts",
                     str(packages["out"] / "artifacts"), "--update-config", typo, str(model), str(DETECTOR_RECIPE),
                     check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    daemon.wait_state(COMPONENT, {"BROKEN"}, timeout=60)
    logs = daemon.cli("logs", COMPONENT, "-n", "400").stdout
    assert "component.failed" in logs
    assert f"{COMPONENT}: invalid configuration: topContributor: unknown key" in logs
