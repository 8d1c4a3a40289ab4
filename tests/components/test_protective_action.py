"""The protective action on a real bus: ack after audit, bad input, resets, fail-safe, command
actuator, restored latch, the is_anomaly trigger as a real process; then the component under a real
daemon, killed with SIGKILL mid-burst."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sqlite3
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ingest_action_kit import REPO, action_component, bus, bus_server, client
from structlog.testing import capture_logs

from components.configuration import ConfigError
from components.protective_action.actuators import ActionRequest, CommandActuator, SimulatedActuator
from components.protective_action.audit import AuditLog
from components.protective_action.config import load_config
from components.protective_action.policy import State
from components.protective_action.service import ActionService, make_actuator
from ipc import Client


def event(score: float, asset: str = "t1", threshold: float = 1.0, is_anomaly: bool | None = None) -> dict[str, Any]:
    """An anomaly event; ``is_anomaly`` as the threshold mode computes it unless given (likelihood mode)."""
    return {"event_id": uuid.uuid4().hex, "asset": asset, "ts": time.time(), "score": score, "threshold": threshold,
            "is_anomaly": score >= threshold if is_anomaly is None else is_anomaly, "confidence": 0.9,
            "published_at": time.time()}


FAST = {"assets": ["t1"], "checkIntervalS": 0.02,
        "policy": {"k": 2, "n": 3, "releaseCount": 2, "latch": True, "cooldownS": 0, "heartbeatTimeoutS": 30,
                   "sensorTimeoutS": 30, "startupGraceS": 30}}


def cfg_with(**policy: Any) -> Any:
    raw = json.loads(json.dumps(FAST))
    raw["policy"].update(policy)
    return load_config(raw)


@contextlib.asynccontextmanager
async def running(tmp: Path, cfg: Any, actuator: Any = None) -> AsyncIterator[tuple[ActionService, Client]]:
    async with bus(tmp) as path, client(path, "action") as ac, client(path) as tc:
        audit = AuditLog(tmp / "audit.db")
        service = ActionService(ac, cfg, audit, actuator=actuator or SimulatedActuator())
        task = asyncio.create_task(service.serve())
        await asyncio.sleep(0.05)  # subscriptions in place
        try:
            yield service, tc
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            service.close()
            audit.close()


async def next_action(messages: Any, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        m = await anext(messages)
    return m.payload  # type: ignore[no-any-return]


async def test_trip_is_audited_before_it_is_acknowledged(short_tmp: Path) -> None:
    actuator = SimulatedActuator()
    async with running(short_tmp, cfg_with(), actuator) as (service, tc), \
            tc.subscribe("actions/t1") as actions:
        for s in (0.1, 1.5, 1.7):
            await tc.publish("anomaly/t1", event(s))
        ack = await next_action(actions)
        # The moment the ack is seen, the decision is already committed (another connection sees it).
        with sqlite3.connect(short_tmp / "audit.db") as conn:
            row = conn.execute("SELECT state, actions, event_ids FROM decisions WHERE decision_id = ?",
                               (ack["decision_id"],)).fetchone()
            outcomes = conn.execute("SELECT action, ok FROM outcomes WHERE decision_id = ?",
                                    (ack["decision_id"],)).fetchall()
        assert row is not None and row[0] == "latched"
        assert json.loads(row[1]) == ["engage_brake", "pitch_to_feather"]
        assert json.loads(row[2]) == ack["event_ids"] and len(ack["event_ids"]) == 2
        assert sorted(outcomes) == [("engage_brake", 1), ("pitch_to_feather", 1)]
        assert ack["state"] == "latched" and ack["action"] == "engage_brake" and ack["scores"] == [1.5, 1.7]
        assert [o["ok"] for o in ack["outcomes"]] == [True, True]
        assert ack["timing"]["receive_to_actuator_ms"] >= 0 and "event_to_actuator_ms" in ack["timing"]
        assert [r.action for r, _ in actuator.calls] == ["engage_brake", "pitch_to_feather"]
        assert len(service.stats.receive_to_actuator) == 1


async def test_act_first_order_also_acknowledges_only_audited_decisions(short_tmp: Path) -> None:
    raw = json.loads(json.dumps(FAST))
    raw["auditOrder"] = "act_first"
    async with running(short_tmp, load_config(raw)) as (_service, tc), tc.subscribe("actions/t1") as actions:
        for s in (2.0, 2.0):
            await tc.publish("anomaly/t1", event(s))
        ack = await next_action(actions)
        with sqlite3.connect(short_tmp / "audit.db") as conn:
            n = conn.execute("SELECT count(*) FROM outcomes WHERE decision_id = ?", (ack["decision_id"],)).fetchone()
        assert n[0] == 2


async def test_bad_input_is_counted_and_never_stops_the_component(short_tmp: Path) -> None:
    async with running(short_tmp, cfg_with(maxConsecutiveInvalid=0)) as (service, tc), \
            tc.subscribe("actions/t1") as actions:
        junk: list[Any] = [event(float("nan")), {**event(1.0), "score": "x"}, {"no": "id"}, [1, 2], b"\x00\xff",
                           "text", {**event(2.0), "asset": "t9"}, {**event(2.0), "threshold": float("inf")}]
        for j in junk:
            await tc.publish("anomaly/t1", j)
        await tc.publish("anomaly/unknown-asset", event(5.0, "unknown-asset"))
        await tc.publish("anomaly/t1", event(3.0))
        await tc.publish("anomaly/t1", event(3.0))
        ack = await next_action(actions)  # still alive and still protecting
        assert ack["state"] == "latched"
        bad = service.stats.bad_events
        assert bad["nan_score"] == 1 and bad["bad_score"] == 1 and bad["no_event_id"] == 1
        assert bad["not_a_map"] == 3 and bad["asset_mismatch"] == 1 and bad["nan_threshold"] == 1
        assert service.stats.unknown_assets["unknown-asset"] == 1


async def test_events_without_a_verdict_are_bad_events_with_the_is_anomaly_trigger(short_tmp: Path) -> None:
    async with running(short_tmp, cfg_with(trigger="is_anomaly")) as (service, tc), \
            tc.subscribe("actions/t1") as actions:
        no_verdict = event(5.0)
        del no_verdict["is_anomaly"]
        for junk in (no_verdict, {**event(5.0), "is_anomaly": 1}, {**event(5.0), "is_anomaly": None}):
            await tc.publish("anomaly/t1", junk)
        likely = [event(0.2, is_anomaly=True), event(0.3, is_anomaly=True)]
        for e in likely:
            await tc.publish("anomaly/t1", e)
        ack = await next_action(actions)  # the bad ones never counted, nor crashed anything
        assert ack["event_ids"] == [e["event_id"] for e in likely] and "trigger is_anomaly" in ack["reason"]
        assert service.stats.bad_events == {"bad_is_anomaly": 3}


async def test_nan_flood_goes_to_the_safe_state(short_tmp: Path) -> None:
    async with running(short_tmp, cfg_with(maxConsecutiveInvalid=5)) as (_service, tc), \
            tc.subscribe("actions/t1") as actions:
        for _ in range(5):
            await tc.publish("anomaly/t1", event(float("nan")))
        ack = await next_action(actions)
        assert ack["state"] == "safe_state" and "invalid" in ack["reason"]
        assert ack["actions"] == ["pitch_to_feather", "engage_brake"]


async def test_operator_reset_over_request_reply(short_tmp: Path) -> None:
    async with running(short_tmp, cfg_with()) as (service, tc), tc.subscribe("actions/t1") as actions:
        await tc.publish("anomaly/t1", event(2.0))
        await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        refused = await tc.request("control/t1/reset", {"operator": "alice"})
        assert refused["ok"] is False and refused["state"] == "latched" and "still active" in refused["reason"]
        for _ in range(3):
            await tc.publish("anomaly/t1", event(0.1))
        async with asyncio.timeout(10):
            while sum(1 for _ in service.policies["t1"]._recent if _.above) >= 2:
                await asyncio.sleep(0.01)
        ok = await tc.request("control/t1/reset", {"operator": "alice"})
        assert ok == {"ok": True, "state": "normal", "reason": "operator reset by alice (client test)"}
        ack = await next_action(actions)
        assert ack["state"] == "normal" and ack["previous"] == "latched" and ack["action"] is None
        unknown = await tc.request("control/t7/reset", {})
        assert unknown["ok"] is False and "unknown asset" in unknown["reason"]


async def test_a_configuration_change_does_not_let_a_reset_through_during_the_fault(short_tmp: Path) -> None:
    """Each new configuration rebuilt the policies with no windows, so a reset right after one (here a new
    cooldown) was accepted while the brake's cause was still there."""
    async with running(short_tmp, cfg_with()) as (service, tc), tc.subscribe("actions/t1") as actions:
        for _ in range(3):
            await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
        async with asyncio.timeout(10):
            while len(service.policies["t1"]._recent) < 3:
                await asyncio.sleep(0.01)
        service.reconfigure(cfg_with(cooldownS=30))
        refused = await tc.request("control/t1/reset", {"operator": "alice"})
        assert refused["ok"] is False and "still active (3 of the last 3 windows" in refused["reason"]


