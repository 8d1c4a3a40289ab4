"""Sensor ingest: pacing, sequencing, MQTT re-batching, fault requests, configuration; then the
service on a real bus (simulator, CSV replay, a real Mosquitto) and the component under a real daemon."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_action_kit import REPO, bus, client, free_port, mosquitto
from structlog.testing import capture_logs

from components.configuration import ConfigError
from components.sensor_ingest.batch import Batch, Sequencer
from components.sensor_ingest.config import load_config
from components.sensor_ingest.mqtt_source import SampleAssembler
from components.sensor_ingest.pacing import Pacer
from components.sensor_ingest.service import IngestService, handle_fault_request
from components.sensor_ingest.simulator import TurbineParams, TurbineSimulator

SHARED = REPO / ".." / "shared"

# --- pacing ---------------------------------------------------------------------------------------


def test_pacer_sleeps_until_each_batch_is_due_without_drift() -> None:
    pacer = Pacer(max_burst=5)
    now = 100.0
    dues = []
    for i in range(1000):
        step = pacer.step(now, 0.1)
        assert step.skipped == 0
        due = now + step.delay_s
        dues.append(due)
        now = due + (0.003 if i % 3 else 0.0004)  # oversleep and work time, never accumulated
    assert dues[0] == pytest.approx(100.1)
    assert dues[-1] == pytest.approx(100.0 + 1000 * 0.1, abs=1e-9)


def test_pacer_catches_up_back_to_back_within_the_bound() -> None:
    pacer = Pacer(max_burst=3)
    assert pacer.step(0.0, 0.1).delay_s == pytest.approx(0.1)
    # a 0.45 s stall: due were 0.2, 0.3, 0.4 (and 0.5 in the future)
    steps = [pacer.step(0.55, 0.1) for _ in range(3)]
    assert [(s.delay_s, s.skipped) for s in steps] == [(0.0, 0)] * 3
    nxt = pacer.step(0.55, 0.1)  # 0.5 is within its own slot: sent now, not a catch-up
    assert (nxt.delay_s, nxt.skipped) == (0.0, 0)
    assert pacer.step(0.55, 0.1).delay_s == pytest.approx(0.05)


def test_pacer_skips_the_backlog_beyond_the_burst_bound() -> None:
    pacer = Pacer(max_burst=2)
    pacer.step(0.0, 0.1)  # due 0.1
    now = 10.0  # a 10 s stall: ~99 batches behind
    steps = [pacer.step(now, 0.1) for _ in range(3)]
    assert [s.skipped for s in steps[:2]] == [0, 0]
    assert steps[2].skipped > 90
    assert sum(1 for _ in range(10) if pacer.step(now, 0.1).delay_s == 0) <= 1  # back on schedule
    assert pacer.step(now, 0.1).delay_s > 0


def test_sequencer_numbers_batches_and_fixes_dtype() -> None:
    seq = Sequencer("t1", "sim")
    data = np.arange(6, dtype=np.float64).reshape(2, 3)
    p0 = seq.payload(Batch(1.5, 1000.0, ("a", "b"), data))  # type: ignore[arg-type]
    p1 = seq.payload(Batch(1.503, 1000.0, ("a", "b"), data))  # type: ignore[arg-type]
    assert (p0["seq"], p1["seq"]) == (0, 1)
    assert p0["data"].dtype == np.float32 and p0["data"].shape == (2, 3)
    assert set(p0) == {"asset", "seq", "stream", "t0", "rate_hz", "channels", "data", "source"}
    assert p0["stream"] == p1["stream"] != Sequencer("t1", "sim").payload(  # a new run of the numbering
        Batch(1.5, 1000.0, ("a", "b"), data))["stream"]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        seq.payload(Batch(0, 1, ("a",), data.astype(np.float32)))
    assert seq.next_seq == 2  # a refused batch does not consume a number
    after = seq.payload(Batch(9.0, 1000.0, ("a", "b"), data.astype(np.float32), follows_gap=True))
    assert after["seq"] == 2 and after["follows_gap"] is True  # said only when true: the usual shape is unchanged


# --- MQTT re-batching ----------------------------------------------------------------------------


def test_assembler_batches_single_samples_and_blocks() -> None:
    a = SampleAssembler(("x", "y"), rate_hz=100.0, batch_size=4)
    out = []
    for i in range(3):
        out += a.feed(json.dumps({"ts": 10 + i / 100, "x": i, "y": -i}).encode(), 99.0)
    assert out == []
    out += a.feed(json.dumps({"t0": 10.03, "rate_hz": 100, "channels": ["y", "x", "z"],
                              "data": [[-3, -4, -5], [3, 4, 5], [0, 0, 0]]}).encode(), 99.0)
    assert len(out) == 1
    b = out[0]
    assert b.t0 == 10.0 and b.channels == ("x", "y")
    np.testing.assert_array_equal(b.data, [[0, 1, 2, 3], [0, -1, -2, -3]])
    rest = a.flush()
    assert rest is not None and rest.t0 == pytest.approx(10.04) and rest.data.tolist() == [[4, 5], [-4, -5]]
    assert a.flush() is None
    assert a.stats.unknown_channels == 1


def test_assembler_counts_bad_input_and_never_guesses() -> None:
    a = SampleAssembler(("x", "y"), rate_hz=10.0, batch_size=100)
    for raw in (b"not json", b"[1,2]", b'{"ts": "soon", "x": 1}', b'{"ts": NaN, "x": 1}',
                b'{"data": [[1, 2]], "channels": ["x", "y"]}', b'{"data": "x", "channels": ["x"]}', b"\xff"):
        assert a.feed(raw, 5.0) == []
    assert a.stats.malformed == 7
    a.feed(b'{"x": "high", "y": true}', 5.0)  # arrival time used; non-numbers are NaN
    a.feed(b'{"x": 1}', 5.1)  # y missing
    b = a.flush()
    assert b is not None and b.t0 == 5.0
    assert np.isnan(b.data).tolist() == [[True, False], [True, True]]
    assert (a.stats.bad_values, a.stats.missing_values) == (2, 1)


def test_assembler_reports_each_problem_when_its_count_passes_1_10_100() -> None:
    """Counts nobody can read are silence: each kind of bad input is reported (the source logs it) at its
    1st, 10th, 100th, ... occurrence, with what was wrong and on which topic."""
    reports: list[tuple[str, str, int, str | None]] = []
    a = SampleAssembler(("x", "y"), rate_hz=100.0, batch_size=1000, on_problem=lambda *r: reports.append(r))
    for _ in range(12):
        assert a.feed(b"garbage", 1.0, "dev/1/vib") == []
    assert [(r[0], r[2], r[3]) for r in reports] == [("malformed", 1, "dev/1/vib"), ("malformed", 10, "dev/1/vib")]
    assert "not JSON" in reports[0][1]
    reports.clear()
    a.feed(b'{"ts": 10.0, "x": 1, "rpm": 7}', 1.0, "dev/1/vib")  # y missing, rpm not configured
    a.feed(b'{"ts": 10.01, "x": "high", "y": 2}', 1.0, "dev/1/vib")
    a.feed(json.dumps({"t0": 10.02, "rate_hz": 1000, "channels": ["x", "y"], "data": [[3], [3]]}).encode(), 1.0,
           "dev/1/vib")  # stamped at another rate than the configured 100 Hz: refused, not re-stamped
    a.feed(b'{"ts": 10.02, "x": 3, "y": 3}', 1.0, "dev/2/vib")  # a second device on the wildcard: refused
    got = {r[0]: r[1] for r in reports}
    assert set(got) == {"missing_values", "unknown_channels", "bad_values", "rate_mismatch", "other_topic"}
    assert "'y'" in got["missing_values"] and "rpm" in got["unknown_channels"] and "'high'" in got["bad_values"]
    assert "1000" in got["rate_mismatch"] and "'dev/1/vib' only" in got["other_topic"]
    assert (a.stats.rate_mismatch, a.stats.other_topic, a.stats.samples) == (1, 1, 2)
    b = SampleAssembler(("x", "y"), rate_hz=100.0, batch_size=1000, on_problem=lambda *r: reports.append(r))
    b.feed(json.dumps({"t0": 10.02, "channels": ["x", "y"], "data": [[3, 4, 5]]}).encode(), 1.0)
    assert reports[-1][:3] == ("malformed", "block: 'data' has shape [1, 3] for 2 channel(s); expected one list "
                                            "of samples per channel", 1)
    c = SampleAssembler(("x", "y"), rate_hz=100.0, batch_size=1000, on_problem=lambda *r: reports.append(r))
    c.feed(b'{"ts": 1700000000125, "x": 1, "y": 1}', 1.0)  # milliseconds: 50,000 years ahead as seconds
    assert reports[-1][1] == "'ts' 1700000000125 looks like milliseconds; epoch seconds expected"
    assert c.stats.samples == 0


def test_assembler_ends_a_batch_where_the_sample_times_jump() -> None:
    """Lost messages (QoS 0), a device that paused: the samples after the hole are not the next ones, so
    the batch ends before them and each batch's t0 + i / rate_hz stays true (as the CSV replay does)."""
    a = SampleAssembler(("x",), rate_hz=100.0, batch_size=10)
    out = []
    for i in [0, 1, 2, 3, 9, 10]:  # samples 4..8 were lost
        out += a.feed(json.dumps({"ts": 50 + i / 100, "x": i}).encode(), 99.0)
    out += a.feed(json.dumps({"t0": 50.11, "channels": ["x"], "data": [[11, 12]]}).encode(), 99.0)  # contiguous
    out += a.feed(json.dumps({"ts": 50.1305, "x": 13}).encode(), 99.0)  # jitter within a sample period
    rest = a.flush()
    assert len(out) == 1 and rest is not None
    assert (out[0].t0, out[0].data.tolist()) == (50.0, [[0, 1, 2, 3]])
    assert rest.t0 == pytest.approx(50.09) and rest.data.tolist() == [[9, 10, 11, 12, 13]]
    assert a.stats.gaps == 1
    # seq will be consecutive: the batch after the hole says it follows one (the detector's time_gap)
    assert [out[0].follows_gap, rest.follows_gap] == [False, True]
    # ... also when the hole falls after a flush (the device went quiet, then resumed later)
    assert a.feed(json.dumps({"ts": 50.14, "x": 14}).encode(), 99.0) == []  # continues the flushed batch
    cont = a.flush()
    assert cont is not None and cont.t0 == pytest.approx(50.14) and cont.follows_gap is False
    assert a.feed(json.dumps({"ts": 60.0, "x": 15}).encode(), 99.0) == []  # resumed much later
    later = a.flush()
    assert later is not None and later.t0 == 60.0 and later.follows_gap is True and a.stats.gaps == 2
    # Without their own time (the arrival time is used) messages are never split: arrival jitter is not a gap.
    b = SampleAssembler(("x",), rate_hz=100.0, batch_size=10)
    for i in range(3):
        b.feed(b'{"x": 1}', 10.0 + i)
    assert b.stats.gaps == 0 and (rest := b.flush()) is not None and rest.n_samples == 3


