"""Cloud sync figures: spool write rate, backlog flush after an outage, publish-to-broker latency.

Runs a real Mosquitto on 127.0.0.1 (Debian package ``mosquitto``) and prints, in one run:

* spool write rate (durable: fsync per group commit) for 256 B and 4 KB payloads, without a
  broker and while the uplink drains to a connected broker — through ``Spool.append`` from 256
  concurrent publishers, and through IPC ``cloud.publish`` (SDK, 64 calls in flight);
* flush of a 100k-message backlog after an outage, batched envelope (ours) next to the peer:
  one aiomqtt QoS 1 publish per message (``envelope=raw``);
* end-to-end latency spool-append → broker → cloud subscriber, p50/p99, paced at 500 msg/s;
* the outage run of tests/cloud_sync/test_end_to_end.py (a real daemon, a component publishing through
  ``publish_to_cloud`` at 100 msg/s, 10 link outages and 3 ``kill -9`` of the daemon): messages sent,
  acknowledged, received, duplicates (and to which kind of disruption they are due), checked by the
  test's own rules;
* fleet deployment time for 20 devices (20 ``nucleus run`` daemons in temporary roots, artifacts over
  HTTP): publish → every device SUCCEEDED, then a failing version → every device rolled back; the
  peer is one device deployed with the local ``nucleus deploy`` CLI in the same run.

    .venv/bin/python benchmarks/sync.py [--quick] [--fleet-only] [--outages-only] [--devices N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_sync import envelope  # noqa: E402
from cloud_sync.service import MQTTPROXY, CloudSync  # noqa: E402
from cloud_sync.settings import SyncSettings  # noqa: E402
from cloud_sync.spool import NewMessage, Spool  # noqa: E402
from cloud_sync.uplink import Uplink  # noqa: E402
from ipc import Client  # noqa: E402
from ipc.core import IpcCore, Principal  # noqa: E402
from ipc.server import IpcServer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, d: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        conf = d / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nuser root\n"
                        "max_queued_messages 0\nmax_inflight_messages 0\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


class Counter:
    """Cloud side: counts delivered spooled messages (envelope items) and records latencies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.n = 0
        self.latencies: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._ready.wait()

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, max_queued_incoming_messages=0) as c:
            await c.subscribe("bench/#", qos=1)
            self._ready.set()
            async for m in c.messages:
                now = time.time()
                data = m.payload if isinstance(m.payload, bytes) else b""
                if data.startswith(b'{"v":1'):
                    _, items = envelope.parse(data)
                    self.n += len(items)
                    self.latencies.extend(now - (i.ts or now) for i in items)
                else:
                    self.n += 1

    async def wait(self, n: int, limit_s: float = 300.0) -> None:
        deadline = time.monotonic() + limit_s
        while self.n < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.n} of {n} arrived")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def settings(url: str | None, **kw: object) -> SyncSettings:
    return SyncSettings.model_validate({"url": url, "reconnect_initial_s": 0.05, **kw})


async def spool_rate(d: Path, size: int, n: int, url: str | None) -> float:
    spool = Spool(d / f"w{size}{url is not None}.db")
    await spool.open()
    uplink = Uplink(settings(url), spool, thing_name="bench") if url else None
    task = asyncio.create_task(uplink.run()) if uplink else None
    msg = NewMessage("bench/w", b"x" * size, "b")
    per = n // 256

    async def writer() -> None:
        for _ in range(per):
            await spool.append(msg)

    t = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(256)))
    rate = per * 256 / (time.perf_counter() - t)
    if uplink and task:
        await uplink.close()
        await task
    await spool.close()
    return rate


class _Auth:
    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        return Principal("bench", "component")


class _Allow:
    def is_authorized(self, principal: Principal, service: str, operation: str, resource: str) -> bool:
        return service == MQTTPROXY


async def ipc_rate(d: Path, size: int, n: int) -> float:
    core = IpcCore(_Auth(), _Allow())
    sync = CloudSync(settings(None), core, spool_path=d / f"ipc{size}.db", thing_name="bench")
    sync.register_operations()
    task = asyncio.create_task(sync.run())
    await sync.wait_ready()
    sock = Path(tempfile.mkdtemp(dir="/tmp", prefix="bs")) / "s.sock"
    payload = b"x" * size
    async with IpcServer(core, sock), Client(sock, "t") as client:
        per = n // 64

        async def caller() -> None:
            for _ in range(per):
                await client.call("cloud.publish", {"topic": "bench/ipc", "payload": payload})

        t = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(64)))
        rate = per * 64 / (time.perf_counter() - t)
    await sync.close()
    await task
    return rate


