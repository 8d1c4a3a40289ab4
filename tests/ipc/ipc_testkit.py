"""Real, minimal implementations of the core's seams for tests: a token table and an allow-list.

They are implementations of the Authenticator/Authorizer Protocols (the nucleus supplies its own),
so handshake and policy paths run exactly as in production. Imported by module name because the
test folders are not packages (a ``tests/ipc`` package would shadow the real ``ipc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ipc import protocol as P
from ipc.core import Principal
from ipc.errors import Unauthenticated
from ipc.topics import matches

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def devserver_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A real ``python -m ipc.devserver`` process with ``args``, once it has said READY; stopped after."""
    proc = subprocess.Popen([sys.executable, "-m", "ipc.devserver", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until READY (or EOF if it died)
        assert line.startswith("READY"), f"devserver did not start: {line!r}"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
        "eve": [("aws.greengrass#SubscribeToTopic", "public/#"),
                ("aws.greengrass#PublishToTopic", "public/+")],
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


class RawConn:
    """A hand-driven protocol peer for tests that must send what the SDK never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = P.FrameDecoder()
        self.frames: list[P.Frame] = []

    @classmethod
    async def open(cls, path: Path | str, token: str | None = None) -> RawConn:
        reader, writer = await asyncio.open_unix_connection(str(path))
        conn = cls(reader, writer)
        if token is not None:
            conn.send(P.hello(token, "raw"))
            welcome = await conn.next_frame()
            assert welcome[0] == P.WELCOME, welcome
        return conn

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_frame(self, timeout: float = 10.0) -> P.Frame:
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("connection closed")
                self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def frames_until_closed(self, timeout: float = 10.0) -> list[P.Frame]:
        """Everything the server sends until it closes the connection (bounded by ``timeout``)."""
        out: list[P.Frame] = []
        try:
            while True:
                out.append(await self.next_frame(timeout))
        except (EOFError, ConnectionResetError):
            return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
