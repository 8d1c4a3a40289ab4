"""Sensor ingest as a demanding user meets it: what a walk through each source, fault request and
configuration change found wrong (each test failed before its fix). The bad input of issue 4 point 9
(NaN/inf, duplicated and late samples, ambiguous columns) must be refused or turned into a defined,
counted and logged value, never a silent wrong answer."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_action_kit import REPO, bus, client, free_port, mosquitto
from structlog.testing import capture_logs

from components.configuration import ConfigError
from components.sensor_ingest.config import load_config
from components.sensor_ingest.mqtt_source import SampleAssembler
from components.sensor_ingest.pacing import Pacer
from components.sensor_ingest.replay import CsvReplay
from components.sensor_ingest.service import Clocks, IngestService, handle_fault_request
from components.sensor_ingest.simulator import TurbineParams, TurbineSimulator

INGEST = "com.nucleus.SensorIngest"

# --- fault requests -------------------------------------------------------------------------------


def test_a_fault_request_with_a_key_it_does_not_use_is_refused() -> None:
    """``sevrity: 0.2`` used to inject at full severity and answer ok; a channel or mode given to a fault
    that has none was dropped, the requester believing one channel had it. Each is now an error naming
    the key, and the active faults do not change."""
    sim = TurbineSimulator(TurbineParams())
    assert handle_fault_request(sim, {"fault": "imbalance", "severity": 0.5})["ok"] is True
    for bad, why in [({"fault": "imbalance", "sevrity": 0.2}, "unknown key(s) ['sevrity']"),
                     ({"fault": "imbalance", "channel": "vib_x"}, "channel applies to the sensor faults"),
                     ({"fault": "over_temperature", "mode": "zero"}, "mode applies to dropout only"),
                     ({"fault": "imbalance", "severity": "0.5"}, "severity must be a number in 0..1, got '0.5'"),
                     ({"fault": "dropout", "mode": "x"}, "mode must be 'nan' or 'zero', got 'x'")]:
        reply = handle_fault_request(sim, bad)
        assert reply["ok"] is False and why in reply["error"], (bad, reply)
        assert reply["active"] == [{"fault": "imbalance", "severity": 0.5}]


def test_a_fault_no_configured_channel_would_show_is_refused() -> None:
    """With ``simulator.channels: [vib_x, vib_y]`` an over-temperature was injected and answered ok, and the
    stream did not change: a test of the detector's over-temperature path passed without testing it."""
    vib_only = TurbineSimulator(TurbineParams(), channels=("vib_x", "vib_y"))
    reply = handle_fault_request(vib_only, {"fault": "over_temperature", "severity": 1})
    assert reply["ok"] is False and "temp channel, which is not one of ['vib_x', 'vib_y']" in reply["error"]
    assert handle_fault_request(vib_only, {"fault": "imbalance"})["ok"] is True
    temp_only = TurbineSimulator(TurbineParams(), channels=("temp",))
    reply = handle_fault_request(temp_only, {"fault": "bearing_outer_race"})
    assert reply["ok"] is False and "vibration channels" in reply["error"] and reply["active"] == []
    assert handle_fault_request(temp_only, {"fault": "stuck"})["ok"] is True  # a sensor fault shows anywhere
    # A configuration change to channels a fault does not show on drops it (logged), as for its channel.
    assert temp_only.adopt_faults(vib_only) == [{"fault": "imbalance", "severity": 1.0}]


def test_a_reconnect_backoff_that_starts_above_its_maximum_is_refused() -> None:
    with pytest.raises(ConfigError, match="reconnectInitialS 20 is above reconnectMaxS 10"):
        load_config({"source": "mqtt", "mqtt": {"reconnectInitialS": 20}})


