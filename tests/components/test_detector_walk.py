"""What a demanding user found walking the model builder and the detector: bad input on the bus, lying
model cards, keys and training data the builder must name. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from anomaly_models import BATCH, CHANNELS, RATE, batch, build, healthy

from components.anomaly import signing
from components.anomaly.errors import ModelCardError, ModelLoadError
from components.anomaly.model_card import load_card
from components.anomaly_detector.config import COMPONENT
from components.anomaly_detector.scoring import load_model
from components.anomaly_detector.windowing import Windower
from components.model_builder.cli import main as model_cli
from components.model_builder.package import recipe_document
from ipc import Client

NAME = "com.nucleus.TurbineModel"

WINDOW, HOP = 2 * BATCH, BATCH


def fresh() -> Windower:
    w = Windower(list(CHANNELS), WINDOW, HOP, RATE)
    assert len(w.push(batch(0, healthy(BATCH)))) == 0
    return w


# --- the bus: batches that are not samples ---------------------------------------------------------

@pytest.mark.parametrize("data", [
    healthy(BATCH).astype("U12"),  # text of digits: was scored as numbers
    np.where(healthy(BATCH) > 0, "x", "y"),  # text: ValueError out of push() stopped the detector
    healthy(BATCH).astype(np.complex64),  # complex: the imaginary part was dropped with a warning
    healthy(BATCH) > 0,  # booleans: scored as 0/1 samples
    np.zeros(BATCH * 2, dtype=[("a", "f4")]).reshape(2, BATCH),  # records
], ids=["digit-text", "text", "complex", "bool", "records"])
def test_a_batch_whose_data_are_not_numbers_is_malformed_not_scored_or_fatal(data: np.ndarray) -> None:
    w = fresh()
    assert w.push(batch(1, data)) == []
    assert w.skipped == {"malformed": 1}
    # ... and the window restarts: the next good batch does not complete a window with the bad one
    assert w.push(batch(2, healthy(BATCH))) == []
    assert len(w.push(batch(3, healthy(BATCH)))) == 1


@pytest.mark.parametrize("field, value", [
    ("rate_hz", math.nan), ("rate_hz", math.inf), ("t0", math.nan), ("t0", math.inf), ("t0", "soon"),
    ("seq", 1.5), ("seq", True), ("seq", "1"), ("channels", [np.array([1, 2]), "temp"]),
])
def test_a_batch_with_a_non_finite_time_or_rate_or_a_non_integer_seq_is_malformed(field: str, value: Any) -> None:
    """A NaN rate_hz passed the rate check (NaN compares false) and a NaN t0 gave windows a NaN t_end;
    a seq of 1.5 was truncated to 1 and "1" parsed; an array among the channel names raised out of push()."""
    w = fresh()
    bad = batch(1, healthy(BATCH))
    bad[field] = value
    assert w.push(bad) == []
    assert w.skipped == {"malformed": 1}, (field, value)
    assert w.push(batch(2, healthy(BATCH))) == []
    out = w.push(batch(3, healthy(BATCH)))
    assert len(out) == 1 and math.isfinite(out[0].t_end)
    if field != "seq":  # its seq was sound: the dropped batch is not also a one-batch gap
        assert w.skipped == {"malformed": 1}


def test_a_model_without_a_rate_never_gets_a_window_of_two_rates() -> None:
    """A card with no sample_rate_hz (a CSV built without --rate-hz) took any batch: a producer switching
    from 1 kHz to 500 Hz mid-window had both in one window, scored without a word."""
    w = Windower(list(CHANNELS), WINDOW, HOP, None)
    assert w.push(batch(0, healthy(BATCH))) == []
    slow = batch(1, healthy(BATCH))
    slow["rate_hz"] = RATE / 2
    assert w.push(slow) == []
    assert w.skipped == {"rate_mismatch": 1}
    # the new rate then starts a fresh window, all of it at 500 Hz
    later = [batch(i, healthy(BATCH)) | {"rate_hz": RATE / 2} for i in (2, 3)]
    assert w.push(later[0]) == []
    out = w.push(later[1])
    assert len(out) == 1 and out[0].seq_first == 2
    assert out[0].t_end == pytest.approx(later[1]["t0"] + (BATCH - 1) / (RATE / 2))
    # ... and a rate that only wobbles (< 1 %) is the same rate
    assert len(w.push(batch(4, healthy(BATCH)) | {"rate_hz": RATE / 2 * 1.005})) == 1
    assert w.skipped == {"rate_mismatch": 1}


def test_integer_samples_and_numpy_integer_seq_are_still_taken() -> None:
    w = fresh()
    ints = (healthy(BATCH) * 100).astype(np.int16)
    out = w.push(batch(np.int64(1), ints))  # type: ignore[arg-type]
    assert w.skipped == {} and len(out) == 1 and out[0].seq_last == 1


# --- model cards that lie ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build(tmp_path_factory.mktemp("models"), "1.0.0", kind="pca")


def resigned(pkg: Any, dest: Path, edit: Any) -> Path:
    """A copy of the package whose card ``edit`` changed (text in, text out), signed again by the same,
    trusted key: only the detector's own checks can catch what the card says."""
    shutil.copytree(pkg.model_dir, dest)
    card = dest / "model_card.json"
    card.write_text(edit(card.read_text()))
    key, _ = signing.load_or_create_key(pkg.model_dir.parents[2] / "keys" / "test.key")
    signing.sign_model(dest, component=NAME, version=pkg.card.version, key=key)
    return dest


