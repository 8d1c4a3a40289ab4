"""The wind-turbine demo, start to finish, on a laptop: train, deploy, watch, fault, brake, reset, model v2.

Drives the real CLI (``python -m nucleus ...``) the way an operator would, and watches the bus as a
declared local client (``nucleus client add NAME --policy FILE``) through the SDK — exactly what a
third-party tool has. Everything runs on embedded defaults: a daemon in a fresh temporary root, the
built-in recipes with their default configuration, no broker, no cloud. The temporary root is removed
and no process is left behind, so running it twice gives the same story.

    .venv/bin/python examples/wind_turbine/demo.py            # or: scripts/demo

Latency is measured from "window complete" — the moment the last sample of the batch that completes
the window is due (the batch's ``t0`` + its length / rate: the ingest publishes a batch no earlier) —
to the detector's ``published_at`` on the anomaly event, and to the actuator call (``timing.actuated_at``
on ``actions/turbine-1``). Measured from the due time, it can only overstate the latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ipc import Client

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NUCLEUS = [sys.executable, "-m", "nucleus"]
ASSET = "turbine-1"
MODEL = "com.nucleus.TurbineModel"
DETECTOR = "com.nucleus.AnomalyDetector"
STACK = ("com.nucleus.SensorIngest", DETECTOR, "com.nucleus.ProtectiveAction")
LATENCY_BUDGET_MS = 5.0


class Timeline:
    """One line per event, with the time since the demo started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {text}", flush=True)

    def detail(self, text: str) -> None:
        for line in text.splitlines():
            print(f"          {line}", flush=True)


class DemoError(Exception):
    """A step of the demo failed; the message says which and what the CLI or the bus said."""


