"""Flow control with the server in its own process: a stalled reader costs bounded memory and
nothing else, a lossless reader gets everything in order, the stalled one learns what it missed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ipc_testkit import RawConn, devserver_process

from ipc import Client
from ipc import protocol as P
from ipc.codec import decode

REPO = Path(__file__).resolve().parents[2]
N = 1_000_000
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


@pytest.fixture
def devserver() -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ipcf"))
    sock = d / "bus.sock"
    try:
        with devserver_process("--socket", str(sock), "--token", "pub=T-pub", "--token", "fast=T-fast", "--token",
                       "slow=T-slow", "--allow", "pub:flow/#", "--allow", "fast:flow/#", "--allow",
                       "slow:flow/#") as proc:
            yield sock, proc
    finally:
        with contextlib.suppress(OSError):
            sock.unlink()
        with contextlib.suppress(OSError):
            d.rmdir()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_stalled_reader_is_bounded_fast_reader_gets_all(
        devserver: tuple[Path, subprocess.Popen[str]]) -> None:
    sock, proc = devserver
    server = psutil.Process(proc.pid)

    slow = await RawConn.open(sock, "T-slow")
    slow.send(P.request(1, "pubsub.subscribe", {"filter": "flow/#", "queue_size": 1024}))
    assert (await slow.next_frame())[0] == P.RESPONSE
    # from here on the slow peer reads nothing: its socket and the server's buffers fill up

    async with Client(sock, "T-pub") as pub, Client(sock, "T-fast") as fast, \
            fast.subscribe("flow/#", queue_size=4096, policy="block") as messages:
        warm = 20_000
        for i in range(warm):
            await pub.publish("flow/x", i)
        it = aiter(messages)
        async with asyncio.timeout(60):
            for i in range(warm):
                assert (await anext(it)).payload == i
        rss_before = server.memory_info().rss

        async def produce() -> None:
            for i in range(warm, N):
                await pub.publish("flow/x", i)

        producer = asyncio.create_task(produce())
        expected = warm
        async with asyncio.timeout(150):
            async for m in it:
                assert m.payload == expected and m.dropped == 0
                expected += 1
                if expected == N:
                    break
        await producer
        rss_after = server.memory_info().rss
    assert expected == N
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, (rss_before, rss_after)

    # the stalled reader wakes up: it gets what was still queued, each gap announced as `dropped`
    got = 0
    dropped = 0
    last = -1
    async with asyncio.timeout(60):
        while last != N - 1:
            f = await slow.next_frame()
            assert f[0] == P.MESSAGE
            value = decode(f[6])
            assert value > last  # order kept across the gaps
            assert value - last - 1 == f[2]  # dropped counts exactly the gap
            dropped += f[2]
            got += 1
            last = value
    assert got + dropped == N and dropped > 0
    print(f"rss before={rss_before} after={rss_after} slow got={got} dropped={dropped}")
    assert got < 50_000  # it received a bounded backlog, not the whole history
    await slow.close()