def test_a_bad_dev_config_file_is_one_error_line_naming_it(tmp_path: Path) -> None:
    """``python -m components.sensor_ingest --config FILE`` (development on a bare bus) answered a broken
    YAML file with a traceback naming "<unicode string>", and a misspelt key with a traceback too."""
    for name, text, why in [("broken.yaml", "rateHz: [\n", "expected the node content"),
                            ("typo.yaml", "ratehz: 5\n", "ratehz: unknown key"),
                            ("gone.yaml", None, "No such file")]:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "components.sensor_ingest", "--config", str(path)],
                              cwd=REPO, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "NUCLEUS_IPC_SOCKET": str(tmp_path / "no.sock")})
        assert proc.returncode == 2 and f"error: --config {path}: " in proc.stderr, proc.stderr
        assert why in proc.stderr and "Traceback" not in proc.stderr


def test_clearing_a_sensor_fault_without_a_channel_clears_it_on_every_channel() -> None:
    """``{"action": "clear", "fault": "stuck"}`` after a stuck temp answered ok with cleared false, and temp
    stayed stuck: only a fault injected without a channel was cleared that way."""
    sim = TurbineSimulator(TurbineParams())
    for request in ({"fault": "stuck", "channel": "temp"}, {"fault": "stuck", "channel": "vib_x"},
                    {"fault": "dropout", "channel": "vib_y"}):
        assert handle_fault_request(sim, request)["ok"] is True
    reply = handle_fault_request(sim, {"action": "clear", "fault": "stuck"})
    assert reply["cleared"] is True and reply["active"] == [{"fault": "dropout", "severity": 1.0,
                                                             "channel": "vib_y", "mode": "nan"}]
    reply = handle_fault_request(sim, {"action": "clear", "fault": "dropout", "channel": "vib_x"})
    assert reply["cleared"] is False and len(reply["active"]) == 1  # another channel's stays


# --- pacing --------------------------------------------------------------------------------------


async def test_an_ingest_that_cannot_keep_up_says_so_without_flooding_the_log() -> None:
    """4 channels at 100 kHz in batches of 10 is more than a 2-core device publishes: the simulator skipped
    a backlog ~250 times a second and logged a line each time (1971 lines in 8 s on a walk). Now the 1st,
    10th, 100th, ... time, with the totals."""
    cfg = load_config({"asset": "fast", "rateHz": 100_000, "batchSize": 10, "maxBurst": 0})
    now = [0.0]
    service = IngestService(None, cfg, Clocks(monotonic=lambda: now[0], wall=lambda: 1000.0))  # type: ignore[arg-type]
    with capture_logs() as logs:
        batches = service._sim_batches(Pacer(cfg.max_burst))
        for _ in range(150):
            now[0] += 0.01  # 100 batch periods pass between two batches
            await anext(batches)
        await batches.aclose()
    behind = [e for e in logs if e["event"] == "ingest.behind_skipped"]
    assert service.behind_events >= 140 and [e["count"] for e in behind] == [1, 10, 100]
    assert behind[-1]["total_batches"] > 90 * 100 and behind[-1]["log_level"] == "warning"


# --- CSV replay -----------------------------------------------------------------------------------


def test_non_finite_csv_cells_are_nan_counted_and_reported_with_file_and_line(tmp_path: Path) -> None:
    """``inf``, ``1e400`` and ``NaN`` cells were published as inf/NaN and not counted; and the counts were
    only logged when a replay ended, which a looping replay (the default) never does."""
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\ninf,1e400\nNaN,-inf\n3,4,5\n6\n")
    reports: list[tuple[str, str, int, str | None]] = []
    replay = CsvReplay(path, batch_size=5, rate_hz=10, loop=True, on_problem=lambda *r: reports.append(r))
    first = next(replay.batches())
    assert np.isnan(first.data).tolist() == [[False, True, True, False, False], [False, True, True, False, True]]
    assert first.data[:, [0, 3]].tolist() == [[1, 3], [2, 4]]
    assert (replay.stats.bad_values, replay.stats.long_rows, replay.stats.short_rows) == (5, 1, 1)
    where = {r[0]: r[3] for r in reports}
    assert where == {"bad_values": f"{path}:3", "long_rows": f"{path}:5", "short_rows": f"{path}:6"}
    assert "'a' is 'inf', not a finite number" in reports[0][1]


