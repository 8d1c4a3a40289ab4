"""Real parts for fleet deployment tests: an artifact server (http.server in a thread), recipes with
digests, light daemons in temporary roots, and a cloud-side reader of the devices' retained reports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt

from cloud_sync.deployment_document import RecipeText

REPO = Path(__file__).resolve().parents[2]
COMPONENT = "com.example.FleetHello"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ArtifactServer:
    """Serves ``root`` as ``<component>/<version>/<file>`` over HTTP on 127.0.0.1 (a real socket)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, component: str, version: str, name: str, data: bytes) -> str:
        """Store an artifact; its SHA-256 (hex)."""
        folder = self.root / component / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def recipe(version: str, *, digest: str, run: str | None = None, name: str = COMPONENT,
           uri: str = "s3://fleet-bucket/hello.txt") -> RecipeText:
    """A component whose artifact must be fetched and verified; by default it keeps running."""
    script = run or "read line < {artifacts:path}/hello.txt; echo \"$line\"; exec sleep 600"
    text = f"""RecipeFormatVersion: '2020-01-25'
ComponentName: {name}
ComponentVersion: {version}
ComponentConfiguration:
  DefaultConfiguration:
    greeting: hi
Manifests:
  - Platform: {{os: linux}}
    Artifacts:
      - Uri: {uri}
        Digest: '{digest}'
    Lifecycle:
      Run: {json.dumps(script)}
"""
    return RecipeText(text=text, format="yaml", source=f"{name}-{version}.yaml")


def fleet_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`nucleus fleet ARGS` as an operator runs it: its own process in ``cwd``, no daemon, and no
    NUCLEUS_* variable of the test's own environment (a password in it would change what is tested)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "nucleus", "--root", str(cwd / "no-daemon"), "fleet", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
                          env={**clean, **(env or {})})


def daemon_settings(thing: str, broker_url: str, groups: list[str]) -> dict[str, Any]:
    """Light: settle 0.5 s, small backoffs, no Greengrass socket, status checked often."""
    return {
        "thing_name": thing, "thing_groups": groups,
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.3, "max_errors": 2, "error_window_s": 60},
        "deployments": {"settle_time_s": 0.5, "default_timeout_s": 60},
        "stop_grace_s": 1.0,
        "logs": {"level": "info"},
        "ipc": {"greengrass_socket": False},
        "mqtt": {"url": broker_url, "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "heartbeat_s": 3600,
                 "status_check_s": 0.5, "durability": "normal"},
    }


class LightDaemon:
    """`nucleus run` in its own root, started without polling through the CLI (20 of them at once)."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        import yaml

        self.root = root
        self.thing = str(settings["thing_name"])
        root.mkdir(parents=True, exist_ok=True)
        (root / "nucleus.yaml").write_text(yaml.safe_dump(settings))
        self.out = root / "daemon.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
        env["PYTHONPATH"] = str(REPO)
        with self.out.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "nucleus", "--root", str(self.root), "run"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def stop(self) -> int:
        self.terminate()
        return self.wait()

    def log_text(self) -> str:
        return self.out.read_text(errors="replace")[-4000:] if self.out.exists() else ""

    def cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"nucleus {args}: {proc.stderr}\n{self.log_text()}"
        return proc.stdout

    def fleet_state(self) -> dict[str, Any]:
        return json.loads((self.root / "db" / "fleet-deployments.json").read_text())  # type: ignore[no-any-return]


@contextlib.contextmanager
def daemons(base: Path, broker_url: str, count: int, groups: list[str],
            prefix: str = "dev") -> Iterator[list[LightDaemon]]:
    made = [LightDaemon(base / f"{prefix}{i:02d}", daemon_settings(f"{prefix}-{i:02d}", broker_url, groups))
            for i in range(count)]
    try:
        for d in made:
            d.start()
        yield made
    finally:
        for d in made:
            d.terminate()
        for d in made:
            d.wait()
            _kill_components(d.root)


def _kill_components(root: Path) -> None:
    try:
        records = json.loads((root / "run" / "pids.json").read_text())
    except (OSError, ValueError):
        return
    for record in records:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(record["pgid"]), signal.SIGKILL)


async def retained(port: int, topic_filter: str, *, until: Any, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """The latest JSON document per topic under ``topic_filter``, read until ``until(docs)`` holds."""
    docs: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic_filter, qos=1)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for m in client.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                    with contextlib.suppress(ValueError):
                        docs[m.topic.value] = json.loads(payload)
                    if until(docs):
                        return docs
    raise AssertionError(f"condition not met after {time.monotonic() - deadline + timeout:.0f} s; "
                         f"last documents: {json.dumps(docs, default=str)[:3000]}")
