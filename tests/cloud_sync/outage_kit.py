"""The whole product under outages and daemon kills: shared by test_end_to_end.py and benchmarks/sync.py.

A real ``nucleus run`` daemon, its uplink going to a real Mosquitto through a TCP relay that the
scenario cuts; a real component deployed with ``nucleus deploy`` that publishes numbered messages
through the SDK (``publish_to_cloud``) at a steady rate and appends every acknowledged one to a
file (fsynced); a cloud-side persistent-session subscriber connected to the broker directly. The
scenario cuts the link ``outages`` times and ``kill -9``s the daemon ``kills`` times (restarting
it), interleaved, then stops the publisher and waits until everything spooled has arrived.

What may be duplicated is decided by the spool, the product's own record of acknowledgement: a
message is deleted from it only once its PUBACK came back (and the deletion committed). At every
disruption the scenario reads the spool file after the old connection is gone and before a new
one can exist (after the kill; at the end of the outage, before the link returns). A message
that the cloud had already received may arrive again after that disruption only if it was still
in that snapshot. Arrivals are split into *epochs* at the moments the link can come back, so
each copy is charged to exactly one disruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync_testkit import Collector, LinkCutter, assert_ordered_first_arrivals

from tests.conftest import FAST_SETTINGS, Daemon, kill_component_processes

THING = "e2e-dev"
TOPIC = f"fleet/{THING}/telemetry"
COMPONENT = "test.CloudCounter"
# 10 outages and 3 kills, interleaved; one kill lands right after a link comes back (backlog in flight).
PLAN = ("outage", "outage", "outage", "kill", "outage", "outage", "outage+kill", "outage", "outage", "kill",
        "outage", "outage")

PUBLISHER = """
    import asyncio, os, time, uuid
    from ipc import Client

    OUT, STOP, TOPIC, PERIOD = {out!r}, {stop!r}, {topic!r}, {period!r}

    async def main():
        run = uuid.uuid4().hex[:12]  # a fresh instance after every daemon restart
        fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        async with Client.from_env() as c:
            n = 0
            due = time.monotonic()
            while not os.path.exists(STOP):
                os.write(fd, f"S {{run}} {{n}}\\n".encode())
                await c.publish_to_cloud(TOPIC, {{"run": run, "n": n}})  # returns once durable in the spool
                os.write(fd, f"A {{run}} {{n}}\\n".encode())
                os.fsync(fd)
                n += 1
                due = max(due + PERIOD, time.monotonic() - 1.0)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            os.write(fd, f"D {{run}} {{n}}\\n".encode())
            os.fsync(fd)
            await asyncio.Event().wait()

    asyncio.run(main())
