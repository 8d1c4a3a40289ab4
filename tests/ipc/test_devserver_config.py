"""`python -m ipc.devserver --config NAME=FILE`: a component's configuration on the bare bus, read, updated
and watched with the same SDK calls it makes under the nucleus, and the file read again on SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from ipc_testkit import devserver_process

from ipc import Client, IpcError

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def devserver_args(sock: Path, *extra: str) -> list[str]:
    return ["--socket", str(sock), "--trim-interval", "0", "--token", "me=T-me", "--token", "other=T-other",
            "--allow", "me:#", *extra]


async def watching(me: Client, it: AsyncIterator[dict[str, Any]]) -> None:
    """Return once the watch is open on the server: the stream request travels on its own, so a change
    made right after opening it can come before it. Changes Threshold until one is notified (bounded)."""
    nxt = asyncio.ensure_future(anext(it))
    for i in range(50):
        await me.update_configuration(["Threshold"], 100 + i)
        done, _ = await asyncio.wait([nxt], timeout=0.2)
        if done:
            return
    nxt.cancel()
    raise AssertionError("the configuration watch never reported a change")


async def notified_until(me: Client, it: AsyncIterator[dict[str, Any]], threshold: int) -> None:
    """Notifications of Threshold until it reads ``threshold`` (a late one from ``watching`` may come first)."""
    async with asyncio.timeout(10):
        while True:
            assert await anext(it) == {"component": "me", "key_path": ["Threshold"]}
            if await me.get_configuration(["Threshold"]) == threshold:
                return


async def test_configuration_from_a_file_is_read_updated_and_watched(short_tmp: Path) -> None:
    sock, cfg = short_tmp / "bus.sock", short_tmp / "me.yaml"
    cfg.write_text("Threshold: 30\nTopic: thermo\n")
    with devserver_process(*devserver_args(sock, "--config", f"me={cfg}")) as proc:
        async with Client(sock, "T-me") as me, Client(sock, "T-other") as other:
            assert await me.get_configuration() == {"Threshold": 30, "Topic": "thermo"}
            assert await me.get_configuration(["Threshold"]) == 30
            with pytest.raises(IpcError) as missing:
                await me.get_configuration(["Nope"])
            assert missing.value.code == "INVALID_ARGUMENTS" and "/Nope" in missing.value.message
            # another principal has no file: the SDK's "no configuration store", now saying how to give one
            with pytest.raises(IpcError) as none:
                await other.get_configuration()
            assert none.value.code == "UNKNOWN_OPERATION" and "--config other=FILE" in none.value.message

            async with me.watch_configuration(["Threshold"]) as changes:
                it = aiter(changes)
                await watching(me, it)
                cfg.write_text("Threshold: 12\nTopic: thermo\n")
                os.kill(proc.pid, signal.SIGHUP)
                await notified_until(me, it, 12)
                await me.update_configuration(["Limits"], {"low": 1})  # not under the watched key
                await me.update_configuration(["Threshold"], 5)
                await notified_until(me, it, 5)
            assert await me.get_configuration() == {"Threshold": 5, "Topic": "thermo", "Limits": {"low": 1}}
            # the changed key paths are the nucleus's (ipc.config_tree, one owner): the leaves of a new
            # object, not the object's own path, and nothing for a value that is already there
            changed = await me.call("config.update", {"key_path": ["Alarm"], "value": {"levels": {"hi": 9}}})
            assert changed == {"changed": [["Alarm", "levels", "hi"]]}
            assert await me.call("config.update", {"key_path": ["Threshold"], "value": 5}) == {"changed": []}


async def test_configuration_changes_yields_each_new_configuration(short_tmp: Path) -> None:
    sock, cfg = short_tmp / "bus.sock", short_tmp / "me.json"
    cfg.write_text('{"Threshold": 30}')
    with devserver_process(*devserver_args(sock, "--config", f"me={cfg}")):
        async with Client(sock, "T-me") as me:
            seen = cast(AsyncGenerator[dict[str, Any], None],
                        me.configuration_changes(dict, errors=(ValueError,), rejected=lambda exc: None))
            nxt = asyncio.ensure_future(anext(seen))
            # the watch is open once a change reaches it: update until one does (bounded)
            for i in range(50):
                await me.update_configuration(["Threshold"], i)
                done, _ = await asyncio.wait([nxt], timeout=0.2)
                if done:
                    break
            assert nxt.done() and nxt.result()["Threshold"] in range(50)
            await seen.aclose()


@pytest.mark.parametrize(("spec", "content", "expected"), [
    ("me={file}", "[1, 2]", "a configuration is an object"),
    ("me={file}", "{not json", "me.json: "),
    ("{file}", "{}", "expected NAME=FILE"),
])
def test_bad_config_file_is_one_error_line_and_exit_2(short_tmp: Path, spec: str, content: str, expected: str) -> None:
    file = short_tmp / "me.json"
    file.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "ipc.devserver",
                           *devserver_args(short_tmp / "bus.sock", "--config", spec.format(file=file))],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert expected in proc.stderr.strip().splitlines()[-1]