# --- fault requests and configuration -------------------------------------------------------------


def test_fault_requests_inject_clear_and_refuse_bad_input() -> None:
    sim = TurbineSimulator(TurbineParams())
    ok = handle_fault_request(sim, {"fault": "bearing_outer_race", "severity": 0.7, "action": "inject"})
    assert ok == {"ok": True, "active": [{"fault": "bearing_outer_race", "severity": 0.7}]}
    ok = handle_fault_request(sim, {"fault": "dropout", "severity": 1, "channel": "temp", "mode": "zero"})
    assert len(ok["active"]) == 2
    for bad, why in [({"fault": "meteor"}, "unknown fault"), ({"fault": "imbalance", "severity": 2}, "severity"),
                     ({"fault": "imbalance", "severity": "high"}, "severity"), ("inject", "map"),
                     ({"fault": "stuck", "channel": "rpm"}, "channel"), ({"fault": "stuck", "channel": 3}, "channel"),
                     ({"fault": "imbalance", "action": "explode"}, "action"),
                     ({"fault": "dropout", "mode": "garbage"}, "mode")]:
        reply = handle_fault_request(sim, bad)
        assert reply["ok"] is False and why in reply["error"], (bad, reply)
        assert len(reply["active"]) == 2
    assert handle_fault_request(sim, {"fault": "dropout", "channel": "temp", "action": "clear"})["cleared"] is True
    assert handle_fault_request(sim, {"action": "clear_all"}) == {"ok": True, "active": []}
    assert handle_fault_request(None, {"fault": "imbalance"})["ok"] is False


