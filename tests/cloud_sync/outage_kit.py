"""The whole product under outages and daemon kills: shared by test_end_to_end.py and benchmarks/sync.py.

A real ``nucleus run`` daemon, its uplink going to a real Mosquitto through a TCP relay; a real
component deployed with ``nucleus deploy`` that publishes numbered messages
through the SDK (``publish_to_cloud``) at a steady rate and appends every acknowledged one to a
file (fsynced); a cloud-side persistent-session subscriber (paho, QoS 1) connected to the broker
directly. The plan interleaves 10 outages (5 link cuts at the relay, 5 broker stop/start) and 3
``kill -9`` of the daemon (restarted each time); then the publisher stops and the scenario waits
until everything spooled has arrived.

A broker restart also breaks the cloud side's own link: Mosquitto then delivers again, with the
DUP flag, what the subscriber may not have acknowledged. Those copies are the cloud leg's
at-least-once, not the device's; they are counted apart (``broker_redeliveries``) and left out of
the device's duplicates. A device's resend is a new PUBLISH, never flagged DUP.

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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sync_testkit import LinkCutter, assert_ordered_first_arrivals

from cloud_sync import envelope
from tests.conftest import FAST_SETTINGS, Daemon, kill_component_processes

THING = "e2e-dev"
TOPIC = f"fleet/{THING}/telemetry"
COMPONENT = "test.CloudCounter"
# 10 outages (link cut at the relay, or the broker stopped) and 3 daemon kills, interleaved; one kill
# lands right after the link came back, while the outage's backlog is being flushed.
PLAN = ("cut", "broker", "cut", "kill", "broker", "cut", "broker+kill", "cut", "broker", "kill", "cut", "broker")


class Broker(Protocol):
    port: int

    def stop(self) -> None: ...

    def start(self) -> None: ...


class CloudSubscriber:
    """The cloud side: paho, persistent session, QoS 1; records every envelope item in arrival order.

    paho (not aiomqtt) because the DUP flag tells a broker's redelivery to this subscriber apart
    from a new PUBLISH by the device.
    """

    def __init__(self, port: int, topic_filter: str) -> None:
        self.ids: list[str] = []
        self.by_topic: dict[str, list[str]] = {}
        self.payloads: dict[str, Any] = {}
        self.broker_redeliveries = 0
        self.malformed = 0
        self._filter = topic_filter
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id="cloud-e2e", clean_session=False)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 1)
        self._client.connect_async("127.0.0.1", port, keepalive=30)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self._filter, qos=1)
            self._ready.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:  # an exception would end paho's thread: record it as a malformed arrival instead
            _, delivered = envelope.parse(bytes(msg.payload))
        except (ValueError, KeyError, TypeError):
            delivered = [envelope.Delivered(None, None, msg.payload)]
        with self._lock:
            for d in delivered:
                if d.id is None:
                    self.malformed += 1
                    continue
                if msg.dup and d.id in self.payloads:
                    self.broker_redeliveries += 1
                    continue
                self.ids.append(d.id)
                self.by_topic.setdefault(msg.topic, []).append(d.id)
                self.payloads[d.id] = d.payload

    def copy_into(self, out: Outcome) -> None:
        with self._lock:
            out.arrivals = list(self.ids)
            out.by_topic = {t: list(ids) for t, ids in self.by_topic.items()}
            out.broker_redeliveries = self.broker_redeliveries
            out.malformed = self.malformed
            for mid in set(out.arrivals):
                p = self.payloads[mid]
                out.key_of[mid] = (str(p["run"]), int(p["n"]))

    def __len__(self) -> int:
        with self._lock:
            return len(self.ids)

    def keys(self) -> set[tuple[str, int]]:
        """(run, n) of every message received so far."""
        with self._lock:
            return {(str(p["run"]), int(p["n"])) for p in self.payloads.values()}

    def start(self, timeout: float = 10.0) -> None:
        self._client.loop_start()
        if not self._ready.wait(timeout):
            raise AssertionError("the cloud subscriber could not connect to the broker")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

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
    kind: str  # "cut" (the link, at the relay), "broker" (stopped and started) or "kill" (the daemon)
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
    broker_redeliveries: int = 0
    malformed: int = 0
    seconds: float = 0.0

    # --- derived ---------------------------------------------------------------------------------------
    def epochs(self) -> list[list[str]]:
        bounds = [0, *(d.mark for d in self.disruptions), len(self.arrivals)]
        return [self.arrivals[a:b] for a, b in itertools.pairwise(bounds)]

    def duplicates(self) -> dict[str, int]:
        """Extra copies charged to each kind of disruption ("cut", "broker", "kill"); "recorded": copies of a
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
                "duplicates_outage": dup.get("cut", 0) + dup.get("broker", 0), "duplicates_kill": dup.get("kill", 0),
                "duplicates_recorded": dup.get("recorded", 0), "broker_redeliveries": self.broker_redeliveries,
                "lost": len(self.acked - received), "outages": sum(d.kind != "kill" for d in self.disruptions),
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


