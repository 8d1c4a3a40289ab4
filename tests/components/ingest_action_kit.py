"""Test helpers for the ingest and protective-action tests: an in-process bus, the protective action as
a real process on it, and a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc import Client
from ipc.core import IpcCore, Principal
from ipc.devserver import AllowList, TokenTable
from ipc.server import IpcServer

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def bus_server(directory: Path) -> AsyncIterator[IpcServer]:
    """A real IPC server on a Unix socket; every principal here (token = name) may use every topic."""
    names = ("test", "ingest", "action")
    core = IpcCore(TokenTable({n: Principal(n, "client") for n in names}), AllowList({n: ["*"] for n in names}))
    async with IpcServer(core, directory / "bus.sock") as server:
        yield server


@contextlib.asynccontextmanager
async def bus(directory: Path) -> AsyncIterator[Path]:
    async with bus_server(directory) as server:
        yield server.socket_path


@contextlib.asynccontextmanager
async def action_component(server: IpcServer, config: dict[str, Any], directory: Path
                           ) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m components.protective_action`` as its own process on ``server``, as principal ``action``,
    with ``config`` as its ``--config`` file and its audit log (and ``action.log``, its output) in
    ``directory``; yielded once it listens for anomalies and resets, stopped with SIGTERM (and killed if
    that does not end it) afterwards."""
    cfg = directory / "action.json"
    cfg.write_text(json.dumps(config))
    output = directory / "action.log"
    env = {**os.environ, "NUCLEUS_IPC_SOCKET": str(server.socket_path), "SVCUID": "action"}
    with output.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "components.protective_action", "--config", str(cfg), "--audit-dir",
            str(directory), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wanted = {"anomaly/+", "control/+/reset"}
        for _ in range(2000):  # bounded: the component subscribes within a second or two
            if proc.returncode is not None:
                raise RuntimeError(f"the action exited {proc.returncode}: {output.read_text(errors='replace')}")
            if wanted <= {s.filter for s in server.core.bus.subscriptions()}:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the action did not subscribe to anomaly/+ and control/+/reset within 20 s")
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def client(path: Path, name: str = "test") -> Client:
    return Client(path, name, name=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto(directory: Path, port: int | None = None) -> Iterator[int]:
    """A real Mosquitto broker on 127.0.0.1 and a free port (or ``port``: a broker restarted where the
    last one was); skips when the binary is missing."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    port = port or free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("mosquitto did not listen within 10 s")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
