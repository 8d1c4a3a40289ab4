"""A safety engineer's walk through the protective action, as real processes on a real bus: resets and
audit failures (a real RLIMIT_FSIZE on the component, a file in the audit log's way, a malformed log),
failed relay scripts (cooldown, retries), configuration changes (an asset out and back, duplicated
actions, a fail-safe check slower than its timeout) and malformed events."""

from __future__ import annotations

import asyncio
import json
import resource
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from ingest_action_kit import action_component, bus_server, client
from structlog.testing import capture_logs
from test_protective_action import FAST, cfg_with, next_action, running

from components.configuration import ConfigError
from components.protective_action.actuators import CommandActuator
from components.protective_action.audit import AuditLog
from components.protective_action.config import load_config
from components.protective_action.policy import Decision, State
from components.protective_action.service import make_actuator


def event(score: float, asset: str = "t1") -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "asset": asset, "ts": time.time(), "score": score, "threshold": 1.0,
            "published_at": time.time()}


async def test_a_reset_the_audit_log_cannot_take_does_not_release_the_latch(short_tmp: Path) -> None:
    """The audit log's file may not grow (RLIMIT_FSIZE of the component's process, as on a full disk):
    the reset was answered "not recorded" while the latch was released all the same, and the next reset
    said "already normal". The latch must hold until a reset is recorded; the error names the asset."""
    async with bus_server(short_tmp) as server, client(server.socket_path) as tc, \
            action_component(server, FAST, short_tmp) as proc, tc.subscribe("actions/t1") as actions:
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        for _ in range(3):  # the condition is gone: a reset would be accepted
            await tc.publish("anomaly/t1", event(0.1))
        wal = short_tmp / "audit.db-wal"
        size = wal.stat().st_size
        await asyncio.sleep(0.3)  # the clear windows judged (changing nothing, they write nothing)
        assert wal.stat().st_size == size
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        try:
            for _ in range(2):
                refused = await tc.request("control/t1/reset", {"operator": "alice"}, timeout=10)
                assert refused["ok"] is False and refused["state"] == "latched", refused
                assert "could not be recorded in the audit log" in refused["reason"]
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        ok = await tc.request("control/t1/reset", {"operator": "alice"}, timeout=10)
        assert ok["ok"] is True and ok["state"] == "normal", ok
        assert (await next_action(actions))["state"] == "normal"
    with sqlite3.connect(short_tmp / "audit.db") as conn:
        states = [r[0] for r in conn.execute("SELECT state FROM decisions ORDER BY rowid")]
    assert states == ["latched", "normal"]
    failed = [line for line in (short_tmp / "action.log").read_text().splitlines() if "action.audit_failed" in line]
    assert len(failed) == 2 and all("asset=t1" in line and "state=normal" in line for line in failed), failed


async def test_a_failed_action_does_not_start_its_cooldown(short_tmp: Path) -> None:
    """engage_brake's relay script failed on a trip; released and tripped again within cooldownS, the
    brake was listed as suppressed and never run: the machine was never braked. A failed action must be
    tried again by the next decision that wants it."""
    script = short_tmp / "relay.sh"
    script.write_text("#!/bin/sh\nif [ -e \"$0.ok\" ]; then echo braked; else echo relay not answering; exit 2; fi\n")
    script.chmod(0o755)
    cfg = cfg_with(k=1, n=1, releaseCount=1, latch=False, cooldownS=30, tripActions=["engage_brake"])
    actuator = CommandActuator({"engage_brake": (str(script),)}, timeout_s=10)
    async with running(short_tmp, cfg, actuator) as (_service, tc), tc.subscribe("actions/t1") as actions:
        await tc.publish("anomaly/t1", event(2.0))
        first = await next_action(actions)
        assert first["state"] == "tripped" and [o["ok"] for o in first["outcomes"]] == [False]
        await tc.publish("anomaly/t1", event(0.0))
        assert (await next_action(actions))["state"] == "normal"
        Path(f"{script}.ok").touch()  # the relay answers again
        await tc.publish("anomaly/t1", event(2.0))
        again = await next_action(actions)
        assert again["state"] == "tripped"
        assert again["actions"] == ["engage_brake"] and again["suppressed"] == [], again
        assert again["outcomes"] == [{"action": "engage_brake", "ok": True, "detail": "braked"}]
        await tc.publish("anomaly/t1", event(0.0))
        assert (await next_action(actions))["state"] == "normal"
        await tc.publish("anomaly/t1", event(2.0))  # this one did brake: now the cooldown holds
        third = await next_action(actions)
        assert third["actions"] == [] and third["suppressed"] == ["engage_brake"]