def run_cli(root: Path | None, *args: str, timeout: float = 120.0) -> str:
    cmd = [*NUCLEUS, *(["--root", str(root)] if root else []), *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    out = (proc.stdout + proc.stderr).rstrip()
    if proc.returncode != 0:
        raise DemoError(f"`nucleus {' '.join(args)}` exited {proc.returncode}:\n{out}")
    return out


# --- the daemon ------------------------------------------------------------------------------------

class Daemon:
    """`nucleus run` in its own session; stopped with SIGTERM, and nothing it started may outlive it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.component_pids: set[int] = set()

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
        log = (self.root / "daemon.out").open("ab")
        self.proc = subprocess.Popen([*NUCLEUS, "--root", str(self.root), "run"], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=REPO)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"the daemon exited with {self.proc.returncode}; see {self.root}/daemon.out")
            if (self.root / "ipc.sock").exists():
                with contextlib.suppress(DemoError):
                    run_cli(self.root, "status", timeout=10)
                    return
            time.sleep(0.05)
        raise DemoError(f"the daemon did not answer within {timeout:.0f} s")

    def components(self) -> dict[str, dict[str, Any]]:
        comps = {c["name"]: c for c in json.loads(run_cli(self.root, "list", "--json"))}
        for c in comps.values():
            self.component_pids.update(int(p) for p in c.get("pids") or [])
        return comps

    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM and wait; returns the PIDs (daemon or component) still alive afterwards (should be none)."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        left = [pid for pid in sorted(self.component_pids) if _alive(pid)]
        self._kill_recorded_groups()
        return left

    def _kill_recorded_groups(self) -> None:
        """Safety net after a failure: the process groups the daemon recorded for its components."""
        with contextlib.suppress(OSError, ValueError):
            for record in json.loads((self.root / "run" / "pids.json").read_text()):
                with contextlib.suppress(ProcessLookupError, PermissionError, KeyError, ValueError):
                    os.killpg(int(record["pgid"]), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not a leftover process: it has exited and only waits to be reaped.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


# --- watching the bus -------------------------------------------------------------------------------

@dataclass(slots=True)
class Watch:
    """What the operator's client has seen on the bus (bounded)."""

    due: dict[int, float] = field(default_factory=dict)  # batch seq -> wall time its last sample was due
    events: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    seqs: deque[int] = field(default_factory=lambda: deque(maxlen=4096))

    def window_complete(self, event: dict[str, Any]) -> float | None:
        return self.due.get(int(event["window"]["seq_last"]))


async def collect(client: Client, watch: Watch) -> None:
    async def sensors() -> None:
        async with client.subscribe(f"sensors/{ASSET}/raw", queue_size=2048) as msgs:
            async for m in msgs:
                p = m.payload
                seq = int(p["seq"])
                watch.due[seq] = float(p["t0"]) + p["data"].shape[1] / float(p["rate_hz"])
                watch.seqs.append(seq)
                if len(watch.due) > 4096:
                    watch.due.pop(next(iter(watch.due)))

    async def anomalies() -> None:
        async with client.subscribe(f"anomaly/{ASSET}", queue_size=100_000, policy="block") as msgs:
            async for m in msgs:
                watch.events.append(m.payload)

    async def actions() -> None:
        async with client.subscribe(f"actions/{ASSET}", queue_size=1024, policy="block") as msgs:
            async for m in msgs:
                watch.actions.append(m.payload)

    async def heartbeats() -> None:
        async with client.subscribe("heartbeat/anomaly_detector", queue_size=16) as msgs:
            async for m in msgs:
                watch.heartbeat = m.payload

    async with asyncio.TaskGroup() as tg:
        for loop in (sensors, anomalies, actions, heartbeats):
            tg.create_task(loop())


async def until(pred: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise DemoError(f"timed out after {within_s:.0f} s waiting for {what}")


def fmt_contrib(event: dict[str, Any]) -> str:
    chans = event.get("contributions", {}).get("channels", {})
    feats = event.get("contributions", {}).get("features", {})
    c = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(chans.items())[:2])
    f = ", ".join(list(feats)[:3])
    return f"channels {c}; features {f}"


# --- the story ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class Paths:
    work: Path

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def build(self) -> Path:
        return self.work / "build"

    @property
    def healthy(self) -> Path:
        return self.work / "healthy.npz"

    def model_recipe(self, version: str) -> Path:
        return self.build / "recipes" / f"{MODEL}-{version}.yaml"


def train(tl: Timeline, paths: Paths, version: str, kind: str) -> dict[str, Any]:
    out = run_cli(None, "model", "build", "--data", str(paths.healthy), "--out", str(paths.build), "--version", version,
                  "--kind", kind, "--json")
    result: dict[str, Any] = json.loads(out[out.index("{"):])
    m = result["metrics"]
    tl.say(f"model {version}: {kind}, {result['windows']} healthy windows x {result['features']} features, "
           f"threshold {result['threshold']:.4g} (held-out quantile); ONNX = scikit-learn within "
           f"{m['onnx_max_abs_diff']:.1e}; signed {result['key_id']}")
    return result


async def scenario(tl: Timeline, daemon: Daemon, paths: Paths, token: str) -> None:
    watch = Watch()
    async with Client(daemon.root / "ipc.sock", token, name="wind-turbine-operator") as client, \
            asyncio.TaskGroup() as tg:
        collector = tg.create_task(collect(client, watch))
        try:
            await _story(Scene(tl, daemon, paths, client, watch))
        finally:
            collector.cancel()


@dataclass(slots=True)
class Scene:
    tl: Timeline
    daemon: Daemon
    paths: Paths
    client: Client
    watch: Watch


async def _story(scene: Scene) -> None:
    tl, daemon, paths, client, watch = scene.tl, scene.daemon, scene.paths, scene.client, scene.watch
    # 1. normal operation
    await until(lambda: watch.heartbeat.get("model_version") == "1.0.0" and len(watch.events) >= 2, 30,
                "the detector to load model 1.0.0 and score windows")
    tl.say(f"detector ready: model {watch.heartbeat['model_component']} {watch.heartbeat['model_version']} "
           f"(key {watch.heartbeat['model_key_id']}); sensor batches #{watch.seqs[0]}..#{watch.seqs[-1]} so far")
    start = len(watch.events)
    await asyncio.sleep(4.0)
    normal = watch.events[start:]
    scores = [e["score"] for e in normal]
    tl.say(f"normal state: {len(normal)} windows in 4 s, score {min(scores):.3f}..{max(scores):.3f} "
           f"(threshold {normal[-1]['threshold']:.3f}), {sum(e['is_anomaly'] for e in normal)} anomalous, "
           f"protective action: {len(watch.actions)} decisions")

    # 2. a bearing outer-race defect
    n_events, n_actions = len(watch.events), len(watch.actions)
    reply = await client.request(f"control/{ASSET}/fault", {"fault": "bearing_outer_race", "severity": 0.8})
    injected = time.monotonic()
    tl.say(f"inject fault over IPC: control/{ASSET}/fault bearing_outer_race severity 0.8 -> "
           f"ok={reply['ok']} active={[a['fault'] for a in reply['active']]}")
    await until(lambda: any(e["is_anomaly"] for e in watch.events[n_events:]), 10, "an anomalous window")
    first = next(e for e in watch.events[n_events:] if e["is_anomaly"])
    tl.say(f"first anomalous window (+{time.monotonic() - injected:.2f} s): score {first['score']:.3f} > "
           f"{first['threshold']:.3f}, confidence {first['confidence']:.2f}; {fmt_contrib(first)}")
    await until(lambda: len(watch.actions) > n_actions, 10, "the protective action to trip")
    trip = watch.actions[n_actions]
    tl.say(f"PROTECTIVE ACTION {trip['state'].upper()}: {', '.join(trip['actions'])} ({trip['reason']})")
    trip_event = trip["event_ids"][-1] if trip.get("event_ids") else None
    with contextlib.suppress(DemoError):  # our own copy of the event may trail the decision by a moment
        await until(lambda: any(e["event_id"] == trip_event for e in watch.events), 2, "the tripping event")
    by_id = {e["event_id"]: e for e in watch.events}
    last = by_id.get(trip_event) if trip_event else None
    complete = watch.window_complete(last) if last else None
    if last is not None and complete is not None:
        to_event = (last["published_at"] - complete) * 1e3
        to_act = (trip["timing"]["actuated_at"] - complete) * 1e3
        verdict = "within" if to_act < LATENCY_BUDGET_MS else "OVER"
        tl.detail(f"latency: window complete (batch #{last['window']['seq_last']}) -> anomaly event {to_event:.2f} ms "
                  f"-> actuator {to_act:.2f} ms ({verdict} the {LATENCY_BUDGET_MS:g} ms budget; "
                  f"event -> actuator {trip['timing'].get('event_to_actuator_ms', float('nan')):.2f} ms)")
    outcomes = ", ".join(f"{o['action']} {'ok' if o['ok'] else 'FAILED'}" for o in trip.get("outcomes", []))
    tl.detail(f"actuator: {outcomes}; decision {trip['decision_id'][:8]} is in the audit log "
              f"(work/com.nucleus.ProtectiveAction/audit.db) before it was published")
    await asyncio.sleep(1.5)
    tl.say(f"latched: {len(watch.actions) - n_actions} decision(s) while the fault persists (no repeats, "
           f"{sum(e['is_anomaly'] for e in watch.events[n_events:])} anomalous windows so far)")

    # 3. repair and operator reset
    await client.request(f"control/{ASSET}/fault", {"action": "clear_all"})
    tl.say("fault cleared (the bearing is replaced); operator resets the protective action")
    n_actions = len(watch.actions)
    for attempt in range(40):
        r = await client.request(f"control/{ASSET}/reset", {"operator": "demo"})
        if r["ok"]:
            break
        if attempt == 0:
            tl.detail(f"reset refused: {r['reason']}")
        await asyncio.sleep(0.25)
    else:
        raise DemoError("the reset was refused for 10 s after the fault was cleared")
    await until(lambda: len(watch.actions) > n_actions, 5, "the reset decision")
    tl.say(f"reset accepted -> state {watch.actions[-1]['state']} ({watch.actions[-1]['reason']})")

    # 4. a data scientist ships model v2 alone
    tl.say("a retrained model: `nucleus model build --kind pca --version 2.0.0` (same data, same key)")
    await asyncio.to_thread(train, tl, paths, "2.0.0", "pca")
    before = daemon.components()
    pids_before = {n: before[n]["pids"] for n in STACK}
    swap_from = len(watch.events)
    tl.say(f"nucleus deploy {MODEL}-2.0.0.yaml --artifacts build/artifacts   (the model alone)")
    t_deploy = time.monotonic()
    await asyncio.to_thread(run_cli, daemon.root, "deploy", str(paths.model_recipe("2.0.0")),
                            "--artifacts", str(paths.build / "artifacts"), "--settle", "1")
    tl.say(f"deployment done in {time.monotonic() - t_deploy:.1f} s")
    await until(lambda: any(e["model"]["version"] == "2.0.0" for e in watch.events[swap_from:]), 20,
                "events scored by model 2.0.0")
    switched = next(e for e in watch.events[swap_from:] if e["model"]["version"] == "2.0.0")
    tl.say(f"detector switched to model 2.0.0 ({switched['model']['kind']}) at the window ending in batch "
           f"#{switched['window']['seq_last']}, score {switched['score']:.3f} / threshold {switched['threshold']:.3f}")
    await asyncio.sleep(2.0)
    after = daemon.components()
    pids_after = {n: after[n]["pids"] for n in STACK}
    span = watch.events[max(0, swap_from - 8):]
    hop_s = float(np.median(np.diff([e["window"]["t_end"] for e in watch.events[-20:]])))
    steps = np.round(np.diff([e["window"]["t_end"] for e in span]) / hop_s).astype(int)
    versions = [e["model"]["version"] for e in span]
    lost = int(np.sum(steps - 1)) if steps.size else 0
    tl.say(f"across the swap: {versions.count('1.0.0')} windows by 1.0.0 then {versions.count('2.0.0')} by 2.0.0, "
           f"{'no window lost' if lost == 0 and set(steps.tolist()) == {1} else f'{lost} windows LOST'} "
           f"(window ends every {hop_s * 1e3:.0f} ms)")
    for name in STACK:
        same = pids_before[name] == pids_after[name]
        tl.detail(f"{name:30s} pid {pids_after[name]} {'unchanged' if same else f'CHANGED from {pids_before[name]}'}")
    hb = watch.heartbeat
    tl.say(f"detector heartbeat: model {hb['model_version']}, {hb['windows']} windows, "
           f"skipped {hb['skipped'] or 'none'}, lag {1e3 * (hb['lag_s'] or 0):.1f} ms; "
           f"protective action state {watch.actions[-1]['state']}")
    if lost or set(steps.tolist()) != {1} or pids_before != pids_after or hb["model_version"] != "2.0.0":
        raise DemoError("the model update did not go as promised (see the lines above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The wind-turbine demo (see examples/wind_turbine/README.md).")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (root, build, logs)")
    args = p.parse_args(argv)
    tl = Timeline()
    work = Path(tempfile.mkdtemp(prefix="nucleus-wt-", dir="/tmp"))  # short: the socket path must fit 108 bytes
    paths = Paths(work)
    daemon = Daemon(paths.root)
    ok = False
    try:
        tl.say(f"work directory {work}")
        out = subprocess.run([sys.executable, str(HERE / "record_healthy.py"), "--out", str(paths.healthy)],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
        tl.say(out.replace(str(work) + "/", ""))
        train(tl, paths, "1.0.0", "isolation_forest")
        paths.root.mkdir()
        daemon.start()
        tl.say(f"daemon up: `nucleus --root {paths.root} run` (embedded defaults: no broker, no cloud)")
        token = run_cli(paths.root, "client", "add", "wind-turbine-operator", "--policy",
                        str(HERE / "operator-policy.json")).splitlines()[-1].strip()
        tl.say("declared local client `wind-turbine-operator` (examples/wind_turbine/operator-policy.json)")
        recipes = [paths.model_recipe("1.0.0"), *(REPO / "recipes" / f"{n}-1.0.0.yaml" for n in STACK)]
        tl.say(f"nucleus deploy {MODEL}-1.0.0 + {' + '.join(n.split('.')[-1] for n in STACK)} "
               "--update-config @build/detector-config.json")
        run_cli(paths.root, "deploy", *map(str, recipes), "--artifacts", str(paths.build / "artifacts"),
                "--update-config", "@" + str(paths.build / "detector-config.json"), "--settle", "1")
        comps = daemon.components()
        tl.say("deployed: " + ", ".join(f"{n.split('.')[-1]} {c['version']} {c['state']}"
                                        for n, c in sorted(comps.items())))
        asyncio.run(scenario(tl, daemon, paths, token))
        ok = True
    except (DemoError, subprocess.CalledProcessError) as exc:
        tl.say(f"FAILED: {exc}")
        if isinstance(exc, subprocess.CalledProcessError):
            tl.detail(str(exc.stderr))
        tail = (paths.root / "daemon.out")
        if tail.exists():
            tl.detail("daemon log (tail):\n" + "\n".join(tail.read_text(errors="replace").splitlines()[-15:]))
    finally:
        left = daemon.stop()
        tl.say("daemon stopped (SIGTERM: components stopped in reverse dependency order); "
               + (f"LEFTOVER PROCESSES {left}" if left else "no process left behind"))
        if args.keep:
            tl.say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        ok = ok and not left
    tl.say("done" if ok else "done, with failures")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