async def test_a_looping_replay_logs_its_bad_cells(short_tmp: Path) -> None:
    path = short_tmp / "bad.csv"
    path.write_text("a,b\n" + "1,2\n" * 8 + "x,inf\n")
    cfg = load_config({"asset": "lp", "source": "csv", "rateHz": 1000, "batchSize": 3,
                       "csv": {"path": str(path), "speed": 0, "loop": True}})
    with capture_logs() as logs:
        async with bus(short_tmp) as sock, client(sock, "ingest") as ic:
            service = IngestService(ic, cfg)
            pub = asyncio.create_task(service.publish_forever())
            async with asyncio.timeout(10):
                while sum(e["event"] == "ingest.replay_bad_input" for e in logs) < 2:  # the 1st and the 10th
                    await asyncio.sleep(0.01)
            pub.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pub
    bad = [e for e in logs if e["event"] == "ingest.replay_bad_input"]
    assert [(e["reason"], e["count"], e["at"]) for e in bad[:2]] == [("bad_values", 1, f"{path}:10"),
                                                                     ("bad_values", 10, f"{path}:10")]
    assert bad[0]["asset"] == "lp" and "'a' is 'x'" in bad[0]["detail"]


def test_a_column_named_twice_or_channels_named_alike_are_refused(tmp_path: Path) -> None:
    """A header ``a,a`` used to replay the first column as both channels and drop the second unseen."""
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a,b\n1,2,3\n")
    for csv, why in [({"path": str(dup)}, "columns ['a'] appear more than once"),
                     ({"path": str(dup), "columns": ["a", "b"]}, "columns ['a'] appear more than once"),
                     ({"path": str(dup), "columns": ["b"], "channelNames": ["x"]}, None),
                     ({"path": str(dup), "columns": ["b", "b"]}, "channel names ['b', 'b'] are not distinct")]:
        if why is None:
            assert load_config({"source": "csv", "csv": csv}).csv is not None  # the other column is fine
            continue
        with pytest.raises(ConfigError, match="csv: ") as info:
            load_config({"source": "csv", "csv": csv})
        assert why in str(info.value) and "dup.csv" in str(info.value)
    with pytest.raises(ConfigError, match=r"csv: .*: not a file \(a directory\)"):
        load_config({"source": "csv", "csv": {"path": str(tmp_path)}})