async def test_an_asset_taken_out_of_the_configuration_and_back_keeps_its_latch(short_tmp: Path) -> None:
    """A configuration without t1 and then one with it again brought t1 back as normal, its latch
    released with no reset, while a restart restores it from the audit log."""
    async with running(short_tmp, cfg_with()) as (service, tc), tc.subscribe("actions/t1") as actions:
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        other = json.loads(json.dumps(FAST))
        other["assets"] = ["t2"]
        service.reconfigure(load_config(other))
        service.reconfigure(cfg_with())
        assert service.policies["t1"].state is State.LATCHED
        refused = await tc.request("control/t1/reset", {"operator": "alice"}, timeout=10)
        assert refused["ok"] is False and refused["state"] == "latched"


async def test_a_reset_is_recorded_under_the_authenticated_client_too(short_tmp: Path) -> None:
    """The audit log kept only the operator name the request carried ({"operator": "alice"}), which any
    client allowed to reset can write; the bus authenticates the client, and the log must name it."""
    async with running(short_tmp, cfg_with(k=1, n=1)) as (_service, tc), tc.subscribe("actions/t1") as actions:
        await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        await tc.publish("anomaly/t1", event(0.0))
        async with asyncio.timeout(10):
            while (reply := await tc.request("control/t1/reset", {"operator": "alice"}))["ok"] is not True:
                await asyncio.sleep(0.02)
        assert reply["reason"] == "operator reset by alice (client test)"
        ack = await next_action(actions)
        assert ack["reason"] == "operator reset by alice (client test)"
        await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        await tc.publish("anomaly/t1", event(0.0))
        async with asyncio.timeout(10):  # no operator given: the client's name alone
            while (reply := await tc.request("control/t1/reset", {}))["ok"] is not True:
                await asyncio.sleep(0.02)
        assert reply["reason"] == "operator reset by test"


@pytest.mark.parametrize("key", ["tripActions", "safeStateActions"])
def test_an_action_listed_twice_is_refused_naming_the_field(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"policy\.{key}: \['engage_brake'\] listed more than once"):
        load_config({"policy": {key: ["engage_brake", "pitch_to_feather", "engage_brake"]}})


async def unaudited_safe_state(output: Path, *, assets: int) -> None:
    """Until the component's output shows the audit log unavailable and the brake engaged for ``assets``
    assets (exactly that many times). Bounded: the safe state is taken within a second of the start."""
    text = ""
    for _ in range(400):
        text = output.read_text(errors="replace") if output.exists() else ""
        if "action.audit_unavailable" in text and text.count("ACTUATOR engage_brake") == assets:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no unaudited safe state for {assets} asset(s):\n{text[-3000:]}")