@pytest.mark.parametrize("value, field", [
    ("NaN", "threshold.value"), ("Infinity", "threshold.value"), ("1e999", "threshold.value"),
    ("-Infinity", "score_scale.median"),
])
def test_a_signed_card_with_a_non_finite_number_is_refused_naming_field_version_and_key(
        v1: Any, tmp_path: Path, value: str, field: str) -> None:
    """A threshold of NaN loaded (the model then never alarmed: no score is >= NaN)."""
    section, name = field.split(".")

    def edit(text: str) -> str:
        card = json.loads(text)
        card[section][name] = "@"
        return json.dumps(card).replace('"@"', value)

    d = resigned(v1, tmp_path / "m", edit)
    with pytest.raises(ModelCardError) as info:
        load_model(d, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    e = info.value
    assert e.field == field and "finite" in e.message
    assert (e.component, e.version, e.key_id) == (NAME, "1.0.0", v1.key_id)
    assert e.path == str(d / "model_card.json")


def test_a_signed_card_whose_score_scale_is_out_of_order_is_refused(v1: Any, tmp_path: Path) -> None:
    def edit(text: str) -> str:
        card = json.loads(text)
        card["score_scale"]["median"] = card["score_scale"]["max"] * 10 + 1
        return json.dumps(card)

    d = resigned(v1, tmp_path / "m", edit)
    with pytest.raises(ModelCardError, match=r"median .* <= p99") as info:
        load_model(d, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    assert info.value.field == "score_scale"


# --- the deployed detector ------------------------------------------------------------------------------

DETECTOR_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "com.nucleus.AnomalyDetector-1.0.0.yaml"


def model_recipe(model_dir: Path, recipes: Path) -> Path:
    """The recipe for the files as they are now (honest digests: the nucleus takes them, the detector must judge)."""
    card = load_card(model_dir / "model_card.json")
    recipes.mkdir(parents=True, exist_ok=True)
    path = recipes / f"{NAME}-{card.version}.yaml"
    path.write_text(yaml.safe_dump(recipe_document(card, model_dir), sort_keys=False))
    return path


class Watch:
    """A declared client: publishes sensor batches, keeps the detector's heartbeats and events."""

    def __init__(self, daemon: Any, tmp: Path) -> None:
        policy = {"aws.greengrass.ipc.pubsub": {"p": {
            "operations": ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"],
            "resources": ["sensors/+/raw", "anomaly/+", "heartbeat/anomaly_detector"]}}}
        (tmp / "policy.json").write_text(json.dumps(policy))
        token = daemon.cli("client", "add", "walk.bus", "--policy", str(tmp / "policy.json")).stdout.strip()
        self.client = Client(daemon.socket, token.splitlines()[-1], name="walk.bus")
        self.heartbeats: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.seq = 0

    async def collect(self) -> None:
        async with (self.client.subscribe("heartbeat/anomaly_detector", queue_size=10_000) as hb,
                    self.client.subscribe("anomaly/t1", queue_size=10_000) as ev):
            async def pump(msgs: Any, into: list[dict[str, Any]]) -> None:
                async for m in msgs:
                    into.append(m.payload)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pump(hb, self.heartbeats))
                tg.create_task(pump(ev, self.events))

    def last(self) -> dict[str, Any]:
        return self.heartbeats[-1] if self.heartbeats else {}

    async def until(self, pred: Any, timeout: float, what: str) -> None:
        for _ in range(int(timeout / 0.05)):
            if pred():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last heartbeat {self.last()}")

    async def send(self, n: int, data: np.ndarray | None = None) -> None:
        for _ in range(n):
            d = healthy(BATCH, seed=self.seq, start=self.seq * BATCH) if data is None else data
            await self.client.publish("sensors/t1/raw", batch(self.seq, d))
            self.seq += 1
            await asyncio.sleep(0.005)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_deployed_detector_survives_a_text_batch_and_follows_a_version_deployed_again_with_other_files(
        daemon_factory: Any, short_tmp: Path) -> None:
    """Found live. A text batch ended the detector process; a model version refused for its files (here
    a tampered model.onnx) stayed refused after the same version was deployed again with the good
    files, and the version in use deployed again with other files was not loaded: either way the
    detector scored with another model than the one on disk until it was restarted."""
    out = short_tmp / "out"
    v1, v2 = build(out, "1.0.0"), build(out, "2.0.0", kind="pca", seed=1)
    rebuilt = build(out / "rebuilt", "2.0.0", kind="pca", seed=2,
                    key=signing.load_or_create_key(out / "keys" / "test.key")[0])
    bad = out / "tampered" / NAME / "2.0.0"
    shutil.copytree(v2.model_dir, bad)
    onnx_bytes = bytearray((bad / "model.onnx").read_bytes())
    onnx_bytes[-20] ^= 1
    (bad / "model.onnx").write_bytes(bytes(onnx_bytes))
    config = json.dumps({COMPONENT: {"MERGE": {"trustedKeys": [v1.public_key], "heartbeatIntervalS": 0.2,
                                               "modelPollIntervalS": 0.3}}})
    daemon = daemon_factory()
    daemon.cli("deploy", "--artifacts", str(out / "artifacts"), "--update-config", config,
               str(model_recipe(v1.model_dir, short_tmp / "r1")), str(DETECTOR_RECIPE))
    pid = daemon.wait_state(COMPONENT, {"RUNNING"})["pids"]
    watch = Watch(daemon, short_tmp)

    async def scenario() -> None:
        async with watch.client, asyncio.TaskGroup() as tg:
            collector = tg.create_task(watch.collect())
            await watch.until(lambda: watch.last().get("model_version") == "1.0.0", 60, "model 1.0.0")
            await watch.send(3)
            await watch.send(1, healthy(BATCH).astype("U12"))
            await watch.send(1, np.where(healthy(BATCH) > 0, "x", "y"))
            await watch.send(6)
            await watch.until(lambda: watch.last().get("windows", 0) >= 2, 30, "windows after the text batches")
            assert watch.last()["skipped"] == {"malformed": 2}
            # the tampered 2.0.0: refused, 1.0.0 kept
            await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(out / "tampered"),
                                    str(model_recipe(bad, short_tmp / "r2bad")))
            await watch.until(lambda: (watch.last().get("model_rejected") or {}).get("version") == "2.0.0", 30,
                              "2.0.0 refused")
            assert watch.last()["model_rejected"]["code"] == "MODEL_DIGEST_MISMATCH"
            assert watch.last()["model_version"] == "1.0.0"
            # the same version again, with the builder's files: taken
            await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(out / "artifacts"),
                                    str(model_recipe(v2.model_dir, short_tmp / "r2")))
            await watch.until(lambda: watch.last().get("model_version") == "2.0.0", 30, "good 2.0.0 swapped in")
            assert watch.last()["model_rejected"] is None  # no longer true of 2.0.0
            await watch.send(4)
            await watch.until(lambda: any(e["model"]["version"] == "2.0.0" for e in watch.events), 30,
                              "a window scored by 2.0.0")
            # 2.0.0 rebuilt (another seed, another threshold) and deployed under the same version: the
            # detector scores what is on disk, not the 2.0.0 it loaded before
            assert rebuilt.card.threshold.value != v2.card.threshold.value
            await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(out / "rebuilt" / "artifacts"),
                                    str(model_recipe(rebuilt.model_dir, short_tmp / "r2again")))
            for _ in range(100):
                await watch.send(2)
                if watch.events and watch.events[-1]["threshold"] == pytest.approx(rebuilt.card.threshold.value):
                    break
            assert watch.events[-1]["threshold"] == pytest.approx(rebuilt.card.threshold.value)
            collector.cancel()

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(scenario())
    assert daemon.components()[COMPONENT]["pids"] == pid  # never restarted
    assert "input.batch_failed" not in daemon.cli("logs", COMPONENT, "-n", "500").stdout


