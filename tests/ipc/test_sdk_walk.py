"""The SDK as a local application's author uses it, against a real `nucleus run` (one per module).

Each test is one thing an author did that went wrong: the connection the author lost for one oversized
payload, a closed or dropped SyncClient, Ctrl-C in a subscription loop, a request's timeout message,
a Client taken to another event loop, and errors that named what the author never passed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from ipc import Client, SyncClient, codec
from ipc.errors import ConnectionClosed, InvalidArguments, Timeout, Unauthenticated

POLICY = {"aws.greengrass.ipc.pubsub": {"app:1": {"operations": ["aws.greengrass#PublishToTopic",
                                                                 "aws.greengrass#SubscribeToTopic"],
                                                  "resources": ["sdk/*"]}}}


@pytest.fixture(scope="module")
def app(gg_daemon: Any) -> tuple[Path, str]:
    """A declared client, as docs/sdk.md section 8 makes one: (socket, token)."""
    policy_file = gg_daemon.root.parent / "sdk-app.json"
    policy_file.write_text(json.dumps(POLICY))
    out = gg_daemon.cli("client", "add", "sdk-app", "--policy", str(policy_file)).stdout
    return gg_daemon.socket, out.strip().splitlines()[-1]


def _fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ipc-sync-client"]


async def test_an_oversized_publish_is_refused_and_the_connection_stays(app: tuple[Path, str]) -> None:
    sock, token = app
    limit = 16 * 1024 * 1024
    async with Client(sock, token, name="sdk-app") as c, c.subscribe("sdk/big") as messages:
        for confirm in (True, False, None):
            with pytest.raises(InvalidArguments, match="frame limit") as err:
                await c.publish("sdk/big", b"x" * (limit + 1), confirm=confirm)
            assert err.value.details["limit"] == limit
        with pytest.raises(InvalidArguments, match="frame limit"):
            await c.request("sdk/big", b"x" * (limit + 1), timeout=1)
        # before: the server closed the connection (FRAME_TOO_LARGE): this and the subscription failed
        await c.publish("sdk/big", "small", confirm=True)
        m = await asyncio.wait_for(messages.__anext__(), 10)
        assert m.payload == "small"
        assert c.connected


async def test_a_request_timeout_names_the_topic_and_the_callers_timeout(app: tuple[Path, str]) -> None:
    sock, token = app
    async with Client(sock, token, name="sdk-app") as c, c.subscribe("sdk/svc") as calls:
        with pytest.raises(Timeout) as err:
            await c.request("sdk/svc", 1, timeout=0.3)  # a responder that never answers
        assert "'sdk/svc'" in str(err.value) and "0.3 s" in str(err.value)  # was: pubsub.request ... 5.3 s
        assert err.value.details == {"topic": "sdk/svc", "timeout": 0.3}
        assert (await asyncio.wait_for(calls.__anext__(), 5)).reply_to is not None


async def test_a_bad_queue_size_is_named_as_the_caller_passed_it(app: tuple[Path, str]) -> None:
    sock, token = app
    async with Client(sock, token, name="sdk-app") as c:
        with pytest.raises(InvalidArguments, match="queue_size"):  # was: "credit must be a positive integer"
            async with c.subscribe("sdk/q", queue_size=0):
                pass
        assert c.connected


def test_a_client_used_in_another_event_loop_says_so(app: tuple[Path, str]) -> None:
    sock, token = app
    fds = _fds()
    c = Client(sock, token, name="sdk-app")
    asyncio.run(c.connect())
    with pytest.raises(ConnectionClosed, match="event loop"):  # was: RuntimeError: Event loop is closed
        asyncio.run(c.publish("sdk/x", 1, confirm=True))
    asyncio.run(c.close())  # was: RuntimeError: Event loop is closed, and the socket left open
    assert _fds() <= fds


def test_a_closed_sync_client_raises_connection_closed(app: tuple[Path, str]) -> None:
    sock, token = app
    c = SyncClient(sock, token, name="sdk-app")
    c.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was also: RuntimeWarning coroutine ... was never awaited
        with pytest.raises(ConnectionClosed, match="closed"):  # was: RuntimeError: Event loop is closed
            c.publish("sdk/x", 1)
        with pytest.raises(ConnectionClosed):
            c.subscribe("sdk/#")
    c.close()  # twice is fine


def test_a_subscription_closed_after_its_sync_client_is_a_no_op(app: tuple[Path, str]) -> None:
    sock, token = app
    c = SyncClient(sock, token, name="sdk-app")
    sub = c.subscribe("sdk/#")
    c.close()
    sub.close()  # was: ConnectionClosed (RuntimeError before), from a cleanup that has nothing left to do
    with pytest.raises(StopIteration):
        next(sub)


def test_an_unclosed_sync_client_is_closed_when_collected(app: tuple[Path, str]) -> None:
    sock, token = app
    before_threads = len(_client_threads())
    before_fds = _fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = SyncClient(sock, token, name="sdk-app")
        c.publish("sdk/x", 1)
        del c
        gc.collect()
    assert len(_client_threads()) == before_threads  # was: one more thread (and socket) per dropped client
    assert _fds() <= before_fds
    assert any(issubclass(w.category, ResourceWarning) and "SyncClient" in str(w.message) for w in caught)


def test_ctrl_c_in_a_sync_subscription_does_not_eat_the_next_message(app: tuple[Path, str]) -> None:
    sock, token = app
    with SyncClient(sock, token, name="sdk-app") as c:
        sub = c.subscribe("sdk/k")
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                sub.get(timeout=10)
        finally:
            timer.cancel()
        c.publish("sdk/k", "next")
        assert sub.get(timeout=5).payload == "next"  # was: TimeoutError, the interrupted get took it
        sub.close()


def test_sync_update_state_takes_the_documented_message(app: tuple[Path, str]) -> None:
    sock, token = app
    with SyncClient(sock, token, name="sdk-app") as c:
        # a declared client has no lifecycle: the server refuses it, but the call is made as documented
        with pytest.raises(Exception) as err:
            c.update_state("ERRORED", message="sensor bus unreachable")
        assert not isinstance(err.value, TypeError)  # was: unexpected keyword argument 'message'


def test_an_integer_out_of_range_is_named() -> None:
    with pytest.raises(InvalidArguments, match=r"integer 1000000000000000000000 is out of range.*string"):
        codec.encode({"n": [10 ** 21]})  # was: "payload of type int cannot be encoded"


async def test_connect_twice_or_after_close_says_so(app: tuple[Path, str]) -> None:
    sock, token = app
    fds = _fds()
    c = Client(sock, token, name="sdk-app")
    await c.connect()
    one = _fds()
    async with c:  # connect() then ``async with``, as nucleus's CLI does: still one connection
        assert _fds() == one  # was: a second connection, the first one orphaned
        await c.publish("sdk/x", 1, confirm=True)
    with pytest.raises(ConnectionClosed, match="create a new Client"):  # was: "connected", yet every call failed
        await c.connect()
    assert _fds() <= fds


async def test_a_wrong_token_says_where_the_right_one_is(app: tuple[Path, str]) -> None:
    sock, _ = app
    with pytest.raises(Unauthenticated) as err:
        await Client(sock, "not-the-token", name="sdk-app").connect()
    assert "clients/NAME.token" in str(err.value) and "SVCUID" in str(err.value)  # was: "unknown token"


async def test_a_closed_client_says_it_was_closed(app: tuple[Path, str]) -> None:
    sock, token = app
    async with Client(sock, token, name="sdk-app") as c:
        await c.publish("sdk/x", 1, confirm=True)
    with pytest.raises(ConnectionClosed, match=r"is closed .*create a new Client"):  # was: "connection ... closed"
        await c.publish("sdk/x", 2)


async def test_a_daemon_killed_under_a_client_ends_its_waits_with_what_to_do(daemon_factory: Any) -> None:
    d = daemon_factory()
    policy_file = d.root.parent / "sdk-app.json"
    policy_file.write_text(json.dumps(POLICY))
    token = d.cli("client", "add", "sdk-app", "--policy", str(policy_file)).stdout.strip().splitlines()[-1]
    async with Client(d.socket, token, name="sdk-app") as c, c.subscribe("sdk/#") as messages:
        d.proc.kill()  # no goodbye from the server
        with pytest.raises(ConnectionClosed) as err:
            await asyncio.wait_for(messages.__anext__(), 20)
        assert "lost" in str(err.value) and "connect a new Client" in str(err.value)  # was: "... closed"
        with pytest.raises(ConnectionClosed, match="connect a new Client"):
            await c.call("components.list")


def test_a_second_consumer_of_one_subscription_is_refused_not_left_hanging(app: tuple[Path, str]) -> None:
    sock, token = app
    with SyncClient(sock, token, name="sdk-app") as c, c.subscribe("sdk/two") as sub:
        first: list[Any] = []
        reader = threading.Thread(target=lambda: first.append(sub.get(timeout=10).payload))
        reader.start()
        for _ in range(200):  # the first reader is waiting (bounded: 2 s)
            if sub._it._waiter is not None:  # type: ignore[attr-defined]
                break
            threading.Event().wait(0.01)
        with pytest.raises(InvalidArguments, match="one consumer"):  # was: it took the message, and ...
            sub.get(timeout=5)
        c.publish("sdk/two", "only")
        reader.join(15)
        assert first == ["only"]  # ... the first reader never woke (TimeoutError after 10 s)


async def test_a_socket_nobody_serves_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(ConnectionClosed) as err:
        await Client(tmp_path / "ipc.sock", "t").connect()
    assert "No such file" in str(err.value) and "nucleus status" in str(err.value)  # was: only the OS error


def test_a_sync_call_waits_for_its_own_timeout(app: tuple[Path, str]) -> None:
    sock, token = app
    # a request the server times out after 1.5 s: longer than the SyncClient's default wait (0.5 s);
    # was: a bare TimeoutError at 0.5 s, the call's timeout=5 ignored
    with SyncClient(sock, token, name="sdk-app", timeout=0.5) as c, c.subscribe("sdk/slow"), pytest.raises(Timeout):
        c.call("pubsub.request", {"topic": "sdk/slow", "payload": codec.encode(1), "timeout": 1.5}, timeout=5)


def test_a_sync_get_timeout_says_what_it_waited_for(app: tuple[Path, str]) -> None:
    sock, token = app
    with SyncClient(sock, token, name="sdk-app") as c, c.subscribe("sdk/quiet") as sub, \
            pytest.raises(TimeoutError, match=r"no message on 'sdk/quiet' within 0.2 s"):  # was: an empty message
        sub.get(timeout=0.2)


async def test_a_client_used_from_another_running_loop_says_so(app: tuple[Path, str]) -> None:
    sock, token = app
    async with Client(sock, token, name="sdk-app") as c:
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                asyncio.run(asyncio.wait_for(c.call("pubsub.request", {"topic": "sdk/none", "payload": None,
                                                                       "timeout": 1}), 5))
            except BaseException as exc:  # the test looks at what it was
                errors.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        await asyncio.to_thread(t.join, 15)
        assert len(errors) == 1 and isinstance(errors[0], InvalidArguments), errors  # was: RuntimeError
        assert "another event loop" in str(errors[0])
        await c.publish("sdk/x", 1, confirm=True)  # its own loop still works


def test_run_component_outside_the_nucleus_says_so_in_one_line(app: tuple[Path, str]) -> None:
    sock, _ = app
    echo = Path(__file__).parents[2] / "examples/echo_component/artifacts/com.example.Echo/1.0.0/echo.py"
    env = {k: v for k, v in os.environ.items() if k not in ("SVCUID", "NUCLEUS_IPC_SOCKET", "NUCLEUS_IPC_TOKEN")}
    for extra, said in (({}, "not running under nucleus"),
                        ({"NUCLEUS_IPC_SOCKET": str(sock), "SVCUID": "stale"}, "SVCUID is new at every daemon")):
        proc = subprocess.run([sys.executable, str(echo)], env={**env, **extra}, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 1
        assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr  # was: a traceback
