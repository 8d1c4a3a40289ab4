"""A link that accepts TCP and closes it before the CONNACK (a proxy whose broker is down, a broker at
its connection limit) must cost the backoff, not connect_timeout_s, per attempt."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.settings import SyncSettings
from cloud_sync.spool import Spool
from cloud_sync.uplink import Uplink, ignore_closed_socket_watch

pytestmark = pytest.mark.timeout(60)


async def test_connection_closed_before_connack_fails_the_attempt_at_once(tmp_path: Path) -> None:
    accepted = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(1)  # the CONNECT arrived; no CONNACK
        writer.transport.abort()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # connect_timeout_s is the ceiling of one attempt: 3 attempts would take 90 s if each waited for it.
    settings = SyncSettings(url=f"mqtt://127.0.0.1:{port}", connect_timeout_s=30, reconnect_initial_s=0.05,
                            reconnect_max_s=0.1)
    spool = Spool(tmp_path / "spool.db")
    await spool.open()
    uplink = Uplink(settings, spool, thing_name="slammed", rng=random.Random(1))
    task = asyncio.create_task(uplink.run())
    try:
        async with asyncio.timeout(20):
            while accepted < 3 or not uplink.errors or uplink.errors[-1].get("count", 1) < 2:
                await asyncio.sleep(0.02)
    finally:
        await uplink.close()
        await asyncio.wait_for(task, 10)
        await spool.close()
        server.close()
    assert [e["code"] for e in uplink.errors] == ["CONNECT_FAILED"]  # one error, counted per attempt
    assert uplink.counters["connects"] == 0


def test_settings_take_yaml_as_people_write_it_and_name_what_they_refuse() -> None:
    """`mqtt_version: 5` is a number in YAML and was refused; a misspelt key is refused by name."""
    import yaml
    from pydantic import ValidationError

    for text, version in (("mqtt_version: 5", "5"), ("mqtt_version: 3.1.1", "3.1.1"), ("mqtt_version: '5'", "5")):
        assert SyncSettings.model_validate(yaml.safe_load(text)).mqtt_version == version
    for bad in ("mqtt_version: 4", "mqtt_version: true", "urll: mqtt://127.0.0.1"):
        with pytest.raises(ValidationError, match=bad.split(":")[0]):
            SyncSettings.model_validate(yaml.safe_load(bad))


def test_the_closed_socket_handler_drops_only_that_and_keeps_the_loops_own_handler() -> None:
    """The daemon installs it on its loop (aiomqtt's connect that fails at once made asyncio log an error
    with a traceback); anything else must still reach the handler that was there before."""
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: seen.append(str(ctx.get("message"))))
        ignore_closed_socket_watch(loop)
        sock = socket.socket()
        fd = sock.fileno()
        sock.close()
        await asyncio.to_thread(loop.call_soon_threadsafe, loop.add_writer, fd, lambda: None)
        await asyncio.sleep(0)

        def other(_: Any = None) -> None:
            raise RuntimeError("something else")

        loop.call_soon(other)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(seen) == 1 and "Exception in callback" in seen[0] and "other" in seen[0]


def test_the_daemon_does_not_load_the_mqtt_client_until_a_broker_is_configured() -> None:
    """A device without a broker keeps everything in its spool; aiomqtt and paho cost about 1 MB of the
    daemon's idle RSS (README, 'daemon idle RSS'), so importing the daemon must not load them."""
    import subprocess
    import sys

    probe = ("import sys; import nucleus.daemon, nucleus.settings, cloud_sync.service; "
             "print(sorted(m for m in ('aiomqtt', 'paho', 'cloud_sync.mqtt_session') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