async def test_an_audit_log_that_cannot_be_opened_sends_every_asset_to_its_safe_state(short_tmp: Path) -> None:
    """auditPath under a regular file (as on a read-only or broken disk, the log cannot be opened): the
    component exited at start with a traceback, was restarted until BROKEN, and no asset was moved to
    its safe state. It must act first (the safe state, logged as unaudited), retry the log, and once it
    opens record and acknowledge that safe state and protect as usual."""
    blocker = short_tmp / "blocker"
    blocker.write_text("not a directory")
    config = json.loads(json.dumps(FAST))
    config.update(assets=["t1", "t2"], auditPath="blocker/audit.db")
    output = short_tmp / "action.log"

    async def unblock_once_safe() -> None:
        await unaudited_safe_state(output, assets=2)
        blocker.unlink()

    async with bus_server(short_tmp) as server, client(server.socket_path) as tc, \
            tc.subscribe("actions/+") as actions:
        unblock = asyncio.create_task(unblock_once_safe())
        async with action_component(server, config, short_tmp):
            await unblock
            acks = [await next_action(actions, timeout=20) for _ in range(2)]
            assert {a["asset"] for a in acks} == {"t1", "t2"}
            assert all(a["state"] == "safe_state" and "audit log unavailable" in a["reason"] for a in acks), acks
            assert all(a["actions"] == ["pitch_to_feather", "engage_brake"] for a in acks)
            refused = await tc.request("control/t1/reset", {"operator": "alice"}, timeout=10)
            assert refused["ok"] is False and refused["state"] == "safe_state"  # restored from the log
    with sqlite3.connect(short_tmp / "blocker" / "audit.db") as conn:
        rows = {r[0]: r[1] for r in conn.execute("SELECT decision_id, state FROM decisions")}
        outcomes = conn.execute("SELECT count(*) FROM outcomes WHERE ok = 1").fetchone()[0]
    assert rows == {a["decision_id"]: "safe_state" for a in acks} and outcomes == 4
    text = output.read_text(errors="replace")
    assert "blocker/audit.db" in text and "Traceback" not in text


async def test_a_safe_state_the_audit_log_could_not_take_is_recorded_when_it_can(short_tmp: Path) -> None:
    """The detector stops while the audit log cannot grow (a full disk): the safe state is acted on and
    not acknowledged, as documented, but it was then lost for good: once the disk had room again the log
    still ended on the earlier latch, which is what a restart restores. It must be recorded (and
    acknowledged, marked late) as soon as the log takes it."""
    config = json.loads(json.dumps(FAST))
    config["policy"].update(heartbeatTimeoutS=0.6)
    async with bus_server(short_tmp) as server, client(server.socket_path) as tc, \
            tc.subscribe("actions/t1") as actions:
        stop = asyncio.Event()

        async def heartbeats() -> None:
            while not stop.is_set():
                await tc.publish("heartbeat/anomaly_detector", {})
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(heartbeats())
        try:
            async with action_component(server, config, short_tmp) as proc:
                for _ in range(2):
                    await tc.publish("anomaly/t1", event(2.0))
                assert (await next_action(actions))["state"] == "latched"
                await asyncio.sleep(0.5)  # heartbeats seen (before, the startup grace covers their absence)
                wal = short_tmp / "audit.db-wal"
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, resource.RLIM_INFINITY))
                try:
                    stop.set()
                    await beating
                    log = short_tmp / "action.log"
                    for _ in range(200):  # bounded: the heartbeat timeout is 0.6 s
                        text = log.read_text()
                        if "action.audit_failed" in text and text.count("ACTUATOR engage_brake") == 2:
                            break
                        await asyncio.sleep(0.05)
                    text = log.read_text()
                    assert "action.audit_failed" in text and "state=safe_state" in text, text[-2000:]
                    assert text.count("ACTUATOR engage_brake") == 2  # acted on, unaudited
                    with pytest.raises(TimeoutError):  # and not acknowledged
                        await next_action(actions, timeout=0.5)
                finally:
                    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                late = await next_action(actions, timeout=10)
                assert late["state"] == "safe_state" and late["previous"] == "latched"
                assert late["timing"]["recorded_late"] == 1.0 and "heartbeat" in late["reason"]
                assert [o["ok"] for o in late["outcomes"]] == [True, True]
        finally:
            stop.set()
            await beating
    with sqlite3.connect(short_tmp / "audit.db") as conn:
        rows = conn.execute("SELECT decision_id, state FROM decisions ORDER BY rowid").fetchall()
        outcomes = conn.execute("SELECT count(*) FROM outcomes WHERE decision_id = ?", (late["decision_id"],))
        assert outcomes.fetchone()[0] == 2
    assert [r[1] for r in rows] == ["latched", "safe_state"] and rows[-1][0] == late["decision_id"]


