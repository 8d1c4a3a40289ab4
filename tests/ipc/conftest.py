"""Shared fixtures: a real server on a real Unix socket with an in-test token table and allow-list.

The Authenticator/Authorizer here are small but real implementations of the seams (the nucleus
supplies its own), so the server, handshake and policy paths run exactly as in production.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipc.core import IpcCore, Principal
from ipc.errors import Unauthenticated
from ipc.server import IpcServer
from ipc.topics import matches

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-eve": "eve"}


@dataclass
class TokenAuth:
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))
    seen_pids: list[int | None] = field(default_factory=list)

    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        self.seen_pids.append(peer_pid)
        name = self.tokens.get(token)
        if name is None:
            raise Unauthenticated("unknown token")
        return Principal(name, "component")


@dataclass
class Policy:
    """principal -> list of (operation or '*', resource filter)."""

    grants: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {
        "alice": [("*", "#")],
        "bob": [("*", "#")],
        "eve": [("aws.greengrass#SubscribeToTopic", "public/#"), ("aws.greengrass#PublishToTopic", "public/+")],
    })
    calls: int = 0

    def is_authorized(self, principal: Principal, service: str, operation: str, resource: str) -> bool:
        self.calls += 1
        for op, res in self.grants.get(principal.name, []):
            if op not in ("*", operation):
                continue
            if res == resource or ("+" not in resource and "#" not in resource and matches(res, resource)):
                return True
            if res == "#":
                return True
        return False


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