async def run_scenario(broker: Broker, *, plan: tuple[str, ...] = PLAN, rate: float = 100.0,
                       connected_s: float = 1.0, outage_s: float = 0.6) -> Outcome:
    """Run the plan against a running broker on 127.0.0.1 that it may stop and start; every wait is bounded."""
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="nuc-", dir="/tmp"))  # short: the IPC socket path must fit
    relay = LinkCutter(broker.port)
    collector = CloudSubscriber(broker.port, TOPIC)
    log, stop = base / "acked.log", base / "stop"
    daemon = Daemon(base / "root", settings(relay.url))
    out = Outcome()
    try:
        await relay.restore()
        await asyncio.to_thread(collector.start)
        await asyncio.to_thread(daemon.start)
        assert daemon.proc is not None
        out.daemon_pids.append(daemon.proc.pid)
        recipe, art = write_component(base, log, stop, rate)
        await asyncio.to_thread(daemon.cli, "deploy", "--artifacts", str(art), str(recipe))
        spool = daemon.root / "db" / "spool.db"

        def arrived_since(n: int, k: int) -> bool:
            return len(collector) >= n + k

        await _until("the first messages in the cloud", lambda: arrived_since(0, 20), 30, daemon)
        for step in plan:
            mark = len(collector)
            await _until("traffic on the link", lambda m=mark: arrived_since(m, int(rate * connected_s * 0.5)),
                         20, daemon)
            await asyncio.sleep(connected_s * 0.5)
            kill_now = step == "kill"
            outage = step.split("+")[0]
            if outage in ("cut", "broker"):
                if outage == "cut":
                    await relay.cut()
                else:
                    await asyncio.to_thread(broker.stop)
                at_cut = Outcome()
                read_log(log, at_cut)  # a call not yet begun now is spooled after the cut
                await asyncio.sleep(outage_s)  # the component keeps publishing: into the spool
                snapshot = await asyncio.to_thread(spooled_ids, spool)
                read_log(log, out)
                out.offline_acked.append(out.acked - at_cut.sent)
                out.disruptions.append(Disruption(outage, len(collector), snapshot))
                if outage == "cut":
                    await relay.restore()
                else:
                    await asyncio.to_thread(broker.start)
                if step.endswith("+kill"):  # the backlog of the outage is being flushed: kill now
                    back = len(collector)
                    await _until("the backlog flush", lambda m=back: arrived_since(m, 1), 10, daemon)
                    kill_now = True
            if kill_now:
                await asyncio.to_thread(daemon.kill9)
                await asyncio.sleep(0.3)  # what the dead daemon had written to its socket lands first
                snapshot = await asyncio.to_thread(spooled_ids, spool)
                out.disruptions.append(Disruption("kill", len(collector), snapshot))
                await asyncio.to_thread(daemon.start)  # kills the orphaned component, starts a new one
                out.daemon_pids.append(daemon.proc.pid)
        stop.touch()
        read_log(log, out)

        def stopped() -> bool:
            read_log(log, out)
            return bool(out.done_runs)

        await _until("the publisher to stop", stopped, 15, daemon)
        await _until("the spool to drain", lambda: not spooled_ids(spool), 30, daemon)
        # The spool is empty once the broker has acknowledged everything; the broker may still be
        # holding some for the cloud subscriber's persistent session while that client reconnects
        # (1 s reconnect delay after the last broker restart). Wait, bounded, for the acknowledged
        # set to arrive; whatever is still missing afterwards is reported as lost by check().
        deadline = time.monotonic() + 10.0
        while not out.acked <= collector.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the last PUBLISH -> subscriber
        collector.copy_into(out)
        out.seconds = time.monotonic() - t0
        return out
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(daemon.stop)
        kill_component_processes(daemon.root)
        await asyncio.to_thread(collector.stop)
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
    outages = [i for i, d in enumerate(out.disruptions) if d.kind != "kill"]
    for k, i in enumerate(outages):
        offline = out.offline_acked[k]
        assert offline, f"outage {k}: nothing was published while the link was down"
        early = [key for key in offline if epoch_of.get(key, i + 1) <= i]
        assert not early, f"outage {k}: {early[:3]} reached the cloud while the link was cut"

    assert not out.malformed, f"{out.malformed} cloud messages were not envelopes with ids"
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