async def flush_rate(d: Path, port: int, url: str, n: int, mode: str) -> tuple[float, int]:
    path = d / f"flush-{mode}.db"
    spool = Spool(path)
    await spool.open()
    for i in range(0, n, 10_000):
        await spool.append_many([NewMessage(f"bench/f/{j % 4}", b"x" * 256, "b") for j in range(i, min(n, i + 10_000))])
    counter = Counter(port)
    await counter.start()
    uplink = Uplink(settings(url, envelope=mode), spool, thing_name="bench")
    t = time.perf_counter()
    task = asyncio.create_task(uplink.run())
    await counter.wait(n)
    while spool.stats().messages:  # noqa: ASYNC110 - polling a figure, not an event
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t
    mqtt_messages = uplink.counters["published_messages"]
    await uplink.close()
    await task
    await spool.close()
    await counter.stop()
    return n / dt, mqtt_messages


async def latency(d: Path, port: int, url: str, seconds: float) -> tuple[float, float]:
    spool = Spool(d / "lat.db")
    await spool.open()
    counter = Counter(port)
    await counter.start()
    uplink = Uplink(settings(url), spool, thing_name="bench")
    task = asyncio.create_task(uplink.run())
    while uplink.state != "connected":  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    n = int(seconds * 500)
    t0 = time.perf_counter()
    for i in range(n):
        await spool.append(NewMessage("bench/lat", b"x" * 256, "b"))
        delay = t0 + (i + 1) / 500 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await counter.wait(n)
    lat = sorted(counter.latencies[:n])
    await uplink.close()
    await task
    await spool.close()
    await counter.stop()
    return statistics.median(lat) * 1000, lat[int(len(lat) * 0.99)] * 1000