def test_config_camel_case_defaults_and_errors_naming_fields() -> None:
    cfg = load_config({"asset": "wt-7", "rateHz": 2000, "batchSize": 200, "simulator": {"gearTeeth": 20},
                       "accessControl": {"x": {}}})
    assert (cfg.asset, cfg.rate_hz, cfg.batch_size, cfg.simulator.gear_teeth) == ("wt-7", 2000, 200, 20)
    assert cfg.topic == "sensors/wt-7/raw"
    assert load_config(None).source == "sim"
    for raw, field in [({"batchsize": 5}, "batchsize"), ({"asset": "a/b"}, "asset"), ({"source": "csv"}, "csv"),
                       ({"simulator": {"gearTeeth": 30}}, "gear_teeth"), ({"rateHz": -1}, "rateHz")]:
        with pytest.raises(ConfigError, match=field) as info:
            load_config(raw)
        assert info.value.component == "com.nucleus.SensorIngest"


def test_config_refuses_a_csv_file_it_cannot_replay(tmp_path: Path) -> None:
    """Checked with the configuration, so a deployment naming a missing file or column is refused (the
    ingest used to accept it and then fail at every start until BROKEN). Only the header is read."""
    good = tmp_path / "good.csv"
    good.write_text("a,b\n1,2\n")
    assert load_config({"source": "csv", "csv": {"path": str(good)}}).csv is not None
    (tmp_path / "not-gzip.csv.gz").write_text("a,b\n")
    for csv, why in [({"path": str(tmp_path / "gone.csv")}, "gone.csv: no such file"),
                     ({"path": str(good), "columns": ["a", "c"]}, "columns ['c'] not in header"),
                     ({"path": str(tmp_path / "not-gzip.csv.gz")}, "cannot read the header row")]:
        with pytest.raises(ConfigError, match="csv: ") as info:
            load_config({"source": "csv", "csv": csv})
        assert why in str(info.value)
        assert "Value error" not in str(info.value)  # pydantic's prefix: the message is the point
    # A csv section the source does not use is not checked: switching to MQTT leaves it behind.
    assert load_config({"source": "mqtt", "csv": {"path": str(tmp_path / "gone.csv")}}).source == "mqtt"