async def test_a_failed_action_is_retried_while_the_state_still_wants_it(short_tmp: Path) -> None:
    """engage_brake's relay did not answer on the trip: the latch held, the failure was recorded, and
    nothing ever ran the brake again, with the machine running while the log said latched. It must
    be run again every actuator.retryS seconds, each attempt audited and acknowledged, until it
    succeeds; an action that succeeded is not repeated."""
    brake = short_tmp / "brake.sh"  # fails twice, then answers
    brake.write_text('#!/bin/sh\nn=$(cat "$0.n" 2>/dev/null || echo 0); echo $((n + 1)) > "$0.n"\n'
                     'if [ "$n" -lt 2 ]; then echo "relay not answering ($n)"; exit 2; fi\necho braked\n')
    feather = short_tmp / "feather.sh"
    feather.write_text('#!/bin/sh\necho feathered >> "$0.calls"\necho feathered\n')
    for script in (brake, feather):
        script.chmod(0o755)
    raw = json.loads(json.dumps(FAST))
    raw["actuator"] = {"kind": "command", "retryS": 0.2, "commands": {
        "engage_brake": str(brake), "pitch_to_feather": str(feather)}}
    cfg = load_config(raw)
    actuator = CommandActuator({"engage_brake": (str(brake),), "pitch_to_feather": (str(feather),)}, timeout_s=10)
    async with running(short_tmp, cfg, actuator) as (_service, tc), tc.subscribe("actions/t1") as actions:
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        trip = await next_action(actions)
        assert trip["state"] == "latched"
        assert {o["action"]: o["ok"] for o in trip["outcomes"]} == {"engage_brake": False, "pitch_to_feather": True}
        retries = [await next_action(actions) for _ in range(2)]
        for r in retries:
            assert r["state"] == r["previous"] == "latched" and r["actions"] == ["engage_brake"], r
            assert r["reason"].startswith("retry of engage_brake: failed in decision ")
        assert [o["ok"] for r in retries for o in r["outcomes"]] == [False, True]
        with pytest.raises(TimeoutError):  # it succeeded: no more attempts
            await next_action(actions, timeout=0.8)
    assert (short_tmp / "feather.sh.calls").read_text().count("feathered") == 1
    with sqlite3.connect(short_tmp / "audit.db") as conn:
        rows = conn.execute("SELECT d.state, o.action, o.ok FROM decisions d JOIN outcomes o USING (decision_id) "
                            "ORDER BY d.rowid, o.action").fetchall()
    assert rows == [("latched", "engage_brake", 0), ("latched", "pitch_to_feather", 1),
                    ("latched", "engage_brake", 0), ("latched", "engage_brake", 1)]


def test_retries_can_be_turned_off() -> None:
    assert load_config({}).actuator.retry_s == 5.0
    assert load_config({"actuator": {"retryS": 0}}).actuator.retry_s == 0
    with pytest.raises(ConfigError, match=r"actuator\.retryS"):
        load_config({"actuator": {"retryS": -1}})


async def test_an_event_id_refused_says_why_and_a_nan_published_at_leaves_no_nan_in_the_ack(short_tmp: Path) -> None:
    """A 200-character event_id was logged as bad_event no_event_id with an empty detail (it was there,
    only too long); a NaN published_at went into the ack as event_to_actuator_ms NaN, which strict JSON
    (the cloud bridge's) cannot carry."""
    async with running(short_tmp, cfg_with()) as (_service, tc), tc.subscribe("actions/t1") as actions:
        with capture_logs() as logs:
            await tc.publish("anomaly/t1", {**event(2.0), "event_id": "x" * 200})
            for _ in range(2):
                await tc.publish("anomaly/t1", {**event(2.0), "published_at": float("nan")})
            ack = await next_action(actions)
        json.dumps(ack, allow_nan=False)
        assert ack["state"] == "latched" and "event_to_actuator_ms" not in ack["timing"]
        (bad,) = [e for e in logs if e["event"] == "action.bad_event"]
        assert bad["reason"] == "no_event_id" and bad["detail"] == "event_id is 200 characters long, more than 128"