async def test_a_csv_with_nothing_to_replay_is_refused_or_an_error(short_tmp: Path) -> None:
    """A header and no rows deployed SUCCEEDED and the ingest published nothing, saying only
    ``replay_finished rows=0`` at info level; a file none of whose timestamps parse did the same."""
    header_only = short_tmp / "header.csv"
    header_only.write_text("timestamp,a\n\n")
    with pytest.raises(ConfigError, match=r"header\.csv: no data rows after the header"):
        load_config({"source": "csv", "csv": {"path": str(header_only)}})
    no_time = short_tmp / "notime.csv"
    no_time.write_text("timestamp,a\nsoon,1\nlater,2\n")
    cfg = load_config({"asset": "nt", "source": "csv", "csv": {"path": str(no_time), "speed": 0}})
    with capture_logs() as logs:
        async with bus(short_tmp) as sock, client(sock, "ingest") as ic:
            await asyncio.wait_for(IngestService(ic, cfg).publish_forever(), 10)
    failed = [e for e in logs if e["event"] == "ingest.replay_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error" and failed[0]["bad_timestamps"] == 2
    assert "no row of the file could be replayed" in failed[0]["error"]
    assert not any(e["event"] == "ingest.replay_finished" for e in logs)


def test_csv_timestamps_in_milliseconds_are_not_taken_for_seconds(tmp_path: Path) -> None:
    """A 1 kHz recording stamped in epoch milliseconds (a common DAQ export) replayed with rate_hz 1.0 and
    1000 times too slowly, with no word. The unit is now told by the size of the first epoch number, or
    configured (``csv.timestampUnit``) for times counted from 0."""
    epoch_ms = tmp_path / "ms.csv"
    epoch_ms.write_text("timestamp,a\n" + "".join(f"{1_700_000_000_000 + i},{i}\n" for i in range(50)))
    replay = CsvReplay(epoch_ms, batch_size=50)
    (batch,) = list(replay.batches())
    assert replay.timestamp_unit == "ms" and batch.t0 == pytest.approx(1_700_000_000.0)
    assert batch.rate_hz == pytest.approx(1000, rel=1e-5) and batch.n_samples == 50
    epoch_us = tmp_path / "us.csv"
    epoch_us.write_text("time,a\n" + "".join(f"{1_700_000_000_000_000 + 500 * i},{i}\n" for i in range(10)))
    assert next(CsvReplay(epoch_us, batch_size=10).batches()).rate_hz == pytest.approx(2000, rel=1e-4)
    relative_ms = tmp_path / "rel.csv"
    relative_ms.write_text("ts,a\n" + "".join(f"{i * 4},{i}\n" for i in range(10)))  # 250 Hz, ms from 0
    cfg = load_config({"source": "csv", "csv": {"path": str(relative_ms), "timestampUnit": "ms"}})
    assert cfg.csv is not None and cfg.csv.timestamp_unit == "ms"
    replay = CsvReplay(relative_ms, batch_size=10, timestamp_unit="ms")
    assert next(replay.batches()).rate_hz == pytest.approx(250)
    with pytest.raises(ConfigError, match=r"csv\.timestampUnit"):
        load_config({"source": "csv", "csv": {"path": str(relative_ms), "timestampUnit": "minutes"}})


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_channel(tmp_path: Path) -> None:
    """A CSV saved by a spreadsheet as UTF-8 starts with a byte-order mark: the first channel was published
    as '\\ufeffvib_x', a name no model has, so the detector dropped every batch (missing_channel)."""
    import gzip

    plain, packed = tmp_path / "bom.csv", tmp_path / "bom.csv.gz"
    text = "vib_x,temp\n1,40\n2,41\n"
    plain.write_bytes(b"\xef\xbb\xbf" + text.encode())
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + text.encode()))
    for path in (plain, packed):
        replay = CsvReplay(path, batch_size=2, rate_hz=10)
        assert replay.channels == ("vib_x", "temp")
        assert next(replay.batches()).data.tolist() == [[1, 2], [40, 41]]
    cfg = load_config({"source": "csv", "csv": {"path": str(plain), "columns": ["vib_x"]}})
    assert cfg.csv is not None and cfg.csv.columns == ("vib_x",)



def test_a_csv_that_is_not_comma_separated_is_refused(tmp_path: Path) -> None:
    """A semicolon-separated export (a European spreadsheet's) was one column named 'vib_x;temp' whose
    every value was NaN: deployed SUCCEEDED, then NaN for ever."""
    for sep in (";", "\t"):
        path = tmp_path / "semi.csv"
        path.write_text(f"vib_x{sep}temp\n1{sep}40\n")
        with pytest.raises(ConfigError, match="the file is not comma-separated"):
            load_config({"source": "csv", "csv": {"path": str(path)}})


# --- MQTT -----------------------------------------------------------------------------------------


def test_mqtt_non_finite_values_are_nan_and_counted() -> None:
    """JSON ``NaN``, ``Infinity`` and ``1e400`` (inf) went on to the bus as they were, uncounted."""
    a = SampleAssembler(("x", "y"), rate_hz=100.0, batch_size=100)
    a.feed(b'{"ts": 1.0, "x": NaN, "y": Infinity}', 0.0)
    a.feed(b'{"ts": 1.01, "x": 1e400, "y": 2}', 0.0)
    a.feed(b'{"t0": 1.02, "channels": ["x", "y"], "data": [[3, -Infinity], [NaN, 4]]}', 0.0)
    b = a.flush()
    assert b is not None and np.isfinite(b.data).tolist() == [[False, False, True, False], [False, True, False, True]]
    assert not np.isinf(b.data).any() and a.stats.bad_values == 5


