"""The README's main command (`scripts/demo`): the wind-turbine demo, or the hello-world one.

* default: `examples/wind_turbine/demo.py` — train a signed model on simulated healthy data, deploy
  ingest + model + detector + protective action, inject a bearing fault, see the brake engage, reset,
  ship model v2 alone; a readable timeline. See examples/wind_turbine/README.md.
* `--hello-world`: the smallest story — a nucleus in a temporary root, one deployment, what it shows.

Both run the real CLI as a user would (`nucleus run`, `nucleus deploy`, `nucleus list`, `nucleus logs`),
so the demo exercises exactly what people use. Neither needs a broker or a cloud.
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


def hello_world() -> int:
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


def main(argv: list[str]) -> int:
    if argv[:1] in (["--hello-world"], ["hello-world"]):
        return hello_world()
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: scripts/demo [--hello-world | wind-turbine options (--keep)]")
        return 0
    wind_turbine = REPO / "examples" / "wind_turbine" / "demo.py"
    return subprocess.run([sys.executable, str(wind_turbine), *argv], cwd=REPO).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