def test_a_fail_safe_check_slower_than_its_timeout_is_refused() -> None:
    """checkIntervalS 2 with heartbeatTimeoutS 0.5 was accepted: a stopped detector was then noticed up to
    2.5 s after it stopped, five times the timeout the configuration shows."""
    with pytest.raises(ConfigError, match=r"checkIntervalS \(2\) exceeds policy\.heartbeatTimeoutS \(0\.5\)"):
        load_config({"checkIntervalS": 2, "policy": {"heartbeatTimeoutS": 0.5}})
    with pytest.raises(ConfigError, match=r"exceeds policy\.windowTimeoutS \(1\)"):
        load_config({"checkIntervalS": 1.5, "policy": {"windowTimeoutS": 1}})
    assert load_config({"checkIntervalS": 2}).check_interval_s == 2  # the default timeouts are 2 s and more


async def test_a_malformed_audit_log_is_reported_and_the_assets_go_to_their_safe_state(short_tmp: Path) -> None:
    """An audit log that opens but whose decisions table is malformed (a page overwritten) made the
    component fail at start reading the assets' last states, with a traceback, until BROKEN, and no
    asset reached its safe state. It is an unavailable log: safe state now, named in the log, and the
    component runs on the log an operator puts in its place."""
    db = short_tmp / "audit.db"
    log = AuditLog(db)  # a real log, index and all, with the decisions of an earlier run
    for i in range(50):
        log.record(Decision(f"d{i}", "t1", 0.0, State.LATCHED, State.NORMAL, (), (), "r" * 300))
    log.close()
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'decisions'").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    with db.open("r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xff" * page)
    output = short_tmp / "action.log"

    async def replace_once_safe() -> None:
        await unaudited_safe_state(output, assets=1)
        db.rename(short_tmp / "audit.db.malformed")  # what the operator does

    async with bus_server(short_tmp) as server, client(server.socket_path) as tc, \
            tc.subscribe("actions/t1") as actions:
        replace = asyncio.create_task(replace_once_safe())
        async with action_component(server, FAST, short_tmp):
            await replace
            ack = await next_action(actions, timeout=20)
            assert ack["state"] == "safe_state" and "malformed" in ack["reason"], ack
    text = output.read_text(errors="replace")
    assert f"path={db}" in text and "Traceback" not in text


async def test_a_reset_request_that_asks_for_something_else_is_refused_naming_the_key(short_tmp: Path) -> None:
    """{"action": "engage_brake"} (a reset of one action), {"asset": "t2"} on t1's topic, a misspelt
    {"operater": ...}, a bare string: each was read as a reset of the whole asset on the topic, and
    released t1's latch. Each is refused, naming what is wrong, and the latch holds."""
    async with running(short_tmp, cfg_with(k=1, n=1)) as (_service, tc), tc.subscribe("actions/t1") as actions:
        await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        await tc.publish("anomaly/t1", event(0.0))
        await asyncio.sleep(0.2)  # the clear window judged: a plain reset would be accepted now
        wrong: list[tuple[Any, str]] = [
            ({"operator": "alice", "action": "engage_brake"}, "unknown key(s) ['action'] in the reset request"),
            ({"operater": "alice"}, "unknown key(s) ['operater']"),
            ({"operator": "alice", "asset": "t2"}, "the request names asset 't2' on the reset topic of 't1'"),
            ({"operator": 5}, "operator must be a non-empty string, not 5"),
            ("alice", "a reset request is a map"),
        ]
        for request, reason in wrong:
            reply = await tc.request("control/t1/reset", request, timeout=10)
            assert reply["ok"] is False and reply["state"] == "latched" and reason in reply["reason"], (request, reply)
        ok = await tc.request("control/t1/reset", {"operator": "alice", "asset": "t1"}, timeout=10)
        assert ok["ok"] is True and ok["state"] == "normal"
    from components.protective_action.service import Undecodable, _reset_request_problem

    assert _reset_request_problem("t1", Undecodable("bad msgpack")) == \
        "the reset request could not be decoded (bad msgpack)"