# --- the service on a real bus --------------------------------------------------------------------


async def collect(c: Any, topic: str, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout), c.subscribe(topic, queue_size=10_000) as messages:
        async for m in messages:
            out.append(m.payload)
            if len(out) == n:
                return out
    return out


async def test_simulated_stream_is_sequenced_paced_and_takes_faults(short_tmp: Path) -> None:
    cfg = load_config({"asset": "t1", "rateHz": 2000, "batchSize": 100})
    async with bus(short_tmp) as path, client(path, "ingest") as ic, client(path) as tc:
        service = IngestService(ic, cfg)
        got_task = asyncio.create_task(collect(tc, "sensors/t1/raw", 30))
        await asyncio.sleep(0.05)  # subscribed before the first batch
        async with asyncio.TaskGroup() as tg:
            pub = tg.create_task(service.publish_forever())
            faults = tg.create_task(service.serve_faults())
            await asyncio.sleep(0.1)
            reply = await tc.request("control/t1/fault", {"fault": "dropout", "severity": 1.0, "channel": "vib_x"})
            got = await got_task
            pub.cancel()
            faults.cancel()
    assert reply["ok"] and reply["active"] == [{"fault": "dropout", "severity": 1.0, "channel": "vib_x",
                                                "mode": "nan"}]
    seqs = [p["seq"] for p in got]
    assert seqs == list(range(seqs[0], seqs[0] + 30))
    t0 = np.array([p["t0"] for p in got])
    np.testing.assert_allclose(np.diff(t0), 0.05, atol=1e-6)  # 100 samples at 2 kHz, exactly
    p = got[-1]
    assert p["channels"] == ["vib_x", "vib_y", "vib_z", "temp"] and p["data"].shape == (4, 100)
    assert p["data"].dtype == np.float32 and p["rate_hz"] == 2000 and p["source"] == "sim"
    assert np.isnan(p["data"][0]).all() and not np.isnan(p["data"][1:]).any()


