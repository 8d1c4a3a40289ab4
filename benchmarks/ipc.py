"""IPC bus benchmark: our bus through the real SDK (token auth and allow-list on) against a local
Mosquitto driven by paho-mqtt, both with TCP_NODELAY / Unix sockets, same payloads, one run.

    .venv/bin/python benchmarks/ipc.py            # full run (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/ipc.py --quick    # smaller counts, for a smoke check
    .venv/bin/python benchmarks/ipc.py --rounds 5 # median and spread of 5 interleaved rounds

Every client runs in its own process (publisher, each subscriber, the server/broker), as on a
device. Scenarios (issue #3 point 8): (a) 1 -> 1, 256 B, 200k messages, delivered msg/s;
(b) 1 -> 8 fan-out, total deliveries/s; (c) round trip p50/p99/p999 at a paced 1,000 msg/s;
(d) 64 KiB payloads, MB/s; (e) server RSS before and after. Subscribers of our bus use the
lossless ``block`` policy so that, like Mosquitto with an unbounded queue, nothing is dropped and
the publisher is paced by the slowest reader. Mosquitto needs the Debian package (`mosquitto`).

What it showed on the 2-CPU development machine (2026-11-24, ``--rounds 5``, shared with other
test runs at load average ~3; medians, per-round ratio range in brackets):

* (a) 1 -> 1: 499k msg/s vs Mosquitto 34k: 14.6x (9.4x-15.9x) (goal 5x). Before batching
  (same day, same load): 253k, 6.2x (5.7x-7.5x).
* (b) 1 -> 8: 619k deliveries/s vs 59k: 13.3x (9.1x-13.6x) (goal 10x). Before: 358k, 6.0x.
  CPU per delivery: server 0.60 us, publisher 0.08 us, each subscriber 1.59 us (before: 1.28,
  0.14, 2.54 us); Mosquitto + paho: 5.6, 1.8, 23 us.
* (c) p50 0.12 ms, p99 0.35 ms vs Mosquitto 0.14 / 0.47 ms (p99 ratio 0.33x-1.9x under that
  load; a quieter run measured 0.22 vs 0.42 ms). p999 is scheduler noise for both.
* (d) 64 KiB: 0.78 GB/s vs 0.45 GB/s (0.9x-2.1x).
* (e) server RSS: within ~1 MiB of the start once freed heap is trimmed (peaks follow the queue
  bounds: at most queue_size messages and 4 MiB of payload per subscription).

Fairness: both peers run the same process layout (broker/server, one publisher process, one
process per subscriber), the same payloads and counts, and the same window (the publisher's first
send to the last delivery at any subscriber). With ``--rounds N`` the scenarios repeat N times and
the peers alternate which one goes first, so drifting machine load hits both alike; the table
prints medians, the ratio is taken per round. CPU per delivery is printed for every process
role, measured from the moment a process is ready (interpreter start-up and imports excluded).

Developer aids: ``--only a,c`` runs some scenarios; ``IPC_BENCH_PROFILE=DIR`` writes a cProfile
dump per client process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder is sys.path[0] and this module (benchmarks/ipc.py) would
# shadow the ipc package: put the repository first instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ipc import Client  # noqa: E402

TOKEN = "bench-token"  # the devserver's table; generated per run would change nothing measured
TIMEOUT_S = 120.0
SETTLE_S = 6.0


# ----------------------------------------------------------------------------------------------- roles
def emit(**kv: Any) -> None:
    sys.stdout.write(json.dumps(kv) + "\n")
    sys.stdout.flush()


async def native_sub(cfg: dict[str, Any]) -> None:
    n = cfg["n"]
    async with Client(cfg["socket"], TOKEN, name="bench-sub") as c, \
            c.subscribe(cfg["topic"], queue_size=1024, policy="block") as ms:
        emit(ready=True)
        cpu0 = time.process_time()
        count = dropped = nbytes = 0
        first = last = 0.0

        async def consume() -> None:
            nonlocal count, dropped, nbytes, first, last
            async for m in ms:
                p = m.payload
                last = time.monotonic()
                if not count:
                    first = last
                count += 1
                dropped += m.dropped
                nbytes += len(p)
                if count + dropped >= n:
                    return

        task = asyncio.create_task(consume())
        seen = -1
        while not task.done() and seen != count:  # stop when done or idle for idle_s
            seen = count
            await asyncio.wait([task], timeout=cfg.get("idle_s", 20.0))
        task.cancel()
        emit(count=count, dropped=dropped, first=first, last=last, bytes=nbytes, cpu=time.process_time() - cpu0)


async def native_pub(cfg: dict[str, Any]) -> None:
    payload = b"x" * cfg["size"]
    topic = cfg["topic"].replace("#", "x")
    async with Client(cfg["socket"], TOKEN, name="bench-pub") as c:
        await c.publish("bench/ctl", b"", confirm=True)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for _ in range(cfg["n"]):
            await c.publish(topic, payload)
        await c.publish("bench/ctl", b"", confirm=True)  # everything before it has been routed
        emit(start=t0, end=time.monotonic(), cpu=time.process_time() - cpu0)


async def native_rtt(cfg: dict[str, Any]) -> None:
    n, rate = cfg["n"], cfg["rate"]
    lat: list[float] = []
    async with Client(cfg["socket"], TOKEN, name="bench-rtt") as c, \
            c.subscribe("bench/rtt", queue_size=8192, policy="block") as ms:
        it = aiter(ms)
        pad = b"x" * (cfg["size"] - 8)
        t_next = time.monotonic()
        for _ in range(n):
            now = time.monotonic()
            if t_next > now:
                await asyncio.sleep(t_next - now)
            t_next += 1.0 / rate
            await c.publish("bench/rtt", time.monotonic_ns().to_bytes(8, "big") + pad)
            m = await anext(it)
            lat.append((time.monotonic_ns() - int.from_bytes(m.payload[:8], "big")) / 1e6)
    emit(lat=lat)


def mqtt_client(cfg: dict[str, Any], name: str) -> Any:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}",
                    protocol=mqtt.MQTTv311)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", cfg["port"], keepalive=120)
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError("paho could not connect to mosquitto")
    return c


def mqtt_sub(cfg: dict[str, Any]) -> None:
    n = cfg["n"]
    state = {"count": 0, "first": 0.0, "last": 0.0, "bytes": 0}
    done = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        t = time.monotonic()
        if not state["count"]:
            state["first"] = t
        state["last"] = t
        state["count"] += 1
        state["bytes"] += len(msg.payload)
        if state["count"] >= n:
            done.set()

    subscribed = threading.Event()
    c = mqtt_client(cfg, "sub")
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(cfg["topic"], qos=0)
    subscribed.wait(10)
    emit(ready=True)
    cpu0 = time.process_time()
    last_seen = -1
    while not done.wait(cfg.get("idle_s", 20.0)):
        if state["count"] == last_seen:
            break
        last_seen = state["count"]
    c.loop_stop()
    c.disconnect()
    emit(count=state["count"], dropped=n - state["count"], first=state["first"], last=state["last"],
         bytes=state["bytes"], cpu=time.process_time() - cpu0)


def mqtt_pub(cfg: dict[str, Any]) -> None:
    payload = b"x" * cfg["size"]
    topic = cfg["topic"].replace("#", "x")
    c = mqtt_client(cfg, "pub")
    cpu0 = time.process_time()
    t0 = time.monotonic()
    for _ in range(cfg["n"]):
        c.publish(topic, payload, qos=0)
    info = c.publish("bench/ctl", b"", qos=1)
    info.wait_for_publish(TIMEOUT_S)
    t1 = time.monotonic()
    cpu = time.process_time() - cpu0
    c.loop_stop()
    c.disconnect()
    emit(start=t0, end=t1, cpu=cpu)


def mqtt_rtt(cfg: dict[str, Any]) -> None:
    n, rate = cfg["n"], cfg["rate"]
    got: queue.SimpleQueue[int] = queue.SimpleQueue()
    subscribed = threading.Event()
    c = mqtt_client(cfg, "rtt")
    c.on_message = lambda cl, ud, msg: got.put(time.monotonic_ns() - int.from_bytes(msg.payload[:8], "big"))
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe("bench/rtt", qos=0)
    subscribed.wait(10)
    pad = b"x" * (cfg["size"] - 8)
    lat: list[float] = []
    t_next = time.monotonic()
    for _ in range(n):
        now = time.monotonic()
        if t_next > now:
            time.sleep(t_next - now)
        t_next += 1.0 / rate
        c.publish("bench/rtt", time.monotonic_ns().to_bytes(8, "big") + pad, qos=0)
        lat.append(got.get(timeout=10) / 1e6)
    c.loop_stop()
    c.disconnect()
    emit(lat=lat)


ROLES = {
    "native-sub": lambda cfg: asyncio.run(native_sub(cfg)),
    "native-pub": lambda cfg: asyncio.run(native_pub(cfg)),
    "native-rtt": lambda cfg: asyncio.run(native_rtt(cfg)),
    "mqtt-sub": mqtt_sub,
    "mqtt-pub": mqtt_pub,
    "mqtt-rtt": mqtt_rtt,
}


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[tuple[int, psutil.Process]]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise SystemExit("mosquitto is not installed (apt-get install -y mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("mosquitto did not start")
        yield port, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def native_server(workdir: Path) -> Iterator[tuple[str, psutil.Process]]:
    sock = str(workdir / "bus.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipc.devserver", "--socket", sock, "--token", f"bench={TOKEN}",
         "--allow", "bench:bench/#", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"devserver did not start: {line!r}")
        yield sock, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------------------------------ driver
class Role:
    def __init__(self, role: str, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", role, json.dumps(cfg)],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)

    def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(10)
            raise RuntimeError(f"role exited with {self.proc.returncode} before reporting")
        return dict(json.loads(text))

    def finish(self) -> dict[str, Any]:
        out = self.line()
        self.proc.wait(TIMEOUT_S)
        return out


def throughput(kind: str, target: dict[str, Any], n: int, subs: int, size: int,
               server: psutil.Process) -> dict[str, float]:
    """One run: ``subs`` subscriber processes ready, then one publisher process sends ``n`` messages.

    The window is the same for both peers: from the publisher's first send to the last delivery
    at any subscriber. CPU figures are per delivered message and exclude process start-up.
    """
    cfg = {**target, "n": n, "size": size, "topic": "bench/t/#"}
    sub_roles = [Role(f"{kind}-sub", cfg) for _ in range(subs)]
    for r in sub_roles:
        assert r.line().get("ready")
    server_cpu0 = sum(server.cpu_times()[:2])
    pub = Role(f"{kind}-pub", cfg).finish()
    results = [r.finish() for r in sub_roles]
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu0
    delivered = max(1, sum(r["count"] for r in results))
    last = max(r["last"] for r in results)
    elapsed = last - pub["start"]
    return {"deliveries_per_s": delivered / elapsed, "delivered": delivered,
            "lost": sum(r["dropped"] for r in results),
            "mb_per_s": sum(r["bytes"] for r in results) / elapsed / 1e6,
            "elapsed": elapsed,
            "cpu_server_us": server_cpu / delivered * 1e6,
            "cpu_pub_us": pub["cpu"] / delivered * 1e6,
            "cpu_sub_us": sum(r["cpu"] for r in results) / delivered * 1e6}


def rtt(kind: str, target: dict[str, Any], n: int, rate: int) -> dict[str, float]:
    lat = sorted(Role(f"{kind}-rtt", {**target, "n": n, "rate": rate, "size": 256}).finish()["lat"])

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))]

    return {"p50": q(0.50), "p99": q(0.99), "p999": q(0.999), "mean": statistics.fmean(lat)}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return ""
    return f"{min(values):,.3g}-{max(values):,.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated scenario letters, e.g. a,b")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every scenario; the peers alternate which goes first; medians are printed")
    ap.add_argument("--greengrass", action="store_true",
                    help="instead: AWS's awsiotsdk publisher through the Greengrass front end, next to the native "
                    "SDK and Mosquitto (with --quick: fewer messages)")
    ap.add_argument("--role")
    ap.add_argument("cfg", nargs="?")
    args = ap.parse_args()
    if args.role:
        if os.environ.get("IPC_BENCH_PROFILE"):  # developer aid: one cProfile dump per role process
            import cProfile

            cProfile.runctx("ROLES[args.role](json.loads(args.cfg))", globals(), locals(),
                            f"{os.environ['IPC_BENCH_PROFILE']}/{args.role}-{os.getpid()}.prof")
            return
        ROLES[args.role](json.loads(args.cfg))
        return
    scale = 0.1 if args.quick else 1.0
    n_a, n_b, n_c, n_d = int(200_000 * scale), int(50_000 * scale), int(5_000 * scale), int(5_000 * scale)
    only = set((args.only or "a,b,c,d").split(","))
    scenarios: list[tuple[str, str, str, Any]] = []  # (key, row name, better, measure(kind) -> value)
    # rows[key] -> {"native": [..], "mqtt": [..]} per round; cpu[key] -> per round CPU split
    rows: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    lost: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ipcbench") as tmp, \
            mosquitto(Path(tmp)) as (port, mq_proc), native_server(Path(tmp)) as (sock, ns_proc):
        targets: dict[str, dict[str, Any]] = {"native": {"socket": sock}, "mqtt": {"port": port}}
        procs = {"native": ns_proc, "mqtt": mq_proc}
        rss0 = {k: p.memory_info().rss for k, p in procs.items()}
        peak = dict(rss0)

        def sample() -> None:
            for k, p in procs.items():
                peak[k] = max(peak[k], p.memory_info().rss)

        def tp(key: str, n: int, subs: int, size: int, field: str) -> Any:
            def measure(kind: str) -> float:
                res = throughput(kind, targets[kind], n, subs, size, procs[kind])
                sample()
                lost.setdefault(key, {}).setdefault(kind, 0)
                lost[key][kind] += res["lost"]
                cpu.setdefault(key, {}).setdefault(kind, []).append(
                    (res["cpu_server_us"], res["cpu_pub_us"], res["cpu_sub_us"]))
                return float(res[field])
            return measure

        if "a" in only:
            scenarios.append(("a", "(a) 1->1 256 B, msg/s", "higher", tp("a", n_a, 1, 256, "deliveries_per_s")))
        if "b" in only:
            scenarios.append(("b", "(b) 1->8 fan-out 256 B, deliveries/s", "higher",
                              tp("b", n_b, 8, 256, "deliveries_per_s")))
        if "c" in only:
            scenarios.append(("c", "(c) round trip p50/p99/p999 at 1000 msg/s, ms", "lower", None))
        if "d" in only:
            scenarios.append(("d", "(d) 1->1 64 KiB, MB/s", "higher", tp("d", n_d, 1, 64 * 1024, "mb_per_s")))
        for rnd in range(args.rounds):
            order = ("native", "mqtt") if rnd % 2 == 0 else ("mqtt", "native")
            for key, _, _, measure in scenarios:
                if key == "c":
                    res = {k: rtt(k, targets[k], n_c, 1000) for k in order}
                    sample()
                    for p in ("p50", "p99", "p999"):
                        for k in order:
                            rows.setdefault(f"c-{p}", {}).setdefault(k, []).append(res[k][p])
                    continue
                for k in order:
                    rows.setdefault(key, {}).setdefault(k, []).append(measure(k))
        rss_end = {k: p.memory_info().rss for k, p in procs.items()}
        time.sleep(SETTLE_S)  # the devserver returns freed heap pages every 5 s (malloc_trim)
        rss1 = {k: p.memory_info().rss for k, p in procs.items()}
        load = os.getloadavg()

    print(f"\nIPC benchmark ({'quick' if args.quick else 'full'}, {args.rounds} round(s), medians "
          f"[min-max]): nucleus bus (SDK, auth on, Unix socket) vs Mosquitto + paho-mqtt (TCP_NODELAY), "
          f"{os.cpu_count()} CPUs, load average at the end {load[0]:.2f} (other work on the machine "
          f"skews every figure)\n")
    print(f"{'scenario':42} {'nucleus':>12} {'mosquitto':>12} {'ratio':>8}  spread (nucleus | mosquitto | ratio)")
    named = [(k, name, better) for k, name, better, _ in scenarios if k != "c"]
    if "c" in only:
        named[2:2] = [(f"c-{p}", f"(c) round trip {p} at 1000 msg/s, ms", "lower") for p in ("p50", "p99", "p999")]
    for key, name, better in sorted(named):
        ours, theirs = rows[key]["native"], rows[key]["mqtt"]
        ratios = [o / t if better == "higher" else t / o for o, t in zip(ours, theirs, strict=True)]
        print(f"{name:42} {statistics.median(ours):12,.3f} {statistics.median(theirs):12,.3f} "
              f"{statistics.median(ratios):7.2f}x  {_spread(ours)} | {_spread(theirs)} | {_spread(ratios)}")
    print("  (ratio > 1 means nucleus is better; latency ratio = mosquitto / nucleus; the ratio is taken per"
          " round, then the median)")
    for key, per_kind in sorted(cpu.items()):
        for k in ("native", "mqtt"):
            split = per_kind[k]
            med = [statistics.median(x[i] for x in split) for i in range(3)]
            print(f"  CPU per delivery ({key}, {'nucleus' if k == 'native' else 'mosquitto':9}): server "
                  f"{med[0]:.2f} us, publisher {med[1]:.2f} us, subscribers {med[2]:.2f} us")
    for k in ("native", "mqtt"):
        print(f"(e) {'nucleus' if k == 'native' else 'mosquitto':9} RSS before {rss0[k] / 2**20:6.1f} MiB, "
              f"peak {peak[k] / 2**20:6.1f} MiB, at the end {rss_end[k] / 2**20:6.1f} MiB, "
              f"{SETTLE_S:.0f} s later {rss1[k] / 2**20:6.1f} MiB (growth {(rss1[k] - rss0[k]) / 2**20:+.1f} MiB)")
    print(f"lost messages per scenario: {lost}")


# ----------------------------------------------------------------- awsiotsdk row (issue 6, Greengrass IPC)
# ``benchmarks/ipc.py --greengrass [--quick]``: AWS's awsiotsdk publisher (GreengrassCoreIPCClientV2,
# pipelined publish_to_topic_async, 256 B binary messages) into a native subscriber, beside a native
# publisher and Mosquitto + paho measured in the same run, and the server's CPU per message. The
# server process runs both front ends (native and Greengrass) on one IpcCore, as the daemon does.
GG_WINDOW = 256  # publishes in flight per awsiotsdk client


def gg_server(cfg: dict[str, Any]) -> None:
    from ipc.core import IpcCore, Principal
    from ipc.devserver import AllowList, TokenTable
    from ipc.greengrass.server import GreengrassServer
    from ipc.server import IpcServer

    async def serve() -> None:
        core = IpcCore(TokenTable({TOKEN: Principal("bench", "component")}), AllowList({"bench": ["bench/#"]}))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        async with IpcServer(core, cfg["socket"]), GreengrassServer(core, cfg["gg_socket"]):
            print("READY", flush=True)
            await stop.wait()

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(serve())


def gg_pub(cfg: dict[str, Any]) -> None:
    from collections import deque

    from awsiot.greengrasscoreipc import connect
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage

    client = GreengrassCoreIPCClientV2(client=connect(ipc_socket=cfg["gg_socket"], authtoken=TOKEN))
    topic = cfg["topic"].replace("#", "x")
    msg = PublishMessage(binary_message=BinaryMessage(message=b"x" * cfg["size"]))
    client.publish_to_topic(topic="bench/ctl", publish_message=msg)
    inflight: deque[Any] = deque()
    t0 = time.monotonic()
    for _ in range(cfg["n"]):
        inflight.append(client.publish_to_topic_async(topic=topic, publish_message=msg))
        if len(inflight) >= GG_WINDOW:
            inflight.popleft().result(TIMEOUT_S)
    for f in inflight:
        f.result(TIMEOUT_S)
    emit(start=t0, end=time.monotonic(), cpu=time.process_time())
    client.close()


ROLES["gg-pub"] = gg_pub
ROLES["gg-sub"] = ROLES["native-sub"]
ROLES["gg-server"] = gg_server


@contextlib.contextmanager
def gg_bench_server(workdir: Path) -> Iterator[tuple[dict[str, Any], psutil.Process]]:
    target = {"socket": str(workdir / "bus.sock"), "gg_socket": str(workdir / "gg.sock")}
    proc = subprocess.Popen([sys.executable, __file__, "--role", "gg-server", json.dumps(target)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"greengrass bench server did not start: {line!r}")
        yield target, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def greengrass_main(quick: bool) -> None:
    n_native, n_gg = (20_000, 5_000) if quick else (200_000, 50_000)
    rows: list[tuple[str, float, float, int]] = []
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ggbench") as tmp, \
            mosquitto(Path(tmp)) as (port, mq_proc), gg_bench_server(Path(tmp)) as (target, server):
        for kind, label, t, n, proc in (
            ("native", "nucleus SDK publisher", target, n_native, server),
            ("gg", "awsiotsdk publisher (pipelined async)", target, n_gg, server),
            ("mqtt", "paho publisher -> Mosquitto", {"port": port}, n_native, mq_proc),
        ):
            cpu0 = sum(proc.cpu_times()[:2])
            res = throughput(kind, t, n, 1, 256, proc)
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            rows.append((label, res["deliveries_per_s"], cpu / max(1, res["delivered"]) * 1e6, int(res["lost"])))
        load = os.getloadavg()
    print(f"\nawsiotsdk row ({'quick' if quick else 'full'}): 1 publisher -> 1 subscriber (nucleus SDK, "
          f"lossless), 256 B; {os.cpu_count()} CPUs, load average {load[0]:.2f}\n")
    print(f"{'publisher':42} {'msg/s':>12} {'server CPU us/msg':>18} {'lost':>6}")
    for label, rate, cpu_us, lost in rows:
        print(f"{label:42} {rate:12,.0f} {cpu_us:18.1f} {lost:6d}")
    print("  server CPU = the bus server process (or Mosquitto) per delivered message; the awsiotsdk figure")
    print("  includes decoding the event-stream request, its JSON/base64 and the response frame.")


if __name__ == "__main__":
    if "--greengrass" in sys.argv:
        greengrass_main("--quick" in sys.argv)
    else:
        main()