async def test_no_keepalive_while_a_protective_action_has_failed(short_tmp: Path) -> None:
    """engage_brake's relay failed on a trip and the external dead-man timer kept being refreshed: the one
    backstop for a protection that did not happen was told all was well. The keepalive stops while a
    failed action has not succeeded (on a retry), and comes back when it has."""
    brake = short_tmp / "brake.sh"  # fails until brake.sh.ok exists
    brake.write_text('#!/bin/sh\n[ -e "$0.ok" ] || { echo relay not answering; exit 2; }\necho braked\n')
    keepalive = short_tmp / "keepalive.sh"
    keepalive.write_text('#!/bin/sh\necho "$NUCLEUS_ASSET" >> "$0.calls"\n')
    for script in (brake, keepalive):
        script.chmod(0o755)
    raw = json.loads(json.dumps(FAST))
    raw["actuator"] = {"kind": "command", "keepaliveS": 0.1, "retryS": 0.3, "commands": {
        "engage_brake": str(brake), "pitch_to_feather": "/bin/true", "keepalive": str(keepalive)}}
    cfg = load_config(raw)
    calls = short_tmp / "keepalive.sh.calls"

    def refreshed() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    async with running(short_tmp, cfg, make_actuator(cfg.actuator)) as (service, tc), \
            tc.subscribe("actions/t1") as actions:
        for _ in range(2):  # inputs alive for the keepalive: heartbeat and sensor batches
            await tc.publish("heartbeat/anomaly_detector", {})
            await tc.publish("sensors/t1/raw", {})
        async with asyncio.timeout(10):
            while refreshed() < 2:
                await asyncio.sleep(0.05)
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        trip = await next_action(actions)
        assert {o["action"]: o["ok"] for o in trip["outcomes"]}["engage_brake"] is False
        await asyncio.sleep(0.15)  # a keepalive already running when the trip failed may still end
        before = refreshed()
        for _ in range(6):  # 0.6 s, six keepalive periods: inputs alive, but no refresh
            await tc.publish("heartbeat/anomaly_detector", {})
            await tc.publish("sensors/t1/raw", {})
            await asyncio.sleep(0.1)
        assert refreshed() == before
        Path(f"{brake}.ok").touch()
        async with asyncio.timeout(10):
            while not (retry := await next_action(actions))["outcomes"][0]["ok"]:
                pass
        assert retry["actions"] == ["engage_brake"]
        async with asyncio.timeout(10):
            while refreshed() == before:
                await tc.publish("heartbeat/anomaly_detector", {})
                await tc.publish("sensors/t1/raw", {})
                await asyncio.sleep(0.1)
        assert service.policies["t1"].state is State.LATCHED


async def test_retries_of_a_hung_relay_do_not_queue_up(short_tmp: Path) -> None:
    """A relay that hangs past timeoutS, retried more often than that: attempts queued up behind the
    asset's lock, one per retryS, and kept running the brake one after another even after one had
    succeeded. One attempt at a time; none after the success."""
    brake = short_tmp / "brake.sh"  # hangs (killed at timeoutS) until brake.sh.ok exists
    brake.write_text('#!/bin/sh\necho run >> "$0.runs"\n[ -e "$0.ok" ] || sleep 30\necho braked\n')
    brake.chmod(0o755)
    raw = json.loads(json.dumps(FAST))
    raw["policy"]["tripActions"] = ["engage_brake"]
    raw["actuator"] = {"kind": "command", "timeoutS": 0.3, "retryS": 0.05, "commands": {
        "engage_brake": str(brake), "pitch_to_feather": "/bin/true"}}
    cfg = load_config(raw)
    async with running(short_tmp, cfg, make_actuator(cfg.actuator)) as (_service, tc), \
            tc.subscribe("actions/t1") as actions:
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        trip = await next_action(actions)
        assert "timed out" in trip["outcomes"][0]["detail"]
        for _ in range(2):  # two retries timed out too (each 0.3 s; the retry period is 0.05 s)
            assert "timed out" in (await next_action(actions))["outcomes"][0]["detail"]
        Path(f"{brake}.ok").touch()
        async with asyncio.timeout(10):
            while not (await next_action(actions))["outcomes"][0]["ok"]:
                pass
        with pytest.raises(TimeoutError):
            extra = await next_action(actions, timeout=1.0)
            raise AssertionError(f"a retry after the success: {extra}")