async def test_keepalive_refreshes_a_dead_man_timer_only_while_protection_works(short_tmp: Path) -> None:
    """actuator.keepaliveS: the refresh an external dead-man timer needs, so that the turbine goes to its
    safe state when this component cannot (crashed, BROKEN, the nucleus down). Never for an asset in the
    safe state or with silent inputs: there the external timer must run out too."""
    cfg = load_config({**FAST, "assets": ["t1", "t2"], "actuator": {"kind": "simulated", "keepaliveS": 0.05}})
    actuator = SimulatedActuator(out=io.StringIO())
    async with running(short_tmp, cfg, actuator) as (service, _):
        async with asyncio.timeout(10):  # the service's own loop calls it
            while sum(1 for r, _ in actuator.calls if r.action == "keepalive") < 4:
                await asyncio.sleep(0.02)
        assert {r.asset for r, _ in actuator.calls if r.action == "keepalive"} == {"t1", "t2"}
        assert actuator.out.getvalue() == ""  # recorded, not printed every keepaliveS
        service.policies["t2"].state = State.SAFE_STATE
        actuator.calls.clear()
        await service.keepalive()
        assert [r.asset for r, _ in actuator.calls] == ["t1"]
    # t2's timer does not answer: logged once when it starts failing, per asset (t1's successes in between
    # are no recovery of t2's)
    relay = short_tmp / "refresh.sh"
    relay.write_text('#!/bin/sh\n[ "$NUCLEUS_ASSET" = t1 ]\n')
    relay.chmod(0o755)
    failing = load_config({**FAST, "assets": ["t1", "t2"], "actuator": {"kind": "command", "keepaliveS": 1,
                           "commands": {"engage_brake": "/bin/true", "pitch_to_feather": "/bin/true",
                                        "keepalive": str(relay)}}})
    with capture_logs() as logs:
        async with running(short_tmp / "f", failing, make_actuator(failing.actuator)) as (service, _):
            await service.keepalive()
            await service.keepalive()
    assert service.stats.keepalives == 4 and service.stats.keepalive_failures == 2
    assert [(e["event"], e["asset"]) for e in logs if e["event"].startswith("action.keepalive")] == [
        ("action.keepalive_failed", "t2")]