# --- nucleus model build: data and keys a data scientist gets wrong ----------------------------------------

def csv_of(path: Path, x: np.ndarray, names: list[str]) -> Path:
    path.write_text(",".join(names) + "\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in x.T) + "\n")
    return path


def cli_build(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["build", "--data", str(data), "--out", str(tmp / "out"), "--window", "128", "--hop", "64",
            "--bands", "4", "--kind", "pca", *extra]


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = model_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_build_with_values_too_large_names_the_features_channel_and_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said only "training features contain NaN or inf", after a page of numpy RuntimeWarnings."""
    x = healthy(4000).astype(np.float64)
    x[0] *= 1e300
    data = csv_of(tmp_path / "huge.csv", x, CHANNELS)
    line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000"))
    assert line.startswith(f"error: {data}: channels: features vib_x.rms")
    assert "vib_x up to" in line and "temp" not in line.split("are not finite")[1]


def test_build_with_too_few_rows_says_which_flags_and_how_many_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "need at least 20 training windows, have 4", naming no file, flag or row count."""
    data = csv_of(tmp_path / "few.csv", healthy(400), CHANNELS)
    line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000"))
    assert line.startswith(f"error: {data}: window: 400 usable rows")
    assert "--window 128 --hop 64" in line and "1344 rows" in line


def test_build_warns_of_a_constant_channel_a_missing_rate_and_a_replaced_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = healthy(4000)
    x[1] = 0.0  # a dead temperature sensor
    data = csv_of(tmp_path / "dead.csv", x, CHANNELS)
    assert model_cli(cli_build(tmp_path, data)) == 0
    err = capsys.readouterr().err
    assert "warning: channel temp is constant (0) in all the training data" in err
    assert "warning: no sample rate (--rate-hz)" in err
    assert "held a build" not in err
    assert model_cli(cli_build(tmp_path, data, "--rate-hz", "1000", "--channels", "vib_x")) == 0
    err = capsys.readouterr().err
    assert "is constant" not in err and "sample rate" not in err
    assert f"{tmp_path / 'out' / 'artifacts' / NAME / '1.0.0'} held a build of {NAME} 1.0.0; it is replaced" in err


def test_build_refuses_a_signing_key_others_can_read_and_a_public_key_given_as_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    key = tmp_path / "keys" / "k.key"
    assert model_cli(cli_build(tmp_path, data, "--rate-hz", "1000", "--key", str(key))) == 0
    capsys.readouterr()
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000", "--key", str(key), "--version", "2.0.0"))
    assert line == f"error: {key}: key: signing key is accessible to other users (mode 0644); make it private: " \
                   f"chmod 600 {key}"
    pub = signing.public_key_path(key)
    line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000", "--key", str(pub), "--version", "2.0.0"))
    assert line.startswith(f"error: {pub}: key: this is a public key; --key takes the private key")
    assert not (tmp_path / "out" / "artifacts" / NAME / "2.0.0").exists()


def test_input_skipped_logs_only_the_kind_whose_count_moved() -> None:
    """Each input.skipped line re-logged every kind seen before with its old total, so one duplicate
    batch read in the log as a new NaN window, a new gap and a new missing channel too."""
    from structlog.testing import capture_logs

    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    detector = Detector(None, DetectorConfig())  # type: ignore[arg-type]  # no bus: only its log is used
    w = fresh()
    bad = healthy(BATCH)
    bad[0, 0] = np.nan
    with capture_logs() as logs:
        w.push(batch(1, bad))
        detector._log_skips("t1", w)
        detector._log_times = {k: t - 10.0 for k, t in detector._log_times.items()}  # as if 10 s later
        w.push(batch(1, healthy(BATCH)))  # a duplicate
        detector._log_skips("t1", w)
    assert [(e["kind"], e["total"]) for e in logs if e["event"] == "input.skipped"] == [("nan", 1), ("duplicate", 1)]
    assert [e.get("new") for e in logs] == [1, 1]


@pytest.mark.parametrize("bad, says", [
    ("AAAA", "[1]: trusted key has 3 bytes, an Ed25519 public key has 32"),
    ("not a key!", "[1]: trusted key 'not a key!'... is neither base64 nor PEM"),
    ("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----", "[1]: trusted key is not a valid PEM public key"),
])
def test_a_trusted_key_that_is_not_one_is_refused_by_the_configuration(v1: Any, bad: str, says: str) -> None:
    """It was taken, logged once at start (detector.trusted_key_invalid) and left out: the deployment
    succeeded, and every model that key signed was then refused as untrusted."""
    from components.anomaly_detector.config import load_config
    from components.configuration import ConfigError

    assert load_config({"trustedKeys": [v1.public_key]}).trusted_keys == [v1.public_key]
    with pytest.raises(ConfigError) as info:
        load_config({"trustedKeys": [v1.public_key, bad]})
    assert str(info.value).startswith(f"{COMPONENT}: invalid configuration: trustedKeys: {says}"), str(info.value)


def test_a_csv_with_a_byte_order_mark_gives_the_bus_channel_names(tmp_path: Path) -> None:
    """A spreadsheet's UTF-8 BOM became part of the first channel's name ("\\ufeffvib_x"): the card then
    listed a channel no ingest publishes, and the detector dropped every batch as missing_channel."""
    x = healthy(4000)
    text = "vib_x,temp\n" + "\n".join(f"{a!r},{b!r}" for a, b in x.T.tolist()) + "\n"
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    assert model_cli(cli_build(tmp_path, tmp_path / "bom.csv", "--rate-hz", "1000")) == 0
    card = load_card(tmp_path / "out" / "artifacts" / NAME / "1.0.0" / "model_card.json")
    assert card.channels == CHANNELS


def test_a_csv_naming_a_channel_twice_or_not_comma_separated_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A channel named twice trained on the last of the two columns without a word; a semicolon file
    said "CSV has no columns []"."""
    x = healthy(4000)
    rows = "\n".join(f"{a!r},{a + 100!r},{b!r},note" for a, b in x.T.tolist())
    (tmp_path / "dup.csv").write_text("vib_x,vib_x,temp,memo\n" + rows + "\n")
    line = one_error(capsys, cli_build(tmp_path, tmp_path / "dup.csv", "--rate-hz", "1000"))
    assert line == f"error: {tmp_path / 'dup.csv'}: channels: the header names 'vib_x' more than once; rename " \
                   "the columns so each is one column"
    # a name twice among columns not used is no reason to refuse
    (tmp_path / "memo.csv").write_text("vib_x,temp,memo,memo\n" + "\n".join(
        f"{a!r},{b!r},x,y" for a, b in x.T.tolist()) + "\n")
    assert model_cli(cli_build(tmp_path, tmp_path / "memo.csv", "--rate-hz", "1000")) == 0
    capsys.readouterr()
    (tmp_path / "semi.csv").write_text("vib_x;temp\n" + "\n".join(f"{a!r};{b!r}" for a, b in x.T.tolist()))
    line = one_error(capsys, cli_build(tmp_path, tmp_path / "semi.csv", "--rate-hz", "1000"))
    assert "no numeric column in the first data row (columns ['vib_x;temp'])" in line
    assert "not comma-separated" in line


def recording(path: Path, **over: Any) -> Path:
    fields = {"channels": np.array(CHANNELS), "data": healthy(4000), "rate_hz": np.float64(RATE),
              "segment_starts": np.array([0])} | over
    np.savez(path, **fields)
    return path


@pytest.mark.parametrize("name, over, says", [
    ("text", {"data": healthy(4000).astype("U12")}, "data: recording data are <U12 values, not numbers"),
    ("rate0", {"rate_hz": np.float64(0)}, "rate_hz: recording rate_hz 0 is not a sample rate"),
    ("rateinf", {"rate_hz": np.float64(np.inf)}, "rate_hz: recording rate_hz inf is not a sample rate"),
    ("starts", {"segment_starts": np.array([0, 9000, -5])},
     "segment_starts: recording segment_starts [9000, -5] lie outside its 4000 samples"),
])
def test_a_recording_with_bad_fields_is_refused_naming_file_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, over: dict[str, Any], says: str) -> None:
    """Text of digits trained as numbers; rate_hz 0 surfaced as pydantic's "sample_rate_hz: Input should
    be greater than 0" with no file; segment starts outside the data were taken silently."""
    data = recording(tmp_path / f"{name}.npz", **over)
    line = one_error(capsys, cli_build(tmp_path, data))
    assert line == f"error: {data}: {says}" or line.startswith(f"error: {data}: {says}"), line


def test_a_file_that_is_no_npz_archive_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A text file named .npz got numpy's advice to load it 'unsafely' with allow_pickle; a bare .npy
    array 'does not support the context manager protocol'."""
    (tmp_path / "notes.npz").write_text("healthy run, turbine 1\n")
    np.save(tmp_path / "one.npy", healthy(100))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    for name, says in (("notes", "not an .npz archive"), ("one", "one .npy array, not an .npz archive")):
        line = one_error(capsys, cli_build(tmp_path, tmp_path / f"{name}.npz"))
        assert line == f"error: {tmp_path / name}.npz: not a nucleus recording (.npz with channels, data, rate_hz, " \
                       f"segment_starts): {says}"


@pytest.mark.parametrize("kind", ["isolation_forest", "pca", "autoencoder", "knn"])
def test_training_data_where_nothing_varies_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """Every channel constant: pca failed with 'ONNX scores differ from scikit-learn's: nan vs nan', knn
    built a model with threshold 0 (every window an alarm), the others built models of nothing."""
    data = recording(tmp_path / "flat.npz", data=np.ones((2, 4000), np.float32))
    argv = [*cli_build(tmp_path, data), "--kind", kind]
    rc = model_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Warning" not in err, err
    assert err.strip().splitlines()[-1] == ("error: features: every one of the 11 features is constant over the 46 "
                                            "fit windows: there is nothing to learn (constant or dead channels?)")


def test_what_the_detector_itself_skips_is_logged_not_only_counted() -> None:
    """Batches with no model to score them (none deployed, or every version refused) and payloads that
    are not objects were counted in the heartbeat and never logged: the log did not say why nothing
    was scored."""
    from structlog.testing import capture_logs

    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    detector = Detector(None, DetectorConfig())  # type: ignore[arg-type]  # no bus: the batch path only
    with capture_logs() as logs:
        for seq in range(3):
            detector._on_batch("sensors/t1/raw", batch(seq, healthy(BATCH)))
    assert detector.skipped == {"no_model": 3}
    # ... and the heartbeat's per_asset says whose batches they were (its skipped held the windower's only)
    assert detector.per_asset()["t1"]["skipped"] == {"no_model": 3}
    assert detector.status()["assets"] == ["t1"]  # 'every asset ever seen' (it listed assets with a windower)
    assert [(e["event"], e["kind"], e["total"], e["asset"]) for e in logs] == [("input.skipped", "no_model", 1, "t1")]


def test_build_warns_when_its_threshold_would_alarm_on_most_healthy_windows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--margin 0.1 put the threshold under every held-out healthy score (calibration_alarm_fraction 1.0 in
    the card's metrics) and the build said nothing."""
    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    assert model_cli(cli_build(tmp_path, data, "--rate-hz", "1000")) == 0
    assert "warning" not in capsys.readouterr().err
    assert model_cli(cli_build(tmp_path, data, "--rate-hz", "1000", "--margin", "0.1", "--version", "2.0.0")) == 0
    err = capsys.readouterr().err
    assert "of 100% of the held-out healthy windows" in err and "would alarm on most normal windows" in err


def test_verify_names_the_trusted_key_flag_for_a_private_or_broken_key_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], v1: Any) -> None:
    """A private key file as --trusted-key gave cryptography's 'Valid PEM but no BEGIN PUBLIC KEY ...
    Are you sure this is a public key?' under the detector's field name trustedKeys."""
    private = v1.model_dir.parents[2] / "keys" / "test.key"
    argv = ["verify", str(v1.model_dir), "--component", NAME, "--version", "1.0.0", "--trusted-key"]
    line = one_error(capsys, [*argv, str(private)])
    assert line == f"error: --trusted-key {private}: this is a private key; give the public key written beside it " \
                   "(test.key.pub)"
    (tmp_path / "junk.pub").write_text("x\n")
    line = one_error(capsys, [*argv, str(tmp_path / "junk.pub")])
    assert line == f"error: --trusted-key {tmp_path / 'junk.pub'}: trusted key 'x'... is neither base64 nor PEM"
    assert model_cli([*argv, str(signing.public_key_path(private))]) == 0