async def test_csv_replay_of_gearbox_file_over_the_bus(short_tmp: Path) -> None:
    path_csv = SHARED / "data" / "gearbox_fault_diagnosis" / "b30hz0.csv.gz"
    if not path_csv.exists():
        pytest.skip(f"shared data not found at {path_csv.resolve()}")
    cfg = load_config({"asset": "gb", "source": "csv", "rateHz": 5000, "batchSize": 512, "maxBurst": 4,
                       "csv": {"path": str(path_csv), "speed": 20, "loop": False,
                               "channelNames": ["vib_x", "vib_y", "vib_z", "vib_w"]}})
    async with bus(short_tmp) as path, client(path, "ingest") as ic, client(path) as tc:
        service = IngestService(ic, cfg)
        got_task = asyncio.create_task(collect(tc, "sensors/gb/raw", 40))
        await asyncio.sleep(0.05)
        pub = asyncio.create_task(service.publish_forever())
        got = await got_task
        pub.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pub
    assert [p["seq"] for p in got] == list(range(40))
    assert all(p["source"] == "csv" and p["rate_hz"] == 5000 and p["data"].shape == (4, 512) for p in got)
    assert got[0]["data"][:, 0] == pytest.approx([2.35039, 1.45487, -1.66708, -2.05561], rel=1e-5)  # row 1 of the file
    np.testing.assert_allclose(np.diff([p["t0"] for p in got]), 512 / 5000, atol=1e-6)  # data time


async def test_mqtt_source_against_a_real_mosquitto(short_tmp: Path) -> None:
    import aiomqtt

    with mosquitto(short_tmp) as port:
        cfg = load_config({"asset": "m1", "source": "mqtt", "rateHz": 100, "batchSize": 50,
                           "mqtt": {"host": "127.0.0.1", "port": port, "topic": "plant/m1/vib",
                                    "channels": ["vib_x", "temp"], "flushAfterS": 0.3}})
        async with bus(short_tmp) as path, client(path, "ingest") as ic, client(path) as tc:
            service = IngestService(ic, cfg)
            got_task = asyncio.create_task(collect(tc, "sensors/m1/raw", 3))
            pub = asyncio.create_task(service.publish_forever())
            async with aiomqtt.Client("127.0.0.1", port) as device:
                # the source subscribes asynchronously: repeat a probe until its batch shows up
                async with asyncio.timeout(10):
                    while not service.published:
                        await device.publish("plant/m1/vib", json.dumps({"t0": 0.0, "channels": ["vib_x", "temp"],
                                                                         "data": [[0.0] * 50, [1.0] * 50]}))
                        await asyncio.sleep(0.1)
                for i in range(70):
                    await device.publish("plant/m1/vib", json.dumps({"ts": 1000 + i / 100, "vib_x": i, "temp": 40}))
                await device.publish("plant/m1/vib", b"garbage")
            got = await got_task
            pub.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pub
    probe_batches = got[0]["seq"] + 1
    full, partial = got[1], got[2]
    assert full["seq"] == probe_batches and full["t0"] == 1000.0 and full["data"].shape == (2, 50)
    assert full["data"][0].tolist() == list(range(50)) and full["source"] == "mqtt"
    assert partial["data"].shape == (2, 20) and partial["t0"] == pytest.approx(1000.5)  # flushed after 0.3 s