def test_a_command_keepalive_needs_its_command() -> None:
    with pytest.raises(ConfigError, match=r"no command for \['keepalive'\]"):
        load_config({"actuator": {"kind": "command", "keepaliveS": 1, "commands": {
            "engage_brake": "/bin/true", "pitch_to_feather": "/bin/true"}}})


async def test_fail_safe_when_heartbeat_stops_and_sensor_keeps_going(short_tmp: Path) -> None:
    cfg = cfg_with(heartbeatTimeoutS=0.3, sensorTimeoutS=5, startupGraceS=0)
    async with running(short_tmp, cfg) as (service, tc), tc.subscribe("actions/t1") as actions:
        t_end = time.monotonic() + 0.6
        while time.monotonic() < t_end:  # heartbeats and sensors alive: nothing happens
            await tc.publish("heartbeat/anomaly_detector", {"ts": time.time()})
            await tc.publish("sensors/t1/raw", {"seq": 0})
            await asyncio.sleep(0.05)
        assert service.policies["t1"].state is State.NORMAL
        ack = await next_action(actions)  # now only the heartbeat stops
        assert ack["state"] == "safe_state" and "detector heartbeat" in ack["reason"]
        assert ack["actions"] == ["pitch_to_feather", "engage_brake"]


async def test_command_actuator_runs_scripts_with_timeout(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    ok = tmp_path / "ok.sh"
    ok.write_text(f'#!/bin/sh\necho "$NUCLEUS_ACTION $NUCLEUS_ASSET $NUCLEUS_DECISION_ID" >> {out}\necho done\n')
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    fail = tmp_path / "fail.sh"
    fail.write_text("#!/bin/sh\necho relay stuck >&2\nexit 3\n")
    for p in (ok, slow, fail):
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    act = CommandActuator({"engage_brake": (str(ok),), "pitch_to_feather": (str(slow),),
                           "disconnect_generator": (str(fail),)}, timeout_s=0.5)
    r = await act.execute(ActionRequest("engage_brake", "t1", "d1", "test"))
    assert r.ok and r.detail == "done" and out.read_text() == "engage_brake t1 d1\n"
    r = await act.execute(ActionRequest("pitch_to_feather", "t1", "d2", "test"))
    assert not r.ok and "timed out" in r.detail and r.duration_s < 10
    r = await act.execute(ActionRequest("disconnect_generator", "t1", "d3", "test"))
    assert not r.ok and "exited 3" in r.detail and "relay stuck" in r.detail
    missing = CommandActuator({"engage_brake": (str(tmp_path / "nope"),)})
    assert not (await missing.execute(ActionRequest("engage_brake", "t1", "d4", "x"))).ok


async def test_command_outcome_is_the_exit_even_when_the_script_leaves_a_process_running(tmp_path: Path) -> None:
    """A relay script that switches the relay and leaves a siren running in the background succeeded;
    it was reported as timed out (and the siren killed) because the siren kept the output pipe open."""
    siren_pid = tmp_path / "siren.pid"
    relay = tmp_path / "relay.sh"
    relay.write_text(f"#!/bin/sh\necho relay on\nsleep 60 &\necho $! > {siren_pid}\n")
    relay.chmod(relay.stat().st_mode | stat.S_IXUSR)
    act = CommandActuator({"engage_brake": (str(relay),)}, timeout_s=5)
    try:
        r = await act.execute(ActionRequest("engage_brake", "t1", "d1", "test"))
        assert r.ok and r.detail == "relay on"
        os.kill(int(siren_pid.read_text()), 0)  # the script's background process is its own business
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(siren_pid.read_text()), signal.SIGKILL)