def test_recorder_drops_duplicate_and_late_batches_and_refuses_a_second_asset() -> None:
    """A duplicated or late batch was recorded again (as a new segment, counted as a gap): training data
    twice. `--topic sensors/+/raw` interleaved two turbines into one recording."""
    from components.anomaly.errors import TrainingError
    from components.model_builder.record import Recorder

    rec = Recorder()
    for seq in (0, 1, 2, 2, 1, 3):
        rec.add(batch(seq, healthy(BATCH, start=seq * BATCH)) | {"stream": "s1"})
    assert (rec.batches, rec.duplicates, rec.gaps, rec.segment_starts) == (4, 2, 0, [0])
    rec.add(batch(0, healthy(BATCH)) | {"stream": "s2"})  # a restarted ingest: new data, a new segment
    assert (rec.batches, rec.gaps, rec.segment_starts) == (5, 1, [0, 4 * BATCH])
    with pytest.raises(TrainingError, match="batches of asset 't2' after 't1': record one asset's topic"):
        rec.add(batch(1, healthy(BATCH), asset="t2") | {"stream": "s2"})


@pytest.mark.parametrize("extra, says", [
    (["--version", "../../etc"], "argument --version: '../../etc' is not a semantic version"),
    (["--name", "com/evil"], "argument --name: 'com/evil' is not a component name"),
    (["--name", ".."], "argument --name: '..' is not a component name"),
    (["--channels", "vib_x,vib_x,temp"], "argument --channels: 'vib_x,vib_x,temp' names a channel twice"),
    (["--hop", "300"], "--hop 300 is longer than --window 128: the samples between windows would never be"),
])
def test_build_refuses_names_versions_channels_and_hops_that_make_no_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str) -> None:
    """--version ../../etc wrote model.onnx, the card and the signature to <out>/etc before failing on the
    recipe (a '/' in --name likewise); a channel named twice was trained twice over; --hop above --window
    got as far as the window count."""
    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000", *extra))
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_build_takes_channel_names_with_spaces_after_commas(tmp_path: Path) -> None:
    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    assert model_cli(cli_build(tmp_path, data, "--rate-hz", "1000", "--channels", "vib_x, temp")) == 0
    assert load_card(tmp_path / "out" / "artifacts" / NAME / "1.0.0" / "model_card.json").channels == CHANNELS