async def test_an_action_a_new_configuration_drops_is_no_longer_retried(short_tmp: Path) -> None:
    """disconnect_generator failed on a trip and was retried; a configuration that no longer lists it
    (the generator is gone) left it retried for ever, failing ('no command configured'), and the asset's
    dead-man keepalive held back for good."""
    raw = json.loads(json.dumps(FAST))
    raw["policy"]["tripActions"] = ["engage_brake", "disconnect_generator"]
    raw["actuator"] = {"kind": "command", "retryS": 0.1, "keepaliveS": 0.1, "commands": {
        "engage_brake": "/bin/true", "pitch_to_feather": "/bin/true", "disconnect_generator": "/bin/false",
        "keepalive": "/bin/true"}}
    cfg = load_config(raw)
    async with running(short_tmp, cfg, make_actuator(cfg.actuator)) as (service, tc), \
            tc.subscribe("actions/t1") as actions:
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        assert (await next_action(actions))["actions"] == ["disconnect_generator"]  # a retry
        raw["policy"]["tripActions"] = ["engage_brake"]
        del raw["actuator"]["commands"]["disconnect_generator"]
        service.reconfigure(load_config(raw))
        async with asyncio.timeout(10):  # a retry already under way may still be acknowledged
            while "t1" in service._failed:
                await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            while True:
                extra = await next_action(actions, timeout=0.5)
                assert extra["actions"] == ["disconnect_generator"]  # only one in flight at the change
        kept = service.stats.keepalives
        async with asyncio.timeout(10):  # and the keepalive is back
            while service.stats.keepalives == kept:
                await asyncio.sleep(0.05)


async def test_the_status_topic_carries_each_assets_state_and_the_counters(short_tmp: Path) -> None:
    """docs/components.md counts bad events "in stats.bad_events", and audit failures, failed actions and
    decisions waiting for the audit log were counted too, all only inside the process: nothing a
    monitor could read. heartbeat/protective_action carries them with each asset's state."""
    raw = json.loads(json.dumps(FAST))
    raw.update(assets=["t1", "t2"], statusIntervalS=0.1)
    raw["actuator"] = {"kind": "command", "retryS": 30, "commands": {
        "engage_brake": "/bin/false", "pitch_to_feather": "/bin/true"}}
    cfg = load_config(raw)
    async with running(short_tmp, cfg, make_actuator(cfg.actuator)) as (_service, tc), \
            tc.subscribe("actions/t1") as actions, tc.subscribe("heartbeat/protective_action") as statuses:
        await tc.publish("anomaly/t1", {**event(1.0), "score": float("nan")})
        await tc.publish("anomaly/t9", event(1.0, "t9"))
        for _ in range(2):
            await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        async with asyncio.timeout(10):
            while (status := (await anext(statuses)).payload)["assets"]["t1"]["state"] != "latched":
                pass
        assert status["assets"]["t1"]["failed_actions"] == ["engage_brake"]
        assert status["assets"]["t2"] == {"state": "normal", "stale": None, "failed_actions": [], "unrecorded": 0}
        assert status["bad_events"] == {"nan_score": 1} and status["unknown_assets"] == {"t9": 1}
        assert status["audit_failures"] == 0 and status["decisions"] == 1 and status["audit"].endswith("audit.db")
