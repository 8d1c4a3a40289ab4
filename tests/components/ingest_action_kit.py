"""Test helpers for the ingest and protective-action tests: an in-process bus and a real Mosquitto."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ipc import Client
from ipc.core import IpcCore, Principal
from ipc.devserver import AllowList, TokenTable
from ipc.server import IpcServer

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def bus(directory: Path) -> AsyncIterator[Path]:
    """A real IPC server on a Unix socket; every principal here may use every topic."""
    names = ("test", "ingest", "action")
    core = IpcCore(TokenTable({n: Principal(n, "client") for n in names}), AllowList({n: ["*"] for n in names}))
    path = directory / "bus.sock"
    async with IpcServer(core, path):
        yield path


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