async def test_a_command_that_cannot_run_is_logged_at_start_and_on_a_new_configuration(short_tmp: Path) -> None:
    """A missing relay script used to show up only when the brake was needed. The deployment cannot refuse
    it (the script may come with another component of the same deployment), so the action says so then."""
    ok, plain, gone = short_tmp / "ok.sh", short_tmp / "plain.sh", short_tmp / "gone.sh"
    ok.write_text("#!/bin/sh\n")
    ok.chmod(0o755)
    plain.write_text("#!/bin/sh\n")

    def with_commands(commands: dict[str, str]) -> Any:
        return load_config({**FAST, "actuator": {"kind": "command", "commands": commands}})

    first_cfg = with_commands({"engage_brake": str(ok), "pitch_to_feather": f"{gone} --feather"})
    with capture_logs() as logs:
        async with bus(short_tmp) as path, client(path, "action") as ac:
            audit = AuditLog(short_tmp / "audit.db")
            service = ActionService(ac, first_cfg, audit)
            first = [(e["action"], e["problem"]) for e in logs if e["event"] == "action.command_unavailable"]
            service.reconfigure(with_commands({"engage_brake": str(ok), "pitch_to_feather": f"{gone} --feather"}))
            assert not any(e["event"] == "action.reconfigured" for e in logs)  # the same configuration again
            logs.clear()
            service.reconfigure(with_commands({"engage_brake": "no-such-relay-tool on",
                                               "pitch_to_feather": str(plain)}))
            second = [(e["action"], e["problem"]) for e in logs if e["event"] == "action.command_unavailable"]
            service.close()
            audit.close()
    assert first == [("pitch_to_feather", f"{gone}: no such file")]
    assert sorted(second) == [("engage_brake", "no-such-relay-tool: not found on PATH"),
                              ("pitch_to_feather", f"{plain}: not executable")]
    assert [e["actuator"] for e in logs if e["event"] == "action.reconfigured"] == ["command"]