def test_mqtt_duplicated_late_and_single_lost_samples_are_never_restamped() -> None:
    """One period of slack put a duplicated sample (a QoS 1 redelivery) in the next slot and every later
    sample one period late, for ever; a single lost sample likewise shifted the rest one period early
    with no gap. A sample at or before one taken is now refused (``out_of_order``), one lost is a gap."""
    reports: list[tuple[str, str, int, str | None]] = []
    a = SampleAssembler(("x",), rate_hz=100.0, batch_size=100, on_problem=lambda *r: reports.append(r))
    out = []
    for ts, x in [(50.00, 0), (50.01, 1), (50.01, 1), (50.02, 2), (50.00, 0), (50.03, 3)]:  # duplicates, a late one
        out += a.feed(json.dumps({"ts": ts, "x": x}).encode(), 0.0)
    out += a.feed(json.dumps({"t0": 50.02, "channels": ["x"], "data": [[2, 3, 4, 5]]}).encode(), 0.0)  # 2 taken
    assert out == [] and (a.stats.out_of_order, a.stats.gaps) == (4, 0)
    for ts, x in [(50.07, 7), (50.08, 8)]:  # 50.06 was lost
        out += a.feed(json.dumps({"ts": ts, "x": x}).encode(), 0.0)
    second = a.flush()
    assert len(out) == 1 and second is not None
    assert (out[0].t0, out[0].data.tolist(), out[0].follows_gap) == (50.0, [[0, 1, 2, 3, 4, 5]], False)
    assert second.t0 == pytest.approx(50.07) and second.data.tolist() == [[7, 8]] and second.follows_gap is True
    assert (a.stats.out_of_order, a.stats.gaps) == (4, 1)
    assert reports[0][0] == "out_of_order" and "not published twice" in reports[0][1]
    # A clock set back by more than CLOCK_STEP_S is a new time line (a gap), not samples to refuse.
    assert a.feed(json.dumps({"ts": 30.0, "x": 9}).encode(), 0.0) == []
    back = a.flush()
    assert back is not None and back.t0 == 30.0 and back.follows_gap is True and a.stats.out_of_order == 4


def test_an_mqtt_topic_filter_the_broker_would_refuse_is_a_configuration_error() -> None:
    """``a/#/b`` used to be deployed (SUCCEEDED), then crash the ingest at every start with aiomqtt's
    bare 'Invalid topic.' until it was BROKEN."""
    for topic in ["a/#/b", "a/b+", "", "#/x"]:
        with pytest.raises(ConfigError, match=r"mqtt\.topic") as info:
            load_config({"source": "mqtt", "mqtt": {"topic": topic}})
        assert info.value.component == INGEST
    assert load_config({"mqtt": {"topic": "a/+/b/#"}}).mqtt.topic == "a/+/b/#"
    with pytest.raises(ConfigError, match=r"mqtt\.channels"):
        load_config({"mqtt": {"channels": ["x", "x"]}})


async def test_the_batch_after_a_broker_outage_says_it_follows_a_gap(short_tmp: Path) -> None:
    """Devices that send no time of their own: the samples published while the broker was down are lost,
    and the first batch after the reconnection used to look continuous with the one before."""
    import aiomqtt

    port = free_port()
    cfg = load_config({"asset": "ro", "source": "mqtt", "rateHz": 100, "batchSize": 3,
                       "mqtt": {"port": port, "topic": "plant/ro/vib", "channels": ["x"], "flushAfterS": 30,
                                "reconnectInitialS": 0.1, "reconnectMaxS": 0.2}})

    async def send(n: int, until: int) -> list[dict[str, Any]]:
        """Samples (no ts) until ``until`` batches came: the source subscribes asynchronously."""
        got: list[dict[str, Any]] = []
        async with aiomqtt.Client("127.0.0.1", port) as device, asyncio.timeout(10):
            while len(got) < until:
                for _ in range(n):
                    await device.publish("plant/ro/vib", b'{"x": 1}')
                with_timeout = asyncio.ensure_future(anext(batches))
                done, _ = await asyncio.wait({with_timeout}, timeout=0.3)
                if done:
                    got.append(with_timeout.result().payload)
                else:
                    with_timeout.cancel()
        return got

    with capture_logs() as logs:
        async with bus(short_tmp) as sock, client(sock, "ingest") as ic, client(sock) as tc, \
                tc.subscribe("sensors/ro/raw", queue_size=100) as batches:
            pub = asyncio.create_task(IngestService(ic, cfg).publish_forever())
            with mosquitto(short_tmp, port):
                before = await send(3, 1)
            async with asyncio.timeout(10):
                while not any(e["event"] == "ingest.mqtt_disconnected" for e in logs):
                    await asyncio.sleep(0.05)
            while True:  # the partial batch the outage flushed, if probes left samples over: before it too
                try:
                    before.append((await asyncio.wait_for(anext(batches), 1.0)).payload)
                except TimeoutError:
                    break
            with mosquitto(short_tmp, port):
                async with asyncio.timeout(10):
                    while sum(e["event"] == "ingest.mqtt_connected" for e in logs) < 2:
                        await asyncio.sleep(0.05)
                after = await send(3, 1)
            pub.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pub
    assert after[0]["seq"] > before[-1]["seq"] and after[0]["stream"] == before[-1]["stream"]
    assert after[0].get("follows_gap") is True