async def wait_for_log(logs: Sequence[Mapping[str, Any]], event: str, count: int = 1, timeout: float = 10.0,
                       poke: Any = None) -> None:
    """Until ``event`` was logged ``count`` times (bounded); ``poke`` is awaited between looks."""
    async with asyncio.timeout(timeout):
        while sum(1 for e in logs if e["event"] == event) < count:
            if poke is not None:
                await poke()
            await asyncio.sleep(0.05)


async def test_mqtt_bad_input_is_logged_and_the_source_outlives_a_broker_restart(short_tmp: Path) -> None:
    """The bad cases of a real device: each is one log line naming the problem and the topic, the good
    samples around them still make batches, and a broker that goes away and comes back on the same port
    is reconnected to with the numbering carried on."""
    import aiomqtt

    port = free_port()
    cfg = load_config({"asset": "m2", "source": "mqtt", "rateHz": 100, "batchSize": 5,
                       "mqtt": {"port": port, "topic": "plant/+/vib", "channels": ["x", "y"], "flushAfterS": 30,
                                "reconnectInitialS": 0.1, "reconnectMaxS": 0.2}})
    with capture_logs() as logs:
        async with bus(short_tmp) as path, client(path, "ingest") as ic, client(path) as tc, \
                tc.subscribe("sensors/m2/raw", queue_size=100) as batches:
            service = IngestService(ic, cfg)
            pub = asyncio.create_task(service.publish_forever())
            with mosquitto(short_tmp, port):
                async with aiomqtt.Client("127.0.0.1", port) as device:
                    async def probe() -> None:  # the source subscribes asynchronously
                        await device.publish("plant/p1/vib", b"garbage")
                    await wait_for_log(logs, "ingest.mqtt_bad_input", poke=probe)
                    for doc in [{"ts": 100.0, "x": 1}, {"ts": 100.01, "x": 2, "y": 2, "rpm": 9},
                                {"ts": 100.02, "x": "high", "y": 3},
                                {"t0": 100.03, "channels": ["x", "y"], "data": [[4, 5], [4, 5]]},
                                {"t0": 100.05, "rate_hz": 50, "channels": ["x"], "data": [[6]]}]:
                        await device.publish("plant/p1/vib", json.dumps(doc))
                    await device.publish("plant/p2/vib", json.dumps({"ts": 100.05, "x": 1, "y": 1}))
                    first = (await anext(batches)).payload
                    await wait_for_log(logs, "ingest.mqtt_bad_input", 6)
            await wait_for_log(logs, "ingest.mqtt_disconnected")  # the broker is gone: retried with backoff
            with mosquitto(short_tmp, port):
                await wait_for_log(logs, "ingest.mqtt_connected", 2)
                async with aiomqtt.Client("127.0.0.1", port) as device:
                    for i in range(5):
                        await device.publish("plant/p1/vib", json.dumps({"ts": 200 + i / 100, "x": i, "y": i}))
                    second = (await anext(batches)).payload
            assert not pub.done()  # never ended by any of it
            pub.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pub
    bad = {e["reason"]: e for e in logs if e["event"] == "ingest.mqtt_bad_input"}
    assert set(bad) == {"malformed", "missing_values", "unknown_channels", "bad_values", "rate_mismatch",
                        "other_topic"}
    assert all(e["topic"] for e in bad.values()) and bad["other_topic"]["topic"] == "plant/p2/vib"
    assert (first["t0"], second["t0"]) == (100.0, 200.0) and second["seq"] == first["seq"] + 1
    assert first["stream"] == second["stream"]
    np.testing.assert_array_equal(first["data"], [[1, 2, np.nan, 4, 5], [np.nan, 2, 3, 4, 5]])