def test_command_actuator_config_must_cover_every_configured_action() -> None:
    with pytest.raises(ConfigError, match="no command for"):
        load_config({"actuator": {"kind": "command", "commands": {"engage_brake": "/bin/true"}}})
    cfg = load_config({"actuator": {"kind": "command", "commands": {
        "engage_brake": "/bin/true --on", "pitch_to_feather": ["/bin/true"]}}})
    assert cfg.actuator.argv("engage_brake") == ("/bin/true", "--on")
    with pytest.raises(ConfigError, match="heartbeatTimeout"):
        load_config({"policy": {"heartbeatTimeout": 3}})


async def test_latched_state_survives_a_restart(short_tmp: Path) -> None:
    async with running(short_tmp, cfg_with()) as (_s, tc), tc.subscribe("actions/t1") as actions:
        await tc.publish("anomaly/t1", event(2.0))
        await tc.publish("anomaly/t1", event(2.0))
        assert (await next_action(actions))["state"] == "latched"
    async with running(short_tmp, cfg_with()) as (service, tc), tc.subscribe("actions/t1") as actions:
        assert service.policies["t1"].state is State.LATCHED
        # The restored latch starts with no windows: a reset right after the restart used to be accepted
        # ("fewer than k anomalous" held trivially) and released the brake while the fault lasted.
        refused = await tc.request("control/t1/reset", {"operator": "alice"})
        assert refused["ok"] is False and refused["state"] == "latched"
        assert refused["reason"] == "refused: 0 of the 3 windows needed to judge the condition seen so far"
        for _ in range(3):
            await tc.publish("anomaly/t1", event(0.1))
        async with asyncio.timeout(10):
            while len(service.policies["t1"]._recent) < 3:
                await asyncio.sleep(0.01)
        ok = await tc.request("control/t1/reset", {"operator": "alice"})
        assert ok["ok"] is True and (await next_action(actions))["previous"] == "latched"


@pytest.mark.parametrize("trigger", ["is_anomaly", None])
async def test_a_likelihood_stream_trips_the_action_process_only_with_the_is_anomaly_trigger(
        short_tmp: Path, trigger: str | None) -> None:
    """A likelihood-mode detector flags windows whose scores stay under the card's threshold. The action,
    run as its own process, latches on them with trigger is_anomaly; with the default it does not, and
    its first decision is the one the later high scores cause."""
    config: dict[str, Any] = json.loads(json.dumps(FAST))
    if trigger is not None:
        config["policy"]["trigger"] = trigger
    flagged = [event(s, is_anomaly=True) for s in (0.2, 0.3, 0.1)]  # all below threshold 1.0
    high = [event(3.0, is_anomaly=False) for _ in range(2)]  # over the threshold, the detector unmoved
    async with bus_server(short_tmp) as server, client(server.socket_path) as tc, \
            tc.subscribe("actions/t1") as actions, action_component(server, config, short_tmp):
        for e in flagged + high:
            await tc.publish("anomaly/t1", e)
        ack = await next_action(actions)
        assert ack["state"] == "latched"
        if trigger == "is_anomaly":
            assert ack["event_ids"] == [e["event_id"] for e in flagged[:2]] and ack["scores"] == [0.2, 0.3]
            assert ack["reason"] == "2 of the last 2 windows with is_anomaly true (trigger is_anomaly, k=2, n=3)"
        else:  # nothing before the high scores: a decision on the flagged ones would have come first
            assert ack["event_ids"] == [e["event_id"] for e in high]
            assert ack["reason"] == "2 of the last 3 windows at or above 1x threshold (trigger score, k=2, n=3)"
    with sqlite3.connect(short_tmp / "audit.db") as conn:  # the audit log says which trigger decided
        rows = conn.execute("SELECT decision_id, reason FROM decisions ORDER BY rowid").fetchall()
    assert rows == [(ack["decision_id"], ack["reason"])]


