"""Soak a real daemon under churn and print how its resources move, phase by phase.

What a device left running for months must not do: grow per deployment, per IPC connection,
per crash loop or per log line. This script starts ``nucleus run`` in a temporary root and
drives it through the SDK (the CLI token), in phases:

  deploy   version upgrades 1.0.0 → 1.0.1 → …, config-only updates, a failing version that
           rolls back, removals and re-adds (each version carries a small artifact)
  ipc      connections that call and close, clients killed mid-request, subscriptions
           abandoned without unsubscribing (child processes killed with SIGKILL)
  gg       awsiotsdk clients on the Greengrass socket: subscribe, publish, then close or SIGKILL
  logs     a component that prints fast, past several rotations (cap = (backup_count+1) * max_bytes)
  crash    a component that crash-loops to BROKEN and is redeployed
  names    components with new names deployed and removed (what each name leaves behind)
  restarts the daemon stopped and killed -9 in turn, and started again

After every chunk it samples the daemon: RSS, open fds, threads, asyncio tasks (a thread in the
daemon process writes their count), child and zombie processes, the size of every top-level
folder under the root, and the rows of the journal's tables. It prints one line per sample
and no verdict: a figure that climbs chunk after chunk is the thing to look at. After each
phase it prints which kinds of live objects grew in the daemon over it (after a full collection).

    .venv/bin/python benchmarks/soak.py                      # all phases, default counts
    .venv/bin/python benchmarks/soak.py --phases deploy --deployments 400
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipc import Client  # noqa: E402
from ipc.errors import IpcError  # noqa: E402

# Runs `nucleus run` with a sampler thread that writes the asyncio task count (and the most common
# coroutines) next to the root once a second; asyncio.tasks._all_tasks holds C tasks too on 3.11.
_WRAPPER = r"""
import asyncio, collections, gc, json, os, sys, threading, time
out = sys.argv[1]

def count():
    for _ in range(5):
        try:
            tasks = list(asyncio.tasks._all_tasks)
            break
        except RuntimeError:
            continue
    else:
        return None
    names = collections.Counter(getattr(t.get_coro(), "__qualname__", "?") for t in tasks if not t.done())
    return {"tasks": sum(names.values()), "top": names.most_common(6),
            "blocks": sys.getallocatedblocks(), "objects": len(gc.get_objects())}

def held_by(obj, depth=0):
    # who holds a finished task: up to three levels of containers, named by their owners
    if depth > 3:
        return "?"
    names = []
    for r in gc.get_referrers(obj):
        if type(r).__name__ in ("frame", "list_iterator") or r is held_by.__code__:
            continue
        if isinstance(r, (list, dict, set, tuple)) or type(r).__name__ in ("cell", "deque", "WeakSet"):
            names.append(type(r).__name__ + "<" + held_by(r, depth + 1) + ">")
        else:
            names.append(getattr(r, "__qualname__", type(r).__qualname__))
    return ",".join(sorted(set(names))[:3])

def dump():
    gc.collect()  # what is left is held, not garbage waiting for a full collection
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    for o in gc.get_objects():
        if type(o).__name__ == "ReferenceType":
            target = o()
            types["weakref to " + type(target).__qualname__] += 1
            if target is None:
                types["dead weakref held by " + held_by(o)] += 1
    for t in list(asyncio.tasks._all_tasks):
        if t.done():
            types["done-task " + getattr(t.get_coro(), "__qualname__", "?") + " held by " + held_by(t)] += 1
    return types

def sample():
    while True:
        time.sleep(1.0)
        figures = count()
        if figures is not None:
            with open(out + ".tmp", "w") as fh:
                json.dump(figures, fh)
            os.replace(out + ".tmp", out)
        figures = None
        if os.path.exists(out + ".want"):  # the soak asks for live objects by type, to diff two moments
            with open(out + ".types.tmp", "w") as fh:
                json.dump(dump(), fh)
            os.replace(out + ".types.tmp", out + ".types")
            os.unlink(out + ".want")

threading.Thread(target=sample, daemon=True).start()
from nucleus.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).lstat().st_size
    return total


def _children(pid: int) -> tuple[int, int]:
    """(live descendants, zombies among them) of ``pid``."""
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        entry = proc.name
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        states[int(entry)] = rest[0]
        parents[int(entry)] = int(rest[1])
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in seen:
                seen.add(child)
                todo.append(child)
    return len(seen), sum(1 for c in seen if states.get(c) == "Z")