async def test_a_restart_that_lands_with_the_connack_still_stops_the_mqtt_source(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiomqtt waits for the CONNACK with asyncio.wait_for, which in Python 3.11 swallows a cancel that
    arrives in the same loop turn as the answer. The ingest cancels its source to apply a configuration;
    the swallowed cancel left the old source running and every later configuration unapplied (found on a
    daemon: five restarts for one five-key deployment, the last one lost). Here the cancel is sent from
    the CONNACK callback itself, so the race is hit every time."""
    import aiomqtt

    source: asyncio.Task[None] | None = None
    on_connect = aiomqtt.Client._on_connect

    def cancel_with_the_connack(self: Any, *args: Any, **kwargs: Any) -> None:
        on_connect(self, *args, **kwargs)
        if source is not None:
            source.cancel()

    monkeypatch.setattr(aiomqtt.Client, "_on_connect", cancel_with_the_connack)
    with mosquitto(short_tmp) as port:
        cfg = load_config({"asset": "m3", "source": "mqtt", "mqtt": {"port": port, "topic": "plant/m3/vib"}})
        async with bus(short_tmp) as path, client(path, "ingest") as ic:
            source = asyncio.create_task(IngestService(ic, cfg).publish_forever())
            done, _ = await asyncio.wait({source}, timeout=10)
            if not done:
                source.cancel()  # a second cancel ends it, so the test can clean up
                await asyncio.wait({source}, timeout=10)
    assert done and source.cancelled()


async def test_a_replay_file_that_breaks_mid_way_is_one_logged_error(short_tmp: Path) -> None:
    """A truncated .gz (a copy still in progress, a full disk) passes the header check and fails later:
    one error line naming the file, and the source ends instead of crashing the ingest at every start."""
    whole = gzip.compress(("a,b\n" + "".join(f"{i},{-i}\n" for i in range(20_000))).encode())
    path_csv = short_tmp / "cut.csv.gz"
    path_csv.write_bytes(whole[: len(whole) // 2])
    cfg = load_config({"asset": "cut", "source": "csv", "rateHz": 1000, "batchSize": 100,
                       "csv": {"path": str(path_csv), "speed": 0, "loop": False}})
    with capture_logs() as logs:
        async with bus(short_tmp) as path, client(path, "ingest") as ic:
            service = IngestService(ic, cfg)
            await asyncio.wait_for(service.publish_forever(), 30)
    failed = [e for e in logs if e["event"] == "ingest.replay_failed"]
    assert len(failed) == 1 and failed[0]["path"] == str(path_csv) and "EOFError" in failed[0]["error"]
    assert service.published > 10  # what could be read was replayed


# --- the component under a real daemon ------------------------------------------------------------


@pytest.mark.slow
def test_component_under_daemon_publishes_and_takes_faults(daemon: Any, short_tmp: Path) -> None:
    update = {"com.nucleus.SensorIngest": {"MERGE": {"asset": "wt-9", "batchSize": 50}}}
    daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", "com.nucleus.SensorIngest=1.0.0",
               "--update-config", json.dumps(update))
    policy = short_tmp / "viewer.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"v": {
        "operations": ["aws.greengrass#SubscribeToTopic", "aws.greengrass#PublishToTopic"],
        "resources": ["sensors/#", "control/wt-9/fault"]}}}))
    token = daemon.cli("client", "add", "test.viewer", "--policy", str(policy)).stdout.strip().splitlines()[-1]

    async def scenario() -> tuple[list[dict[str, Any]], Any, Any]:
        from ipc import Client

        async with Client(daemon.root / "ipc.sock", token, name="test.viewer") as c:
            first = await collect(c, "sensors/wt-9/raw", 20, timeout=30)
            reply = await c.request("control/wt-9/fault", {"fault": "stuck", "channel": "temp"})
            after = await collect(c, "sensors/wt-9/raw", 3, timeout=30)
            bad = await c.request("control/wt-9/fault", {"fault": "stuck", "severity": math.inf})
            return first + after, reply, bad

    got, reply, bad = asyncio.run(scenario())
    assert reply["ok"] is True and bad["ok"] is False
    seqs = [p["seq"] for p in got[:20]]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    assert all(p["asset"] == "wt-9" and p["data"].shape == (4, 50) for p in got)
    temp = got[-1]["data"][3]
    assert np.unique(temp).size == 1  # stuck


@pytest.mark.slow
def test_configuration_only_deployments_keep_the_stream_and_refuse_a_csv_it_cannot_read(
        daemon: Any, short_tmp: Path) -> None:
    """What switching a replay on a device looks like: configuration-only deployments. One that sets three
    keys is applied once (the nucleus notifies each key: the ingest used to restart its source three
    times) and keeps ``stream`` and the numbering (a new stream made the detector discard its partial
    window as after a restart). One naming a file that is not there is refused by the deployment, naming
    csv, and the ingest runs on (it used to be accepted, then the ingest failed at every start until
    BROKEN)."""
    daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", "com.nucleus.SensorIngest=1.0.0",
               "--update-config", json.dumps({"com.nucleus.SensorIngest": {"MERGE": {"asset": "wt-8",
                                                                                   "batchSize": 50}}}))
    policy = short_tmp / "viewer.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"v": {
        "operations": ["aws.greengrass#SubscribeToTopic"], "resources": ["sensors/wt-8/raw"]}}}))
    token = daemon.cli("client", "add", "test.viewer", "--policy", str(policy)).stdout.strip().splitlines()[-1]
    three_keys = {"com.nucleus.SensorIngest": {"MERGE": {"batchSize": 100, "maxBurst": 5, "simulator": {"seed": 3}}}}
    missing = {"com.nucleus.SensorIngest": {"MERGE": {"source": "csv", "csv": {"path": str(short_tmp / "gone.csv")}}}}

    async def scenario() -> tuple[list[dict[str, Any]], Any]:
        from ipc import Client

        got: list[dict[str, Any]] = []
        async with Client(daemon.root / "ipc.sock", token, name="test.viewer") as c, \
                c.subscribe("sensors/wt-8/raw", queue_size=10_000) as batches:

            async def take(n: int, shape: int | None = None) -> None:
                async with asyncio.timeout(30):
                    while n:
                        got.append((await anext(batches)).payload)
                        n -= shape is None or got[-1]["data"].shape[1] == shape

            await take(5)
            await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(three_keys))
            await take(5, shape=100)
            refused = await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(missing),
                                              check=False)
            await take(5)
        return got, refused

    got, refused = asyncio.run(scenario())
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr, refused.stderr
    assert "csv:" in refused.stderr and "gone.csv: no such file" in refused.stderr
    seqs = [p["seq"] for p in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(got)))  # nothing lost, nothing restarted
    assert {p["stream"] for p in got} == {got[0]["stream"]}
    assert got[-1]["data"].shape == (4, 100) and got[-1]["source"] == "sim"
    log = daemon.cli("logs", "com.nucleus.SensorIngest").stdout
    assert log.count("ingest.config_changed") == 1 and log.count("ingest.started") == 2, log


async def test_configuration_changes_on_a_bus_without_configuration_never_ends(tmp_path: Path) -> None:
    """ipc.devserver-style bus (no configuration store): the stream waits instead of ending, because an
    ended stream means "the nucleus is stopping you" to the components' run loops."""
    async with bus(tmp_path) as path, client(path) as c:
        changes = c.configuration_changes(lambda doc: doc, errors=(ValueError,), rejected=lambda exc: None)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(changes), 0.5)
