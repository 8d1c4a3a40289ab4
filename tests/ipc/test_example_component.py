"""The documented example component, run as a real process by ``run_component`` against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ipc import Client
from ipc.core import CallContext, IpcCore
from ipc.server import IpcServer

REPO = Path(__file__).resolve().parents[2]
ECHO = REPO / "examples" / "echo_component" / "artifacts" / "com.example.Echo" / "1.0.0" / "echo.py"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def states(core: IpcCore) -> list[tuple[str, str]]:
    """The nucleus's `state.update` op, as the lifecycle would receive it."""
    seen: list[tuple[str, str]] = []

    async def update_state(ctx: CallContext, args: dict[str, Any]) -> None:
        seen.append((ctx.principal.name, args["state"]))
        if "message" in args:  # the component's own reason, with ERRORED
            seen.append((ctx.principal.name, args["message"]))

    core.register("state.update", update_state)
    return seen


async def start(script: Path, server: IpcServer, token: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "NUCLEUS_IPC_SOCKET": str(server.socket_path), "SVCUID": token,
           "NUCLEUS_COMPONENT_NAME": "com.example.Echo"}
    return await asyncio.create_subprocess_exec(sys.executable, str(script), *args, env=env, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)


async def wait_for_subscriber(server: IpcServer, topic_filter: str) -> None:
    for _ in range(1000):  # bounded: the component subscribes within a few hundred ms
        if any(s.filter == topic_filter for s in server.core.bus.subscriptions()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nobody subscribed to {topic_filter}")


async def test_echo_component_end_to_end(server: IpcServer, states: list[tuple[str, str]]) -> None:
    proc = await start(ECHO, server, "tok-bob", "echo")
    try:
        await wait_for_subscriber(server, "echo/in")
        assert states == [("bob", "RUNNING")]
        async with Client(server.socket_path, "tok-alice") as c, c.subscribe("echo/out") as out:
            assert await c.request("echo/in", {"n": 1}) == {"echo": {"n": 1}, "count": 1}
            await c.publish("echo/in", "plain")
            async with asyncio.timeout(10):
                m = await anext(aiter(out))
            assert m.payload == {"echo": "plain", "count": 2, "from": "alice"} and m.sender == "bob"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_failing_component_reports_errored_and_exits_1(server: IpcServer, sock_dir: Path,
                                                             states: list[tuple[str, str]]) -> None:
    script = sock_dir / "bad.py"
    script.write_text(textwrap.dedent("""
        from ipc import run_component

        async def main(client):
            raise RuntimeError("sensor unplugged")

        run_component(main)
    """))
    proc = await start(script, server, "tok-bob")
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 1
    assert states == [("bob", "RUNNING"), ("bob", "ERRORED"), ("bob", "RuntimeError: sensor unplugged")]
    assert b"sensor unplugged" in out


async def test_component_with_wrong_token_fails_fast(server: IpcServer) -> None:
    proc = await start(ECHO, server, "not-a-token")
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode != 0
    assert b"UNAUTHENTICATED" in out