# --- under a real daemon, killed with SIGKILL mid-burst -------------------------------------------

# No detector and no ingest here (the test publishes the events): every input timeout off or far away.
BURST_CONFIG = {"assets": ["wt-1"], "policy": {
    "k": 1, "n": 1, "releaseCount": 1, "latch": False, "cooldownS": 0, "heartbeatTimeoutS": 600,
    "sensorTimeoutS": 600, "windowTimeoutS": 0, "startupGraceS": 600, "tripActions": ["engage_brake"]}}


@pytest.mark.slow
def test_sigkill_during_a_burst_loses_no_acknowledged_decision(daemon: Any, short_tmp: Path) -> None:
    update = {"com.nucleus.ProtectiveAction": {"MERGE": BURST_CONFIG}}
    daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", "com.nucleus.ProtectiveAction=1.0.0",
               "--update-config", json.dumps(update))
    comp = daemon.wait_state("com.nucleus.ProtectiveAction", {"RUNNING"})
    pids = comp["pids"] if isinstance(comp["pids"], list) else [comp["pids"]]
    # the component's python process itself (the Run step may be a shell around it)
    pid = next(p for p in pids if b"components.protective_action" in Path(f"/proc/{p}/cmdline").read_bytes())
    policy = short_tmp / "operator.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"o": {
        "operations": ["aws.greengrass#SubscribeToTopic", "aws.greengrass#PublishToTopic"],
        "resources": ["actions/wt-1", "anomaly/wt-1"]}}}))
    token = daemon.cli("client", "add", "test.operator", "--policy", str(policy)).stdout.strip().splitlines()[-1]
    db = daemon.root / "work" / "com.nucleus.ProtectiveAction" / "audit.db"

    async def burst() -> list[str]:
        acked: list[str] = []
        async with Client(daemon.root / "ipc.sock", token, name="test.operator") as c, \
                c.subscribe("actions/wt-1", queue_size=100_000) as actions:

            async def publish() -> None:
                for i in range(100_000):  # alternate: every event is a decision (trip, release, trip, ...)
                    await c.publish("anomaly/wt-1", event(2.0 if i % 2 == 0 else 0.0, "wt-1"))
                    if i % 50 == 49:
                        await asyncio.sleep(0.001)

            pub = asyncio.create_task(publish())
            try:
                async with asyncio.timeout(60):
                    async for m in actions:
                        acked.append(m.payload["decision_id"])
                        if len(acked) == 200:
                            os.kill(pid, signal.SIGKILL)  # mid-burst: decisions are being made right now
                        if len(acked) >= 200:
                            break
                # Acks already in flight when the process died still count: drain them briefly.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for m in actions:
                            acked.append(m.payload["decision_id"])
            finally:
                pub.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pub
        return acked

    acked = asyncio.run(burst())
    assert len(acked) >= 200
    with contextlib.suppress(FileNotFoundError):  # gone, or a zombie until the daemon reaps it
        assert "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with sqlite3.connect(db) as conn:
        stored = {r[0] for r in conn.execute("SELECT decision_id FROM decisions")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    missing = [a for a in acked if a not in stored]
    assert missing == []
    assert len(stored) >= len(acked)


@pytest.mark.slow
def test_command_actuator_under_the_daemon_acts_after_the_audit_and_records_failures(
        daemon: Any, short_tmp: Path) -> None:
    """docs/components.md's command actuator on a real daemon: the script gets its argv and the decision
    in its environment, the decision is already in the audit log when it runs, and a script that fails
    is an outcome (ok false, its message) in the log, the audit and the acknowledgement; the component
    runs on."""
    calls = short_tmp / "calls.jsonl"
    db = daemon.root / "work" / "com.nucleus.ProtectiveAction" / "audit.db"
    relay = short_tmp / "relay.py"
    relay.write_text(f"""#!{sys.executable}
import json, os, sqlite3, sys
with sqlite3.connect("file:{db}?mode=ro", uri=True) as c:
    audited = c.execute("SELECT state FROM decisions WHERE decision_id = ?",
                        (os.environ["NUCLEUS_DECISION_ID"],)).fetchone()
env = {{k: v for k, v in os.environ.items() if k.startswith("NUCLEUS_") and k[8:] in
       ("ACTION", "ASSET", "DECISION_ID", "REASON")}}
with open("{calls}", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": env, "audited": audited, "cwd": os.getcwd()}}) + "\\n")
print("relay", *sys.argv[1:])
""")
    failing = short_tmp / "fail.sh"
    failing.write_text("#!/bin/sh\necho 'relay board not answering' >&2\nexit 3\n")
    for script in (relay, failing):
        script.chmod(0o755)
    config: dict[str, Any] = json.loads(json.dumps(BURST_CONFIG))
    config["policy"].update(latch=True, tripActions=["engage_brake", "pitch_to_feather"])
    config["actuator"] = {"kind": "command", "timeoutS": 10, "commands": {
        "engage_brake": [str(relay), "brake", "on"], "pitch_to_feather": f"{failing} feather"}}
    daemon.cli("deploy", "--recipe-dir", str(REPO / "recipes"), "--merge", "com.nucleus.ProtectiveAction=1.0.0",
               "--update-config", json.dumps({"com.nucleus.ProtectiveAction": {"MERGE": config}}))
    policy = short_tmp / "operator.json"
    policy.write_text(json.dumps({"aws.greengrass.ipc.pubsub": {"o": {
        "operations": ["aws.greengrass#SubscribeToTopic", "aws.greengrass#PublishToTopic"],
        "resources": ["actions/wt-1", "anomaly/wt-1"]}}}))
    token = daemon.cli("client", "add", "test.operator", "--policy", str(policy)).stdout.strip().splitlines()[-1]

    async def trip() -> dict[str, Any]:
        async with Client(daemon.root / "ipc.sock", token, name="test.operator") as c, \
                c.subscribe("actions/wt-1") as actions:
            await c.publish("anomaly/wt-1", event(2.0, "wt-1"))
            return await next_action(actions, timeout=30)

    ack = asyncio.run(trip())
    assert ack["state"] == "latched"
    outcomes = {o["action"]: o for o in ack["outcomes"]}
    assert outcomes["engage_brake"] == {"action": "engage_brake", "ok": True, "detail": "relay brake on"}
    assert outcomes["pitch_to_feather"]["ok"] is False
    assert outcomes["pitch_to_feather"]["detail"] == f"{failing} exited 3: relay board not answering"
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call["argv"] == ["brake", "on"] and call["audited"] == ["latched"]  # in the audit before acting
    assert call["env"] == {"NUCLEUS_ACTION": "engage_brake", "NUCLEUS_ASSET": "wt-1",
                           "NUCLEUS_DECISION_ID": ack["decision_id"], "NUCLEUS_REASON": ack["reason"]}
    assert call["cwd"] == str(db.parent)  # the component's work directory: where relative paths start
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT action, ok FROM outcomes WHERE decision_id = ?", (ack["decision_id"],)))
    assert rows == {"engage_brake": 1, "pitch_to_feather": 0}
    assert daemon.components()["com.nucleus.ProtectiveAction"]["state"] == "RUNNING"
