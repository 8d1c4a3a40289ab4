"""Deployment figures of a real daemon: deploy → all RUNNING, rollback, start time, idle RSS.

Prints, for 1, 10 and 50 trivial components, the time from invoking `nucleus deploy` until
every component is RUNNING (settle time 0 so the figure is the nucleus's own work), the time
of a rollback of 10 components, the daemon's start time, and its idle RSS with 10
components running. Peer figures (AWS IoT Greengrass V2 Java nucleus) are quoted from its
documentation: it needs >= 96 MB of RAM; we cannot run it here (JVM + AWS account).

    .venv/bin/python benchmarks/deploy.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

NUCLEUS = [sys.executable, "-m", "nucleus"]
SETTINGS = {"deployments": {"settle_time_s": 0.0}, "restart": {"backoff_initial_s": 0.05, "max_errors": 2}}


def recipe(directory: Path, name: str, version: str, run: str) -> Path:
    doc = {
        "RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": run}}],
    }
    path = directory / f"{name}-{version}.json"
    path.write_text(json.dumps(doc))
    return path


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NUCLEUS, "--root", str(root), *args], capture_output=True, text=True, timeout=600)


def start_daemon(root: Path) -> tuple[subprocess.Popen[bytes], float]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "nucleus.yaml").write_text(yaml.safe_dump(SETTINGS))
    t0 = time.perf_counter()
    proc = subprocess.Popen([*NUCLEUS, "--root", str(root), "run"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(2000):
        if (root / "ipc.sock").exists() and cli(root, "status").returncode == 0:
            return proc, time.perf_counter() - t0
        time.sleep(0.01)
    raise SystemExit("daemon did not start")


def all_running(root: Path, names: set[str]) -> bool:
    out = cli(root, "list", "--json")
    comps = {c["name"]: c["state"] for c in json.loads(out.stdout)}
    return all(comps.get(n) == "RUNNING" for n in names)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def deploy_n(base: Path, n: int) -> float:
    root = base / f"n{n}"
    proc, _ = start_daemon(root)
    try:
        d = base / f"recipes{n}"
        d.mkdir()
        names = {f"bench.C{i:03d}" for i in range(n)}
        files = [str(recipe(d, name, "1.0.0", "exec sleep 3600")) for name in sorted(names)]
        t0 = time.perf_counter()
        out = cli(root, "deploy", *files)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        while not all_running(root, names):
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        stop(proc)


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="nucbench-", dir="/tmp"))
    try:
        print("nucleus deployment benchmark (2-core machine; trivial `exec sleep` components, settle 0 s)")
        results = {n: deploy_n(base, n) for n in (1, 10, 50)}
        for n, seconds in results.items():
            print(f"  deploy -> all RUNNING, {n:>2} components: {seconds * 1000:8.0f} ms")

        root = base / "rollback"
        proc, start_s = start_daemon(root)
        try:
            d = base / "rb"
            d.mkdir()
            names = [f"bench.R{i:02d}" for i in range(10)]
            good = [str(recipe(d, n, "1.0.0", "exec sleep 3600")) for n in names]
            out = cli(root, "deploy", *good)
            assert out.returncode == 0, out.stderr
            pid = proc.pid
            # Idle: well after the deployment, once the daemon's periodic memory release has run
            # (ipc/memory.py: heap trim + paging out library code only start-up touched).
            time.sleep(8.0)
            info = psutil.Process(pid).memory_full_info()
            rss_mb, pss_mb, uss_mb = info.rss / 1e6, info.pss / 1e6, info.uss / 1e6
            bad = [str(recipe(d, n, "2.0.0", "exit 1" if n == names[-1] else "exec sleep 3600")) for n in names]
            t0 = time.perf_counter()
            out = cli(root, "deploy", "--settle", "1", *bad)
            rollback_s = time.perf_counter() - t0
            assert "FAILED_ROLLBACK_COMPLETE" in out.stderr, out.stderr
        finally:
            stop(proc)
        print(f"  rollback of 10 components (one breaks):   {rollback_s * 1000:8.0f} ms "
              f"(includes crash/backoff cycles until BROKEN)")
        print(f"  daemon start (exec -> answering IPC):      {start_s * 1000:8.0f} ms")
        print(f"  daemon idle RSS, 10 components running:    {rss_mb:8.1f} MB   "
              f"(Greengrass V2 Java nucleus: >= 96 MB documented minimum; ratio {96 / rss_mb:.1f}x)")
        print(f"  daemon idle PSS / USS (own share / private): {pss_mb:6.1f} / {uss_mb:.1f} MB")
        goal_ok = results[10] <= 1.0
        print(f"  goal: 10 components RUNNING within 1 s: {'met' if goal_ok else 'NOT met'}; "
              f"idle RSS <= 40 MB: {'met' if rss_mb <= 40 else 'NOT met'}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