class Soak:
    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.tasks_file = root.parent / "soak-tasks.json"
        root.mkdir(parents=True, exist_ok=True)
        (root / "nucleus.yaml").write_text(json.dumps(settings))
        self.proc: subprocess.Popen[bytes] | None = None
        self.work = root.parent / "soak-work"
        self.work.mkdir(exist_ok=True)
        self.samples: list[dict[str, Any]] = []

    # --- the daemon --------------------------------------------------------------------------------
    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
        out = open(self.root.parent / "daemon.out", "ab")  # noqa: SIM115 - the daemon's whole life
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(self.tasks_file), "--root", str(self.root), "run"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
        token = self.root / "run" / "cli.token"
        for _ in range(300):
            if token.exists() and (self.root / "ipc.sock").exists():
                try:
                    asyncio.run(self._ping())
                    return
                except (OSError, IpcError):  # the socket a killed daemon left, or one still starting
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited at start")
            time.sleep(0.1)
        raise RuntimeError("daemon did not come up")

    async def _ping(self) -> None:
        async with self.client() as c:
            await c.call("nucleus.status")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def client(self, name: str = "soak") -> Client:
        return Client(self.root / "ipc.sock", (self.root / "run" / "cli.token").read_text().strip(), name=name)

    # --- sampling ----------------------------------------------------------------------------------
    def sample(self, label: str) -> dict[str, Any]:
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kb = int(fields["VmRSS"].split()[0])
        threads = int(fields["Threads"])
        fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
        children, zombies = _children(pid)
        tasks: Any = "?"
        blocks: Any = "?"
        with contextlib.suppress(OSError, ValueError):
            inside = json.loads(self.tasks_file.read_text())
            tasks, blocks = inside["tasks"], f"{inside['blocks'] // 1000}k/{inside['objects'] // 1000}k"
        disk = {p.name: _du(p) for p in sorted(self.root.iterdir()) if p.is_dir()}
        rows: dict[str, int] = {}
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{self.root / 'db' / 'nucleus.db'}?mode=ro", uri=True, timeout=5)
            for table in ("deployments", "events"):
                rows[table] = db.execute(f"select count(*) from {table}").fetchone()[0]
            db.close()
            db = sqlite3.connect(f"file:{self.root / 'db' / 'spool.db'}?mode=ro", uri=True, timeout=5)
            rows["spool"] = db.execute("select count(*) from messages").fetchone()[0]
            db.close()
        s = {"label": label, "rss_mb": round(rss_kb / 1024, 1), "fds": fds, "threads": threads,
             "tasks": tasks, "heap_blocks/objects": blocks, "children": children, "zombies": zombies, "rows": rows,
             "disk_kb": {k: v // 1024 for k, v in disk.items()}}
        self.samples.append(s)
        disk_text = " ".join(f"{k}={v}" for k, v in s["disk_kb"].items() if v)
        print(f"{label:<22} rss={s['rss_mb']:>5}MB fds={fds:>3} thr={threads:>2} tasks={tasks!s:>3} "
              f"blk/obj={blocks} child={children:>2} zomb={zombies} rows={rows} disk_kb[{disk_text}]", flush=True)
        return s

    def object_types(self) -> dict[str, int]:
        """Live objects by type in the daemon (gc-tracked ones), from its sampler thread."""
        want = Path(f"{self.tasks_file}.want")
        types = Path(f"{self.tasks_file}.types")
        types.unlink(missing_ok=True)
        want.write_text("")
        for _ in range(50):
            if types.exists() and not want.exists():
                return dict(json.loads(types.read_text()))
            time.sleep(0.1)
        return {}

    def print_growth(self, before: dict[str, int], label: str) -> None:
        after = self.object_types()
        grown = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in after), reverse=True)[:14]
        print(f"  objects grown over {label}: " + ", ".join(f"{k} +{n}" for n, k in grown if n > 0))

    def top_tasks(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(self.tasks_file.read_text())["top"])
        return "?"

    # --- deployments -------------------------------------------------------------------------------
    def recipe(self, name: str, version: str, run: str, *, config: dict[str, Any] | None = None,
               artifact_kb: int = 0, install: str | None = None) -> dict[str, Any]:
        artifacts = []
        if artifact_kb:
            art = self.work / f"{name}-{version}.bin"
            art.write_bytes(os.urandom(artifact_kb * 1024))
            digest = base64.b64encode(hashlib.sha256(art.read_bytes()).digest()).decode()
            artifacts.append({"URI": art.as_uri(), "Digest": digest, "Algorithm": "SHA-256"})
        doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
               "ComponentConfiguration": {"DefaultConfiguration": config or {}},
               "Manifests": [{"Platform": {"os": "linux"}, "Artifacts": artifacts,
                              "Lifecycle": {"Run": run, **({"Install": install} if install else {})}}]}
        return {"source": f"{name}-{version}.json", "text": json.dumps(doc), "format": "json"}

    async def deploy(self, c: Client, *, recipes: list[dict[str, Any]] = (),  # type: ignore[assignment]
                     roots: dict[str, str] | None = None, remove: list[str] | None = None,
                     config: dict[str, Any] | None = None, policy: str = "ROLLBACK") -> str:
        request = {"group": "soak", "recipes": list(recipes),
                   "root_components": {n: f"={v}" for n, v in (roots or {}).items()},
                   "remove": remove or [], "artifact_dirs": [], "config_updates": config or {},
                   "failure_policy": policy, "settle_time_s": 0, "timeout_s": 60}
        created = await c.call("deployments.create", request)
        async with c.stream("deployments.watch", {"id": created["id"]}) as events:
            async for event in events:
                if event.get("event") == "finished":
                    return str(event["status"])
        return "?"

    async def phase_deploy(self, count: int, every: int) -> None:
        run = "exec sleep 600"
        async with self.client() as c:
            patch = 0
            await self.deploy(c, recipes=[self.recipe("soak.App", "1.0.0", run, artifact_kb=64)],
                              roots={"soak.App": "1.0.0"})
            outcomes: dict[str, int] = {}
            for i in range(1, count + 1):
                kind = i % 5
                if kind == 0:  # upgrade
                    patch += 1
                    st = await self.deploy(c, recipes=[self.recipe("soak.App", f"1.0.{patch}", run, artifact_kb=64)],
                                           roots={"soak.App": f"1.0.{patch}"})
                elif kind == 1:  # config only
                    st = await self.deploy(c, config={"soak.App": {"merge": {"n": i}}})
                elif kind == 2:  # a failing version that rolls back
                    st = await self.deploy(c, recipes=[self.recipe("soak.App", f"9.0.{i}", run, install="exit 3",
                                                                   artifact_kb=64)],
                                           roots={"soak.App": f"9.0.{i}"})
                elif kind == 3:  # remove a second component
                    st = await self.deploy(c, remove=["soak.Side"])
                else:  # re-add it
                    st = await self.deploy(c, recipes=[self.recipe("soak.Side", "1.0.0", run)],
                                           roots={"soak.Side": "1.0.0"})
                outcomes[st] = outcomes.get(st, 0) + 1
                if i % every == 0:
                    self.sample(f"deploy {i}")
            print(f"  outcomes {outcomes}; tasks {self.top_tasks()}")

    async def phase_names(self, count: int, every: int) -> None:
        """Components with new names deployed then removed: what is left per name once it is gone."""
        async with self.client() as c:
            for i in range(1, count + 1):
                name = f"soak.Gone{i}"
                await self.deploy(c, recipes=[self.recipe(name, "1.0.0", "exec sleep 600", config={"k": i})],
                                  roots={name: "1.0.0"})
                await self.deploy(c, remove=[name])
                if i % every == 0:
                    self.sample(f"names {i}")
        left = {d: sorted(p.name for p in (self.root / d).iterdir() if "Gone" in p.name)[:3]
                for d in ("config", "work", "logs", "clients", "packages/recipes") if (self.root / d).is_dir()}
        print(f"  left behind by removed components (first 3 each): {left}")

    def phase_restarts(self, count: int, every: int) -> None:
        """The daemon stopped (SIGTERM) and killed (SIGKILL), alternately, and started again."""
        for i in range(1, count + 1):
            assert self.proc is not None
            if i % 2:
                self.stop()
            else:
                self.proc.kill()
                self.proc.wait(10)
            self.start()
            if i % every == 0:
                time.sleep(1.0)
                self.sample(f"restart {i}")

    # --- IPC churn ---------------------------------------------------------------------------------
    async def phase_ipc(self, count: int, every: int) -> None:
        killer = self.work / "killed_client.py"
        killer.write_text(
            "import asyncio, os, signal, sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from ipc import Client\n"
            "async def main():\n"
            "    c = Client(sys.argv[1], open(sys.argv[2]).read().strip(), name='killed')\n"
            "    await c.connect()\n"
            "    subs = [c.subscribe(f'soak/t{i}/#') for i in range(3)]\n"
            "    for s in subs: await s.__aenter__()\n"
            "    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGKILL)\n"
            "    await c.call('pubsub.request', {'topic': 'soak/nobody', 'payload': None, 'timeout': 30}, timeout=60)\n"
            "asyncio.run(main())\n")
        sock, token = str(self.root / "ipc.sock"), str(self.root / "run" / "cli.token")
        for i in range(1, count + 1):
            kind = i % 4
            if kind == 0:  # killed mid-request, with subscriptions open (a separate process, SIGKILL)
                proc = await asyncio.create_subprocess_exec(sys.executable, str(killer), sock, token,
                                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await proc.wait()
            elif kind == 1:  # connect, call, close cleanly
                async with self.client() as c:
                    await c.call("nucleus.status")
            elif kind == 2:  # subscriptions abandoned: the connection is dropped without unsubscribing
                c = self.client()
                await c.connect()
                for t in range(3):
                    cm = c.subscribe(f"soak/a{t}/#")
                    await cm.__aenter__()
                c._transport.abort() if getattr(c, "_transport", None) else None  # type: ignore[attr-defined]
                await c.close()
            else:  # an open stream abandoned mid-way (logs follow)
                c = self.client()
                await c.connect()
                cm = c.stream("logs.tail", {"name": "soak.App", "lines": 1, "follow": True})
                await cm.__aenter__()
                await c.close()
            if i % every == 0:
                await asyncio.sleep(0.3)  # the server notices the last disconnects
                self.sample(f"ipc {i}")
        print(f"  tasks {self.top_tasks()}")

    # --- Greengrass IPC churn (awsiotsdk in child processes) ---------------------------------------
    async def phase_gg(self, count: int, every: int) -> None:
        script = self.work / "gg_client.py"
        script.write_text(
            "import os, signal, sys, time\n"
            "from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2\n"
            "from awsiot.greengrasscoreipc.model import BinaryMessage, PublishMessage\n"
            "c = GreengrassCoreIPCClientV2()\n"
            "for t in range(3):\n"
            "    c.subscribe_to_topic(topic=f'soak/gg{t}', on_stream_event=lambda e: None)\n"
            "m = PublishMessage(binary_message=BinaryMessage(message=b'x'))\n"
            "c.publish_to_topic(topic='soak/gg0', publish_message=m)\n"
            "if sys.argv[1] == 'kill':\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "c.close()\n")
        env = {**os.environ, "SVCUID": (self.root / "run" / "cli.token").read_text().strip(),
               "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(self.root / "gg.sock")}
        failures = 0
        for i in range(1, count + 1):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), "kill" if i % 2 else "close", env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _out, err = await proc.communicate()
            if proc.returncode not in (0, -signal.SIGKILL):
                failures += 1
                if failures == 1:
                    print(f"  gg client failed ({proc.returncode}): {err.decode()[-400:]}")
            if i % every == 0:
                await asyncio.sleep(0.3)
                self.sample(f"gg {i}")
        print(f"  gg client failures {failures}; tasks {self.top_tasks()}")

    # --- logs ----------------------------------------------------------------------------------------
    async def phase_logs(self, megabytes: int, max_bytes: int, backups: int) -> None:
        # About 2500 lines (560 KB) a second: slower than a follower reads, so a gap is a lost line.
        run = ("python3 -c \"import sys, time\nline='x'*200\nn=0\nwhile True:\n"
               " n+=1\n sys.stdout.write(f'{n} {line}\\n')\n"
               " (sys.stdout.flush(), time.sleep(0.02)) if n % 50 == 0 else None\"")
        async with self.client() as c:
            st = await self.deploy(c, recipes=[self.recipe("soak.Loud", "1.0.0", run)], roots={"soak.Loud": "1.0.0"})
            print(f"  loud component: {st}")
            follower = asyncio.create_task(self._follow("soak.Loud"))
            log = self.root / "logs" / "soak.Loud.log"
            written = 0
            deadline = time.monotonic() + 300
            while written < megabytes * 1024 * 1024 and time.monotonic() < deadline:
                await asyncio.sleep(2)
                files = sorted(log.parent.glob("soak.Loud.log*"))
                total = sum(f.stat().st_size for f in files)
                written = self.followed_bytes
                cap = (backups + 1) * max_bytes
                print(f"  logs: files={len(files)} on_disk_kb={total // 1024} cap_kb={cap // 1024} "
                      f"followed_kb={written // 1024} followed_gaps={self.follow_gaps}", flush=True)
            self.sample("logs")
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self.deploy(c, remove=["soak.Loud"])
            self.sample("logs removed")

    followed_bytes = 0
    follow_gaps = 0

    async def _follow(self, name: str) -> None:
        last = 0
        async with self.client() as c, c.stream("logs.tail", {"name": name, "lines": 0, "follow": True}) as lines:
            async for line in lines:
                self.followed_bytes += len(line) + 1
                parts = line.split("] ", 2)
                text = parts[-1] if parts else ""
                num = text.split(" ", 1)[0]
                if num.isdigit():
                    n = int(num)
                    if last and n != last + 1:
                        self.follow_gaps += 1
                    last = n

    # --- crash loops ---------------------------------------------------------------------------------
    async def phase_crash(self, cycles: int, every: int) -> None:
        broken = 0
        async with self.client() as c:
            for i in range(1, cycles + 1):
                # A new version each time: do-nothing leaves it BROKEN; a good one then replaces it.
                st = await self.deploy(c, recipes=[self.recipe("soak.Crash", f"1.{i}.0", "exit 1")],
                                       roots={"soak.Crash": f"1.{i}.0"}, policy="DO_NOTHING")
                for _ in range(200):  # until the restarts run out (max_errors): BROKEN
                    state = (await c.get_component("soak.Crash"))["state"]
                    if state == "BROKEN":
                        break
                    await asyncio.sleep(0.05)
                broken += state == "BROKEN"
                st2 = await self.deploy(c, recipes=[self.recipe("soak.Crash", f"1.{i}.1", "exec sleep 600")],
                                        roots={"soak.Crash": f"1.{i}.1"})
                if i % every == 0:
                    self.sample(f"crash {i} ({st[:10]}/{st2[:9]})")
            print(f"  went BROKEN {broken}/{cycles}; tasks {self.top_tasks()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="deploy,ipc,gg,logs,crash,names,restarts")
    ap.add_argument("--deployments", type=int, default=250)
    ap.add_argument("--clients", type=int, default=1200)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--names", type=int, default=50)
    ap.add_argument("--gg-clients", type=int, default=200)
    ap.add_argument("--crash-cycles", type=int, default=50)
    ap.add_argument("--log-mb", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the root for inspection")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    max_bytes, backups = 256 * 1024, 3
    settings = {"restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_errors": 3, "error_window_s": 60},
                "deployments": {"settle_time_s": 0, "default_timeout_s": 60},
                "logs": {"max_bytes_per_file": max_bytes, "backup_count": backups},
                "stop_grace_s": 1.0}
    soak = Soak(base / "root", settings)
    phases: dict[str, Callable[[], Any]] = {
        "deploy": lambda: soak.phase_deploy(args.deployments, max(1, args.deployments // 10)),
        "ipc": lambda: soak.phase_ipc(args.clients, max(1, args.clients // 10)),
        "restarts": lambda: asyncio.to_thread(soak.phase_restarts, args.restarts, max(1, args.restarts // 5)),
        "names": lambda: soak.phase_names(args.names, max(1, args.names // 5)),
        "gg": lambda: soak.phase_gg(args.gg_clients, max(1, args.gg_clients // 10)),
        "logs": lambda: soak.phase_logs(args.log_mb, max_bytes, backups),
        "crash": lambda: soak.phase_crash(args.crash_cycles, max(1, args.crash_cycles // 10)),
    }
    try:
        soak.start()
        time.sleep(1.5)
        soak.sample("start")
        for name in args.phases.split(","):
            t0 = time.monotonic()
            print(f"== {name}")
            before = soak.object_types()
            asyncio.run(phases[name]())
            soak.print_growth(before, name)
            print(f"   {name}: {time.monotonic() - t0:.0f} s")
    finally:
        soak.stop()
        print(f"root: {soak.root}" if args.keep else "")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
