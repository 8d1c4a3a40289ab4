"""The README's main command: a nucleus in a temporary root, a deployment, what it shows.

Runs the real CLI as a user would (`nucleus run`, `nucleus deploy`, `nucleus list`,
`nucleus logs`), so the demo exercises exactly what people use. Needs no broker, no cloud.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUCLEUS = [sys.executable, "-m", "nucleus"]
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


def cli(root: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run([*NUCLEUS, "--root", str(root), *args], capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).rstrip()
    if check and proc.returncode != 0:
        raise SystemExit(f"`nucleus {' '.join(args)}` failed ({proc.returncode}):\n{out}")
    return out


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="nucleus-demo-", dir="/tmp"))
    env = {**os.environ, "NUCLEUS_SETTLE_TIME_S": "1"}
    say(f"starting `nucleus run --root {root}`")
    daemon = subprocess.Popen(
        [*NUCLEUS, "--root", str(root), "run"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        sock = root / "ipc.sock"
        for _ in range(200):
            if sock.exists():
                break
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited with {daemon.returncode}; see {root}/logs/nucleus.log")
            time.sleep(0.05)
        say("daemon is up")
        recipe = REPO / "examples/hello_world/recipes/com.example.HelloWorld-1.0.0.yaml"
        say("nucleus deploy examples/hello_world/recipes/com.example.HelloWorld-1.0.0.yaml")
        print(indent(cli(root, "deploy", str(recipe))))
        say("nucleus list")
        print(indent(cli(root, "list")))
        time.sleep(3)
        say("nucleus logs com.example.HelloWorld -n 5")
        print(indent(cli(root, "logs", "com.example.HelloWorld", "-n", "5")))
        say("nucleus deployments")
        print(indent(cli(root, "deployments")))
    finally:
        say("stopping the daemon (SIGTERM): components stop in reverse dependency order")
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