# --- the component under a real daemon ------------------------------------------------------------


@pytest.mark.slow
def test_a_configuration_change_marks_the_restart_and_keeps_the_injected_faults(daemon: Any,
                                                                                short_tmp: Path) -> None:
    """A rate change at run time restarts the simulator (phase from 0), and a replay's speed change
    starts the file again (t0 went back 100 s on a walk): seq and stream carry on, so the first batch
    after it must say ``follows_gap``; it did not. The faults injected before the change were silently
    gone after it. A change to a section the source does not read (mqtt under the simulator) restarted
    the source as well (an MQTT source reconnected for a new simulator seed); it now restarts nothing. A
    topic filter the broker refuses is refused by the deployment, naming the field."""
    daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", f"{INGEST}=1.0.0",
               "--update-config", json.dumps({INGEST: {"MERGE": {"asset": "wk-1", "batchSize": 50}}}))
    policy = short_tmp / "viewer.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"v": {
        "operations": ["aws.greengrass#SubscribeToTopic", "aws.greengrass#PublishToTopic"],
        "resources": ["sensors/wk-1/raw", "control/wk-1/fault"]}}}))
    token = daemon.cli("client", "add", "test.viewer", "--policy", str(policy)).stdout.strip().splitlines()[-1]
    rate = {INGEST: {"MERGE": {"rateHz": 2000, "batchSize": 100}}}
    unrelated = {INGEST: {"MERGE": {"mqtt": {"topic": "plant/wk-1/vib"}}}}  # a section the simulator ignores
    bad_topic = {INGEST: {"MERGE": {"source": "mqtt", "mqtt": {"topic": "plant/#/vib"}}}}

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], Any]:
        from ipc import Client

        got: list[dict[str, Any]] = []
        async with Client(daemon.root / "ipc.sock", token, name="test.viewer") as c, \
                c.subscribe("sensors/wk-1/raw", queue_size=10_000) as batches:

            async def take_until(done: Any) -> None:
                async with asyncio.timeout(30):
                    while True:
                        got.append((await anext(batches)).payload)
                        if done(got[-1]):
                            return

            await take_until(lambda p: True)
            injected = await c.request("control/wk-1/fault", {"fault": "stuck", "channel": "temp"})
            await c.request("control/wk-1/fault", {"fault": "imbalance", "severity": 0.4})
            await take_until(lambda p: np.unique(p["data"][3]).size == 1)
            await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(unrelated))
            await take_until(lambda p: True)
            await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(rate))
            await take_until(lambda p: p["rate_hz"] == 2000)
            await take_until(lambda p: True)
            refused = await asyncio.to_thread(daemon.cli, "deploy", "--update-config", json.dumps(bad_topic),
                                              check=False)
            active = await c.request("control/wk-1/fault", {"action": "clear", "fault": "imbalance"})
        return got, injected, active, refused

    got, injected, active, refused = asyncio.run(scenario())
    assert injected["ok"] is True
    seqs = [p["seq"] for p in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len({p["stream"] for p in got}) == 1
    first_new = next(i for i, p in enumerate(got) if p["rate_hz"] == 2000)
    assert got[first_new].get("follows_gap") is True  # the restart is marked ...
    assert not any(p.get("follows_gap") for p in got[:first_new] + got[first_new + 1:])  # ... and only it
    # The faults carry on: imbalance still active (cleared now), temp stuck at the value it had before.
    assert active["ok"] is True and active["cleared"] is True
    assert active["active"] == [{"fault": "stuck", "severity": 1.0, "channel": "temp"}]
    stuck_before = got[first_new - 1]["data"][3][-1]
    assert all(np.all(p["data"][3] == stuck_before) for p in got[first_new:])
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr, refused.stderr
    assert "mqtt.topic" in refused.stderr and "'#' must be a whole level and the last one" in refused.stderr
    log = daemon.cli("logs", INGEST).stdout
    assert "ingest.faults_kept" in log and math.isfinite(float(stuck_before))
    # The unrelated change restarted nothing (it used to restart the source, and mark a gap, as any did).
    assert log.count("ingest.started") == 2 and log.count("ingest.config_changed_source_kept") == 1, log



@pytest.mark.slow
def test_a_configuration_change_publishes_the_mqtt_samples_it_holds(daemon: Any, short_tmp: Path) -> None:
    """The MQTT source re-batches: up to a batch less one sample waits for the rest. A configuration change
    cancelled the source with them, and so did ``nucleus stop``: what the device had sent was lost
    although the ingest had it."""
    import aiomqtt

    with mosquitto(short_tmp) as port:
        mqtt = {"port": port, "topic": "plant/wk-2/vib", "channels": ["x"], "flushAfterS": 30}
        daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", f"{INGEST}=1.0.0",
                   "--update-config", json.dumps({INGEST: {"MERGE": {
                       "asset": "wk-2", "source": "mqtt", "rateHz": 100, "batchSize": 50, "mqtt": mqtt}}}))
        for _ in range(300):  # bounded: the source connects within a second or two
            if "ingest.mqtt_connected" in daemon.cli("logs", INGEST).stdout:  # logged once subscribed
                break
            time.sleep(0.1)
        else:
            raise AssertionError(daemon.cli("logs", INGEST).stdout)
        policy = short_tmp / "viewer.json"
        policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"v": {
            "operations": ["aws.greengrass#SubscribeToTopic"], "resources": ["sensors/wk-2/raw"]}}}))
        token = daemon.cli("client", "add", "test.viewer", "--policy", str(policy)).stdout.strip().splitlines()[-1]

        async def scenario() -> list[dict[str, Any]]:
            from ipc import Client

            async with Client(daemon.root / "ipc.sock", token, name="test.viewer") as c, \
                    c.subscribe("sensors/wk-2/raw", queue_size=100) as batches, \
                    aiomqtt.Client("127.0.0.1", port) as device:
                for i in range(5):
                    await device.publish("plant/wk-2/vib", json.dumps({"ts": 100 + i / 100, "x": i}), qos=1)
                await asyncio.sleep(0.5)  # delivered to the ingest (QoS 1 to the broker, then on)
                await asyncio.to_thread(daemon.cli, "deploy", "--update-config",
                                        json.dumps({INGEST: {"MERGE": {"batchSize": 5}}}))
                async with asyncio.timeout(20):
                    got = [(await anext(batches)).payload]
                for i in range(5, 8):  # three of a batch of five, then the ingest is stopped
                    await device.publish("plant/wk-2/vib", json.dumps({"ts": 100 + i / 100, "x": i}), qos=1)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(daemon.cli, "stop", INGEST)
                async with asyncio.timeout(20):
                    got.append((await anext(batches)).payload)
                return got

        got = asyncio.run(scenario())
    assert got[0]["t0"] == 100.0 and got[0]["data"].tolist() == [[0, 1, 2, 3, 4]], got
    assert got[1]["t0"] == pytest.approx(100.05) and got[1]["data"].tolist() == [[5, 6, 7]], got