async def fleet_time(d: Path, broker_url: str, devices: int) -> dict[str, float]:
    """Seconds from `fleet deploy` to every device SUCCEEDED (and to every device rolled back)."""
    sys.path.insert(0, str(ROOT / "tests" / "cloud_sync"))
    from fleet_kit import COMPONENT, ArtifactServer, daemons, recipe

    from cloud_sync import fleet
    from cloud_sync.deployment_document import Target, new_document

    target = Target(type="group", name="bench")
    client = fleet.Broker(broker_url)
    out: dict[str, float] = {}
    with ArtifactServer(d / "artifacts") as server, daemons(d / "fleet", broker_url, devices, ["bench"]):
        t0 = time.perf_counter()
        status = await fleet.fleet_status(client, target)  # up, connected, subscribed: they have reported
        while len(status.things) < devices and time.perf_counter() - t0 < 120:
            await asyncio.sleep(0.2)
            status = await fleet.fleet_status(client, target)
        out["startup_s"] = time.perf_counter() - t0
        for key, version, run, want in (("deploy_s", "1.0.0", None, "SUCCEEDED"),
                                        ("rollback_s", "2.0.0", "exit 1", "FAILED_ROLLBACK_COMPLETE")):
            digest = server.add(COMPONENT, version, "hello.txt", b"hello\n")
            doc = new_document([recipe(version, digest=digest, run=run)], target=target,
                               artifacts_base_url=server.url)
            t0 = time.perf_counter()
            doc = await fleet.publish(client, doc)
            status = await fleet.fleet_status(client, target, wait_s=180, expect=devices)
            out[key] = time.perf_counter() - t0
            states = status.counts()
            if states.get(want) != devices:
                print(f"  warning: {key}: expected {devices} x {want}, got {states}")
        # Peer: one device, local CLI (`nucleus deploy`), same component, same settle time.
        peer = "com.example.PeerHello"
        digest = server.add(peer, "3.0.0", "hello.txt", b"hello\n")
        rec = recipe("3.0.0", digest=digest, name=peer)
        folder = d / "peer"
        (folder / "recipes").mkdir(parents=True)
        (folder / "recipes" / rec.source).write_text(rec.text.replace("s3://fleet-bucket/hello.txt",
                                                                      f"{server.url}/{peer}/3.0.0/hello.txt"))
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nucleus", "--root", str(d / "fleet" / "dev00"), "deploy", str(folder),
            "--group", "peer", "--settle", "0.5", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
        out["peer_local_deploy_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"  warning: peer nucleus deploy failed: {err.decode()[-300:]}")
    return out


async def outage_counts(d: Path) -> dict[str, int]:
    """The end-to-end test's scenario and checks (tests/cloud_sync/outage_kit.py), its counts printed.

    Its own broker (the test kit's, with persistence), since the scenario stops and starts it."""
    sys.path.insert(0, str(ROOT / "tests" / "cloud_sync"))
    from outage_kit import check, run_scenario
    from sync_testkit import Mosquitto

    broker = Mosquitto(d / "e2e-broker")
    broker.start()
    try:
        out = await run_scenario(broker)
    finally:
        broker.stop()
    c = out.counts()
    try:
        check(out)
        verdict = "checks passed"
    except AssertionError as exc:
        verdict = f"CHECK FAILED: {str(exc)[:300]}"
    print(f"{c['outages']} outages and {c['kills']} daemon kills ({out.seconds:.0f} s, a component at 100 msg/s"
          " through publish_to_cloud):")
    print(f"  sent {c['sent']}  acked {c['acked']}  received {c['received']}  duplicates {c['duplicates']}"
          f" (after outages {c['duplicates_outage']}, after kills {c['duplicates_kill']});"
          f" broker -> cloud redeliveries after broker restarts {c['broker_redeliveries']}")
    print(f"  lost {c['lost']}, duplicates of recorded deliveries {c['duplicates_recorded']}"
          f"   (goal: zero loss and zero unacknowledged duplicates) -- {verdict}")
    return {**c, "check_passed": int(verdict == "checks passed")}


async def fleet_figures(d: Path, broker: Broker, devices: int) -> dict[str, float]:
    f = await fleet_time(d, broker.url, devices)
    print(f"fleet deployment, {devices} daemons on this machine (settle 0.5 s, artifact over HTTP):")
    print(f"  daemons up and reporting     {f['startup_s']:6.1f} s")
    print(f"  publish -> all SUCCEEDED     {f['deploy_s']:6.1f} s")
    print(f"  failing version -> all FAILED_ROLLBACK_COMPLETE {f['rollback_s']:6.1f} s")
    print(f"  peer: one device, local `nucleus deploy` (CLI start + deploy + settle) {f['peer_local_deploy_s']:6.1f} s")
    return f


async def main(quick: bool, fleet_only: bool = False, devices: int = 20, outages_only: bool = False) -> None:
    d = Path(tempfile.mkdtemp(prefix="syncbench"))
    broker = Broker(d)
    n_write = 20_000 if quick else 100_000
    n_flush = 20_000 if quick else 100_000
    n_raw = 5_000 if quick else 20_000
    results: dict[str, object] = {}
    try:
        if fleet_only:
            results["fleet"] = await fleet_figures(d, broker, devices)
            return
        if outages_only:
            results["outages"] = await outage_counts(d)
            return
        print(f"spool writes, durable (fsync per group commit), {n_write} messages, 256 publishers:")
        for size in (256, 4096):
            off = await spool_rate(d, size, n_write, None)
            on = await spool_rate(d, size, n_write, broker.url)
            ipc = await ipc_rate(d, size, n_write // 2)
            results[f"spool_{size}"] = {"no_broker": off, "draining": on, "ipc": ipc}
            print(f"  {size:5d} B  no broker {off:10,.0f} msg/s   while draining {on:10,.0f} msg/s"
                  f"   via IPC cloud.publish {ipc:9,.0f} msg/s   (goal >= 20,000)")
        rate, mqtt_msgs = await flush_rate(d, broker.port, broker.url, n_flush, "batch")
        raw_rate, _ = await flush_rate(d, broker.port, broker.url, n_raw, "raw")
        results["flush"] = {"batch": rate, "raw": raw_rate, "mqtt_messages": mqtt_msgs}
        print(f"backlog flush after an outage, {n_flush} x 256 B:")
        print(f"  batch envelope  {rate:10,.0f} msg/s  ({n_flush / rate:5.1f} s, {mqtt_msgs} MQTT messages;"
              " goal 100k < 15 s)")
        print(f"  peer: one aiomqtt QoS 1 publish per message (envelope=raw, {n_raw})  {raw_rate:10,.0f} msg/s"
              f"   ratio {rate / raw_rate:5.1f}x")
        p50, p99 = await latency(d, broker.port, broker.url, 2.0 if quick else 5.0)
        results["latency_ms"] = {"p50": p50, "p99": p99}
        print(f"end-to-end spool append -> broker -> subscriber at 500 msg/s: p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        results["outages"] = await outage_counts(d)
        results["fleet"] = await fleet_figures(d, broker, devices)
    finally:
        broker.stop()
        shutil.rmtree(d, ignore_errors=True)
        print(json.dumps(results))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    ap.add_argument("--fleet-only", action="store_true", help="only the fleet deployment figures")
    ap.add_argument("--outages-only", action="store_true", help="only the 10 outages and 3 daemon kills run")
    ap.add_argument("--devices", type=int, default=20, help="fleet size (daemons on this machine)")
    cli = ap.parse_args()
    asyncio.run(main(cli.quick, cli.fleet_only, cli.devices, cli.outages_only))