"""


@dataclass(slots=True)
class Disruption:
    kind: str  # "outage" or "kill"
    mark: int  # index in the arrival list where the next epoch starts
    spooled: set[str]  # message ids in the spool after the old link was gone


@dataclass(slots=True)
class Outcome:
    sent: set[tuple[str, int]] = field(default_factory=set)
    acked: set[tuple[str, int]] = field(default_factory=set)
    done_runs: set[str] = field(default_factory=set)
    last_sent: dict[str, int] = field(default_factory=dict)
    arrivals: list[str] = field(default_factory=list)  # message ids, in arrival order
    key_of: dict[str, tuple[str, int]] = field(default_factory=dict)  # message id -> (run, n)
    by_topic: dict[str, list[str]] = field(default_factory=dict)
    disruptions: list[Disruption] = field(default_factory=list)
    offline_acked: list[set[tuple[str, int]]] = field(default_factory=list)  # acked while each outage lasted
    daemon_pids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    # --- derived ---------------------------------------------------------------------------------------
    def epochs(self) -> list[list[str]]:
        bounds = [0, *(d.mark for d in self.disruptions), len(self.arrivals)]
        return [self.arrivals[a:b] for a, b in itertools.pairwise(bounds)]

    def duplicates(self) -> dict[str, int]:
        """Extra copies charged to each kind of disruption ("outage", "kill"); "recorded": copies of a
        message whose delivery had been recorded (gone from the spool) at that disruption; "none":
        copies without a disruption in between."""
        out: Counter[str] = Counter()
        seen: set[str] = set()
        for i, epoch in enumerate(self.epochs()):
            spooled = self.disruptions[i - 1].spooled if i else set()
            for mid in epoch:
                if mid in seen:
                    out[self.disruptions[i - 1].kind if i else "none"] += 1
                    if mid not in spooled:
                        out["recorded"] += 1
                seen.add(mid)
        return dict(out)

    def counts(self) -> dict[str, int]:
        dup = self.duplicates()
        received = {self.key_of[m] for m in self.arrivals}
        return {"sent": len(self.sent), "acked": len(self.acked), "received": len(received),
                "copies": len(self.arrivals), "duplicates": len(self.arrivals) - len(set(self.arrivals)),
                "duplicates_outage": dup.get("outage", 0), "duplicates_kill": dup.get("kill", 0),
                "duplicates_recorded": dup.get("recorded", 0),
                "lost": len(self.acked - received), "outages": sum(d.kind == "outage" for d in self.disruptions),
                "kills": sum(d.kind == "kill" for d in self.disruptions)}


def spooled_ids(spool: Path) -> set[str]:
    """Every message id in the spool file, read by another process (WAL: the daemon is not blocked)."""
    conn = sqlite3.connect(spool, timeout=10)
    try:
        spool_id = conn.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()[0]
        return {f"{spool_id}:{seq}" for (seq,) in conn.execute("SELECT seq FROM messages")}
    finally:
        conn.close()


def read_log(path: Path, out: Outcome) -> None:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # never expected (one write(2) per line); a torn line would only weaken the check
        tag, run, n = parts[0], parts[1], int(parts[2])
        if tag == "S":
            out.sent.add((run, n))
            out.last_sent[run] = max(n, out.last_sent.get(run, -1))
        elif tag == "A":
            out.acked.add((run, n))
        elif tag == "D":
            out.done_runs.add(run)


def settings(relay_url: str) -> dict[str, Any]:
    return {**FAST_SETTINGS, "thing_name": THING,
            "mqtt": {"url": relay_url, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2,
                     "forward_defaults": False, "deployments": False}}


def write_component(base: Path, log: Path, stop: Path, rate: float) -> tuple[Path, Path]:
    art = base / "artifacts" / COMPONENT / "1.0.0"
    art.mkdir(parents=True)
    code = PUBLISHER.format(out=str(log), stop=str(stop), topic=TOPIC, period=1.0 / rate)
    (art / "main.py").write_text(textwrap.dedent(code))
    recipe = {
        "RecipeFormatVersion": "2020-01-25", "ComponentName": COMPONENT, "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": {"accessControl": {"aws.greengrass.ipc.mqttproxy": {
            f"{COMPONENT}:mqttproxy:1": {"operations": ["aws.greengrass#PublishToIoTCore"], "resources": [TOPIC]}}}}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "python3 -u {artifacts:path}/main.py"},
                       "Artifacts": [{"URI": "s3://test-bucket/main.py"}]}],
    }
    (base / "recipes").mkdir()
    path = base / "recipes" / f"{COMPONENT}-1.0.0.json"
    path.write_text(json.dumps(recipe))
    return path, base / "artifacts"


async def _until(what: str, check: Any, timeout: float, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"\ndaemon log:\n{daemon.log_text()}" if daemon is not None else ""))
        await asyncio.sleep(0.02)


async def run_scenario(broker_port: int, *, plan: tuple[str, ...] = PLAN, rate: float = 100.0,
                       connected_s: float = 1.0, outage_s: float = 0.6) -> Outcome:
    """Run the plan against a broker on 127.0.0.1:``broker_port``; every wait is bounded."""
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="nuc-", dir="/tmp"))  # short: the IPC socket path must fit
    relay = LinkCutter(broker_port)
    collector = Collector(broker_port, topic_filter=TOPIC)
    log, stop = base / "acked.log", base / "stop"
    daemon = Daemon(base / "root", settings(relay.url))
    out = Outcome()
    try:
        await relay.restore()
        await collector.start()
        await asyncio.to_thread(daemon.start)
        assert daemon.proc is not None
        out.daemon_pids.append(daemon.proc.pid)
        recipe, art = write_component(base, log, stop, rate)
        await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(art), str(recipe))
        spool = daemon.root / "db" / "spool.db"

        def arrived_since(n: int, k: int) -> bool:
            return len(collector.ids) >= n + k

        await _until("the first messages in the cloud", lambda: arrived_since(0, 20), 30, daemon)
        for step in plan:
            mark = len(collector.ids)
            await _until("traffic on the link", lambda m=mark: arrived_since(m, int(rate * connected_s * 0.5)),
                         20, daemon)
            await asyncio.sleep(connected_s * 0.5)
            kill_now = step == "kill"
            if step.startswith("outage"):
                await relay.cut()
                at_cut = Outcome()
                read_log(log, at_cut)  # a call not yet begun now is spooled after the cut
                await asyncio.sleep(outage_s)  # the component keeps publishing: into the spool
                snapshot = await asyncio.to_thread(spooled_ids, spool)
                read_log(log, out)
                out.offline_acked.append(out.acked - at_cut.sent)
                out.disruptions.append(Disruption("outage", len(collector.ids), snapshot))
                await relay.restore()
                if step == "outage+kill":  # the backlog of the outage is being flushed: kill now
                    back = len(collector.ids)
                    await _until("the backlog flush", lambda m=back: arrived_since(m, 1), 10, daemon)
                    kill_now = True
            if kill_now:
                await asyncio.to_thread(daemon.kill9)
                await asyncio.sleep(0.3)  # what the dead daemon had written to its socket lands first
                snapshot = await asyncio.to_thread(spooled_ids, spool)
                out.disruptions.append(Disruption("kill", len(collector.ids), snapshot))
                await asyncio.to_thread(daemon.start)  # kills the orphaned component, starts a new one
                out.daemon_pids.append(daemon.proc.pid)
        stop.touch()
        read_log(log, out)

        def stopped() -> bool:
            read_log(log, out)
            return bool(out.done_runs)

        await _until("the publisher to stop", stopped, 15, daemon)
        await _until("the spool to drain", lambda: not spooled_ids(spool), 30, daemon)
        await asyncio.sleep(0.3)  # the last PUBLISH -> subscriber
        out.arrivals = list(collector.ids)
        out.by_topic = {t: list(ids) for t, ids in collector.by_topic.items()}
        for mid in set(out.arrivals):
            p = collector.payloads[mid]
            out.key_of[mid] = (str(p["run"]), int(p["n"]))
        out.seconds = time.monotonic() - t0
        return out
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(daemon.stop)
        kill_component_processes(daemon.root)
        await collector.stop()
        await relay.cut()
        shutil.rmtree(base, ignore_errors=True)


def check(out: Outcome) -> None:
    """Everything the end-to-end test asserts; the messages name what went wrong."""
    received = {out.key_of[m] for m in out.arrivals}
    # Every disruption happened: the daemon restarted, and messages acknowledged while the link was down
    # reached the cloud only after it came back.
    assert len(set(out.daemon_pids)) == 1 + sum(d.kind == "kill" for d in out.disruptions)
    epoch_of: dict[tuple[str, int], int] = {}
    for i, epoch in enumerate(out.epochs()):
        for mid in epoch:
            epoch_of.setdefault(out.key_of[mid], i)
    outages = [i for i, d in enumerate(out.disruptions) if d.kind == "outage"]
    for k, i in enumerate(outages):
        offline = out.offline_acked[k]
        assert offline, f"outage {k}: nothing was published while the link was down"
        early = [key for key in offline if epoch_of.get(key, i + 1) <= i]
        assert not early, f"outage {k}: {early[:3]} reached the cloud while the link was cut"

    # Zero loss: every message the component saw acknowledged reached the cloud.
    lost = out.acked - received
    assert not lost, f"{len(lost)} acknowledged messages never reached the cloud, e.g. {sorted(lost)[:5]}"
    # Nothing else arrived: only what was published, and without an acknowledgement only the one call in
    # flight when a daemon was killed (the publisher awaits each call, so at most one per instance).
    assert received <= out.sent, f"{sorted(received - out.sent)[:5]} were never published"
    unacked = received - out.acked
    ended = {run for run in out.last_sent if run not in out.done_runs}  # killed with their daemon
    assert all(run in ended and n == out.last_sent[run] for run, n in unacked), sorted(unacked)[:5]
    # One id per message and one message per id: the cloud can deduplicate on the id.
    ids_per_key = Counter(out.key_of.values())
    twins = [k for k, c in ids_per_key.items() if c > 1]
    assert not twins, f"{twins[:3]} were published once but arrived under two ids"

    # Duplicates: never within one connection; across a disruption only of a message that was still in the
    # spool (its PUBACK not received, or its deletion not yet durable) once the old connection was gone.
    seen: set[str] = set()
    for i, epoch in enumerate(out.epochs()):
        twice = [m for m, c in Counter(epoch).items() if c > 1]
        assert not twice, f"epoch {i}: {twice[:3]} arrived twice without a disruption in between"
        if i:
            d = out.disruptions[i - 1]
            again = {m for m in epoch if m in seen}
            acknowledged = again - d.spooled
            assert not acknowledged, (f"after {d.kind} {i}: {sorted(acknowledged)[:3]} arrived again although "
                                      "their delivery had been recorded (deleted from the spool)")
        seen.update(epoch)
    assert_ordered_first_arrivals(out.by_topic)