def test_a_truncated_gzip_csv_is_one_line_and_trailing_blank_lines_are_not_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A .csv.gz cut short ended the build with an EOFError traceback; a CSV ending in a blank line (as
    editors leave them) was refused as 'line N has 0 cells, fewer than the header'."""
    import gzip

    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    packed = gzip.compress(data.read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(packed[: len(packed) // 2])
    line = one_error(capsys, cli_build(tmp_path, tmp_path / "cut.csv.gz", "--rate-hz", "1000"))
    assert line == f"error: {tmp_path / 'cut.csv.gz'}: cannot read CSV: the gzip stream ends early (a truncated file?)"
    (tmp_path / "blank.csv").write_text(data.read_text() + "\n\n")
    assert model_cli(cli_build(tmp_path, tmp_path / "blank.csv", "--rate-hz", "1000")) == 0


def test_a_feature_spec_listing_a_feature_twice_is_refused_and_spec_errors_name_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vib_x.rms in two groups (or a channel twice in one) trained a model with that feature twice and
    two contributions of one name; a season too long for the window was 'error: groups[0].season: ...'
    naming neither --features nor --window."""
    from components.anomaly.features import FeatureSpec

    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    for i, groups in enumerate(([{"channels": ["vib_x"], "stats": ["rms"]}, {"channels": ["vib_x"], "stats": ["rms"]}],
                                [{"channels": ["vib_x", "vib_x"], "stats": ["rms", "peak"]}])):
        spec = tmp_path / f"twice{i}.json"
        spec.write_text(json.dumps({"groups": groups}))
        line = one_error(capsys, cli_build(tmp_path, data, "--rate-hz", "1000", "--features", str(spec)))
        assert line.startswith(f"error: --features {spec}: not a JSON FeatureSpec: features vib_x."), line
        assert line.endswith("listed more than once")
        with pytest.raises(ValueError, match="listed more than once"):
            FeatureSpec.model_validate({"groups": groups})
    spec = tmp_path / "season.json"
    spec.write_text(json.dumps({"groups": [{"channels": ["vib_x"], "stats": ["zseason"], "season": 200}]}))
    line = one_error(capsys, ["build", "--data", str(data), "--out", str(tmp_path / "out"), "--window", "128",
                              "--hop", "64", "--features", str(spec), "--rate-hz", "1000"])
    assert line == f"error: --features {spec}: groups[0].season: season of 200 samples needs a window of at " \
                   "least 208 (--window 128)"


