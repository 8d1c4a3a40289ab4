"""Shared fixtures: a real server on a real Unix socket in a short temporary directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ipc_testkit import Policy, TokenAuth

from ipc.core import IpcCore
from ipc.server import IpcServer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ipc"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def auth() -> TokenAuth:
    return TokenAuth()


@pytest.fixture
def policy() -> Policy:
    return Policy()


@pytest.fixture
def core(auth: TokenAuth, policy: Policy) -> IpcCore:
    return IpcCore(auth, policy)


@pytest.fixture
async def server(core: IpcCore, sock_dir: Path) -> AsyncIterator[IpcServer]:
    async with IpcServer(core, sock_dir / "bus.sock", handshake_timeout=1.0) as srv:
        yield srv