def test_a_signed_model_whose_contributions_are_not_one_per_feature_is_refused_at_load(
        v1: Any, tmp_path: Path) -> None:
    """Its scores were fine, so warm-up passed; the first real window then raised in top() outside the
    scoring guard and stopped the detector."""
    import onnx
    from onnx import TensorProto, helper

    n = len(v1.card.feature_names)
    graph = helper.make_graph(
        [helper.make_node("ReduceSumSquare", ["features"], ["score"], keepdims=0, axes=[1]),
         helper.make_node("Slice", ["features", "starts", "ends", "axes"], ["head"]),
         helper.make_node("Mul", ["head", "head"], ["contributions"])],
        "short_contributions",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None]),
         helper.make_tensor_value_info("contributions", TensorProto.FLOAT, [None, n - 1])],
        [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
         helper.make_tensor("ends", TensorProto.INT64, [1], [n - 1]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    assert v1.card.onnx.contributions_output == "contributions"
    d = tmp_path / "m"
    shutil.copytree(v1.model_dir, d)
    (d / "model.onnx").write_bytes(proto.SerializeToString())
    key, _ = signing.load_or_create_key(v1.model_dir.parents[2] / "keys" / "test.key")
    signing.sign_model(d, component=NAME, version="1.0.0", key=key)
    with pytest.raises(ModelLoadError) as info:
        load_model(d, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    e = info.value
    assert f"contributions of shape (1, {n - 1}), expected (1, {n})" in e.message
    assert (e.field, e.key_id, e.version) == ("onnx.contributions_output", v1.key_id, "1.0.0")


def timed_csv(path: Path, stamps: np.ndarray, seed: int = 1) -> Path:
    values = np.random.default_rng(seed).standard_normal(len(stamps))
    path.write_text("timestamp,value\n" + "\n".join(f"{t!r},{v!r}" for t, v in zip(stamps.tolist(), values.tolist(),
                                                                                 strict=True)) + "\n")
    return path


def timed_build(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["build", "--data", str(data), "--out", str(tmp / "out"), "--time-column", "timestamp", "--features",
            "univariate", "--window", "60", "--hop", "10", "--kind", "pca", *extra]


def test_a_csv_whose_times_jump_gives_no_window_across_the_jump(tmp_path: Path) -> None:
    """Rows a minute apart with three days missing in the middle: five windows spanned the hole (295
    windows; two stretches of 1500 rows give 2 x 145), where a recording's sequence gap and the
    detector's time_gap both end a segment."""
    stamps = 1.7e9 + 60.0 * np.arange(3000)
    stamps[1500:] += 3 * 86_400
    data = timed_csv(tmp_path / "timed.csv", stamps)
    assert model_cli(timed_build(tmp_path, data, "--rate-hz", str(1 / 60))) == 0
    card = load_card(tmp_path / "out" / "artifacts" / NAME / "1.0.0" / "model_card.json")
    assert card.training.windows == 290


@pytest.mark.parametrize("how, rate, says", [
    ("backwards", str(1 / 60), "does not increase at line 1002 (1700059940.0 then 1700059880.0): sort the rows"),
    ("duplicate", str(1 / 60), "does not increase at line 1002 (1700059940.0 then 1700059940.0)"),
    ("even", "1000", "--rate-hz 1000 disagrees with --time-column timestamp: its rows are 60 s apart (0.0166667 Hz)"),
])
def test_a_time_column_out_of_order_or_against_the_rate_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, rate: str, says: str) -> None:
    """Rows out of time order or repeated were windowed as if in order; --rate-hz 1000 for rows a minute
    apart went into the card (and false alarms per hour) unchecked."""
    stamps = 1.7e9 + 60.0 * np.arange(3000)
    if how == "backwards":
        stamps[1000] -= 120
    elif how == "duplicate":
        stamps[1000] = stamps[999]
    data = timed_csv(tmp_path / "t.csv", stamps)
    line = one_error(capsys, timed_build(tmp_path, data, "--rate-hz", rate))
    assert says in line and line.startswith(f"error: {data}: "), line


def test_build_refuses_the_same_data_file_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--data h.csv --data link-to-h.csv trained on the file and held out its copy: the threshold came
    from windows the model had been fitted on."""
    data = csv_of(tmp_path / "h.csv", healthy(4000), CHANNELS)
    again = tmp_path / "link.csv"
    again.symlink_to(data)
    line = one_error(capsys, [*cli_build(tmp_path, data, "--rate-hz", "1000"), "--data", str(again)])
    assert line == f"error: {again}: --data names this file twice (also as {data}); the held-out windows would be " \
                   "copies of fitted ones"


def test_input_skipped_says_what_the_dropped_batch_was_like() -> None:
    """input.skipped said 'rate_mismatch' or 'missing_channel' and a count: not which rate came against
    which, or which channel was missing, so the operator had to capture the bus to find out."""
    from structlog.testing import capture_logs

    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    detector = Detector(None, DetectorConfig())  # type: ignore[arg-type]
    w = fresh()
    with capture_logs() as logs:
        w.push(batch(1, healthy(BATCH)) | {"rate_hz": 2000.0})
        w.push(batch(2, healthy(BATCH)[:1], channels=["vib_x"]))
        w.push(batch(3, healthy(BATCH).astype("U8")))
        w.push(batch(4, healthy(BATCH)) | {"t0": math.nan})
        detector._log_skips("t1", w)
    said = {e["kind"]: e.get("last") for e in logs}
    assert said["rate_mismatch"] == "rate_hz 2000, the model's 1000"
    assert said["missing_channel"] == "lacks ['temp'] (has ['vib_x'])"
    assert said["malformed"] == "seq 4, t0 nan, rate_hz 1000.0: seq must be a whole number, t0 finite, rate_hz " \
                                "finite and > 0"
    w.push(batch(5, healthy(BATCH).astype("U8")))
    assert w.why["malformed"].startswith("data ndarray <U8 of shape (2, 64) for 2 channel name(s)")


def test_a_csv_whose_first_row_is_short_is_one_line_and_left_out_columns_are_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A first data row with fewer cells than the header ended the build with an IndexError traceback; a
    sensor column whose first cell is blank was left out of the channels without a word (and the
    summary never listed the channels)."""
    x = healthy(4000).astype(np.float64)
    rows = [f"{a!r},{b!r}" for a, b in x.T.tolist()]
    (tmp_path / "short.csv").write_text("vib_x,temp\n" + "1.0\n" + "\n".join(rows[1:]) + "\n")
    line = one_error(capsys, cli_build(tmp_path, tmp_path / "short.csv", "--rate-hz", "1000"))
    assert line == f"error: {tmp_path / 'short.csv'}: line 2 has 1 cells, fewer than the header's 2"
    (tmp_path / "late.csv").write_text("vib_x,temp,vib_y\n" + f"{rows[0]},\n" + "\n".join(
        f"{r},1.0" for r in rows[1:]) + "\n")
    assert model_cli(cli_build(tmp_path, tmp_path / "late.csv", "--rate-hz", "1000")) == 0
    out = capsys.readouterr()
    assert "warning: CSV column(s) vib_y left out: not a number in the first data row (channels: vib_x, temp)" \
        in out.err
    assert "  channels:  vib_x, temp" in out.out.splitlines()


def test_a_label_column_taken_as_a_channel_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --label-column a column 'label' of 0/1 was a channel: the model trained on the anomalous rows
    too, with the label as a feature, and nothing said so."""
    x = healthy(4000).astype(np.float64)
    (tmp_path / "lab.csv").write_text("vib_x,temp,label\n" + "\n".join(
        f"{a!r},{b!r},{1.0 if 1000 < i < 1200 else 0.0}" for i, (a, b) in enumerate(x.T.tolist())) + "\n")
    assert model_cli(cli_build(tmp_path, tmp_path / "lab.csv", "--rate-hz", "1000")) == 0
    assert "warning: column(s) label became channel(s), trained on as measurements" in capsys.readouterr().err
    assert model_cli(cli_build(tmp_path, tmp_path / "lab.csv", "--rate-hz", "1000", "--label-column", "label",
                               "--normal-value", "0.0", "--version", "2.0.0")) == 0
    assert "warning" not in capsys.readouterr().err


def test_verify_says_ok_only_for_a_model_the_detector_would_load(
        v1: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`nucleus model verify` checked the signature and parsed the card: a signed model.onnx that does not
    load, or whose input width is not the card's, was 'ok' and then refused by the detector."""
    argv = ["verify", "--component", NAME, "--version", "1.0.0", "--trusted-key", v1.public_key]
    assert model_cli([*argv, str(v1.model_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {NAME} 1.0.0 signed by {v1.key_id}: pca, ")
    key, _ = signing.load_or_create_key(v1.model_dir.parents[2] / "keys" / "test.key")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(v1.model_dir, corrupt)
    (corrupt / "model.onnx").write_bytes(b"\x08\x07not an onnx graph")
    signing.sign_model(corrupt, component=NAME, version="1.0.0", key=key)
    assert model_cli([*argv, str(corrupt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corrupt / 'model.onnx'}: {v1.key_id}: model.onnx does not load"), err


def test_model_rejected_in_the_heartbeat_clears_when_a_later_model_loads(v1: Any) -> None:
    """After 6.0.0 was refused and 9.0.0 then loaded, the heartbeat went on saying model_rejected 6.0.0 next
    to model_version 9.0.0, as if the deployment in force had failed."""
    from components.anomaly_detector.config import DetectorConfig
    from components.anomaly_detector.service import Detector

    detector = Detector(None, DetectorConfig())  # type: ignore[arg-type]
    detector.last_rejection = {"code": "MODEL_LOAD_FAILED", "component": NAME, "version": "0.9.0"}
    assert detector.status()["model_rejected"]["version"] == "0.9.0"
    model = load_model(v1.model_dir, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    detector._swap(model, 1.0)
    assert detector.status()["model_rejected"] is None and detector.status()["model_version"] == "1.0.0"


def test_empty_cells_are_missing_samples_and_left_out_rows_are_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A blank cell (a sensor dropout, which the ingest's CSV replay takes as NaN) stopped the build ("''
    is not a number"), so a file the ingest replays could not be trained on; rows dropped for NaN or
    inf were dropped without a word."""
    x = healthy(4000).astype(np.float64)
    rows = [f"{a!r},{b!r}" for a, b in x.T.tolist()]
    rows[2000] = f"{float(x[0, 2000])!r},"
    rows[3000] = "nan,40.0"
    (tmp_path / "holes.csv").write_text("vib_x,temp\n" + "\n".join(rows) + "\n")
    assert model_cli(cli_build(tmp_path, tmp_path / "holes.csv", "--rate-hz", "1000")) == 0
    assert "warning: 2 row(s) left out for a missing, NaN or infinite value" in capsys.readouterr().err
    card = load_card(tmp_path / "out" / "artifacts" / NAME / "1.0.0" / "model_card.json")
    assert card.training.rows == 3998
    rows[1000] = "n/a,40.0"  # text is still refused, naming the cell
    (tmp_path / "text.csv").write_text("vib_x,temp\n" + "\n".join(rows) + "\n")
    line = one_error(capsys, cli_build(tmp_path, tmp_path / "text.csv", "--rate-hz", "1000"))
    assert line.endswith("channel column 'vib_x', line 1002: 'n/a' is not a number (pick the columns with --channels)")


def test_record_refuses_an_out_name_that_is_not_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out healthy wrote healthy.npz (numpy adds the suffix) while the summary said '-> healthy', and
    build reads a file without .npz as a CSV."""
    line = one_error(capsys, ["record", "--topic", "sensors/t1/raw", "--batches", "1", "--out",
                              str(tmp_path / "healthy")])
    assert line == f"error: --out {tmp_path / 'healthy'}: a recording's name ends in .npz (e.g. healthy.npz)"
