"""The native server and the SDK end to end, on a real Unix socket with real auth seams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ipc_testkit import RawConn, TokenAuth

from ipc import Client, SyncClient
from ipc import protocol as P
from ipc.codec import decode, encode
from ipc.core import NUCLEUS, CallContext, IpcCore
from ipc.errors import (
    ConnectionClosed,
    FrameTooLarge,
    InvalidArguments,
    IpcError,
    ProtocolError,
    Timeout,
    Unauthenticated,
    Unauthorized,
    UnknownOperation,
    from_wire,
)
from ipc.server import IpcServer

pytestmark = pytest.mark.timeout(60)


def path_of(server: IpcServer) -> Path:
    return server.socket_path


async def take(it: AsyncIterator[Any], n: int, timeout: float = 10.0) -> list[Any]:
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(n):
            out.append(await anext(it))
    return out


async def test_socket_is_owner_only(server: IpcServer) -> None:
    assert stat.S_IMODE(path_of(server).stat().st_mode) == 0o600


async def test_handshake_names_principal_and_pid_reaches_authenticator(server: IpcServer,
                                                                       auth: TokenAuth) -> None:
    async with Client(path_of(server), "tok-alice", name="t1") as c:
        assert c.principal == "alice"
        assert c.server_limits["max_frame"] == P.DEFAULT_MAX_FRAME
        assert auth.seen_pids[-1] == os.getpid()  # SO_PEERCRED
        info = server.core.sessions()
        assert [(i.principal.name, i.pid, i.name) for i in info] == [("alice", os.getpid(), "t1")]


@pytest.mark.parametrize("token", ["wrong", ""])
async def test_unknown_or_missing_token_is_refused(server: IpcServer, token: str) -> None:
    with pytest.raises(Unauthenticated):
        async with Client(path_of(server), token):
            pass
    assert server.core.sessions() == []


async def test_hello_without_token_field_is_refused(server: IpcServer) -> None:
    raw = await RawConn.open(path_of(server))
    raw.send(P.encode_frame([P.HELLO, P.PROTOCOL_VERSION, None, None]))
    frames = await raw.frames_until_closed()
    assert [(f[0], f[2]) for f in frames] == [(P.ERROR, "UNAUTHENTICATED")]


async def test_silent_client_gets_handshake_timeout(server: IpcServer) -> None:
    raw = await RawConn.open(path_of(server))
    frames = await raw.frames_until_closed(timeout=10)
    assert frames[0][0] == P.ERROR and frames[0][2] == "PROTOCOL_ERROR" and "HELLO" in frames[0][3]


async def test_first_frame_must_be_hello_and_version_must_match(server: IpcServer) -> None:
    raw = await RawConn.open(path_of(server))
    raw.send(P.request(1, "pubsub.publish", {}))
    assert [f[2] for f in await raw.frames_until_closed()] == ["PROTOCOL_ERROR"]
    raw = await RawConn.open(path_of(server))
    raw.send(P.hello("tok-alice", None, version=99))
    (err,) = await raw.frames_until_closed()
    assert err[2] == "PROTOCOL_ERROR" and err[4] == {"supported": [1]}


async def test_pubsub_wildcards_and_unsubscribe(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as pub, Client(path_of(server), "tok-bob") as sub:
        async with sub.subscribe("s/+/raw") as plus, sub.subscribe("s/#") as hash_:
            for t in ("s/1/raw", "s/2/avg", "s", "other/1/raw", "s/3/raw"):
                await pub.publish(t, t)
            got_plus = [m.payload for m in await take(plus, 2)]
            got_hash = [m.payload for m in await take(hash_, 4)]
        assert got_plus == ["s/1/raw", "s/3/raw"]
        assert got_hash == ["s/1/raw", "s/2/avg", "s", "s/3/raw"]
        await sub.call("pubsub.publish", {"topic": "sync", "payload": b"\xc0"})  # round trip: CANCELs seen
        assert len(server.core.bus) == 0
        async with sub.subscribe("s/#") as again:
            await pub.publish("s/9", 9)
            (m,) = await take(again, 1)
            assert (m.topic, m.payload, m.sender, m.dropped) == ("s/9", 9, "alice", 0)


async def test_payload_kinds_including_numpy(server: IpcServer) -> None:
    arr = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    async with Client(path_of(server), "tok-alice") as c, c.subscribe("p") as ms:
        for payload in (b"\x00raw", {"a": [1, 2]}, arr, "text"):
            await c.publish("p", payload)
        m1, m2, m3, m4 = await take(ms, 4)
    assert m1.raw == b"\x00raw" and m2.payload == {"a": [1, 2]} and m2.raw is None
    assert m3.payload.dtype == np.float32 and np.array_equal(m3.payload, arr)
    assert m4.payload == "text"


async def test_per_subscriber_order_with_two_subscribers(server: IpcServer) -> None:
    n = 20_000
    async with Client(path_of(server), "tok-alice") as pub, Client(path_of(server), "tok-bob") as sub, \
            sub.subscribe("seq", queue_size=n) as a, sub.subscribe("seq", queue_size=n) as b:
        for i in range(n):
            await pub.publish("seq", i)
        got_a = [m.payload for m in await take(a, n, timeout=60)]
        got_b = [m.payload for m in await take(b, n, timeout=60)]
    assert got_a == list(range(n)) and got_b == list(range(n))


async def test_request_reply_and_timeout(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as req, Client(path_of(server), "tok-bob") as svc:
        async with svc.subscribe("svc/double") as calls:
            async def serve_one() -> None:
                async for m in calls:
                    await m.reply(m.payload * 2)
                    return

            task = asyncio.create_task(serve_one())
            assert await req.request("svc/double", 21) == 42
            await task
            with pytest.raises(Timeout):  # subscribed but nobody answers
                await req.request("svc/double", 1, timeout=0.1)
        with pytest.raises(InvalidArguments):
            await req.request("svc/+", 1)


async def test_denied_publish_and_subscribe_raise_naming_operation_and_resource(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-eve") as eve:
        await eve.publish("public/a", 1)
        with pytest.raises(Unauthorized) as info:
            await eve.publish("private/a", 1)
        assert "aws.greengrass#PublishToTopic" in str(info.value) and "private/a" in str(info.value)
        assert info.value.details["resource"] == "private/a"
        with pytest.raises(Unauthorized, match="SubscribeToTopic"):
            async with eve.subscribe("private/#"):
                pass
        # pipelined (unconfirmed) publish: the error arrives with the next publish
        await eve.publish("private/b", 1, confirm=False)
        await eve.call("pubsub.publish", {"topic": "public/a", "payload": b"\xc0"})
        with pytest.raises(Unauthorized, match="private/b"):
            await eve.publish("public/a", 2)
        await eve.publish("public/a", 3)  # the connection is still fine


async def test_invalid_topics_and_unknown_operations(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as c:
        with pytest.raises(InvalidArguments, match="wildcard"):
            await c.publish("a/#", 1)
        with pytest.raises(InvalidArguments):
            async with c.subscribe("a/#/b"):
                pass
        with pytest.raises(UnknownOperation, match=r"'components\.frobnicate'"):
            await c.call("components.frobnicate")
        with pytest.raises(UnknownOperation):
            async with c.stream("logs.nope") as items:
                await anext(aiter(items))
        await c.publish("a/b", 1)


async def test_registered_calls_and_streams_with_cancel(core: IpcCore, server: IpcServer) -> None:
    closed = asyncio.Event()

    async def get(ctx: CallContext, args: dict[str, Any]) -> Any:
        return {"component": ctx.principal.name, "key_path": args["key_path"]}

    async def watch(ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[list[str]]:
        try:
            i = 0
            while True:
                yield ["k", str(i)]
                i += 1
                await asyncio.sleep(0)
        finally:
            closed.set()

    core.register("config.get", get)
    core.register_stream("config.subscribe", watch)
    async with Client(path_of(server), "tok-alice") as c:
        assert await c.get_configuration(["a", "b"]) == {"component": "alice", "key_path": ["a", "b"]}
        async with c.watch_configuration(["a"]) as changes:
            assert await take(changes, 3) == [["k", "0"], ["k", "1"], ["k", "2"]]
        await asyncio.wait_for(closed.wait(), 10)  # leaving the block cancelled the server generator
        again = await c.call("config.get", {"key_path": []}, timeout=5)
        assert again == {"component": "alice", "key_path": []}


async def test_a_late_validity_report_does_not_end_the_sdks_validation(core: IpcCore, server: IpcServer) -> None:
    """The nucleus refuses a report it no longer waits for (its 20 s ran out); the SDK's validation loop
    must log that and answer the next proposal, not end, or every later deployment would wait out its
    timeout and pass unvalidated."""
    got: list[tuple[str, str]] = []
    answered = asyncio.Event()

    async def proposals(ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for did, value in (("late", 1), ("next", -1)):
            yield {"deployment_id": did, "configuration": {"v": value}}
        await asyncio.Event().wait()

    async def report(ctx: CallContext, args: dict[str, Any]) -> None:
        if args["deployment_id"] == "late":
            raise InvalidArguments("no validation of deployment late is waiting for alice's report")
        got.append((args["deployment_id"], args["status"]))
        answered.set()

    def parse(doc: dict[str, Any]) -> int:
        if doc["v"] < 0:
            raise ValueError("v must be >= 0")
        return int(doc["v"])

    core.register_stream("config.validation.subscribe", proposals)
    core.register("config.validation.report", report)
    async with Client(path_of(server), "tok-alice") as c:
        task = asyncio.create_task(c.validate_configurations(parse, errors=(ValueError,)))
        await asyncio.wait_for(answered.wait(), 10)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert got == [("next", "REJECTED")]


async def test_configuration_changes_yields_a_configuration_once_however_many_keys_changed(
        core: IpcCore, server: IpcServer) -> None:
    """The nucleus notifies once per changed key; the first read already sees every key of the deployment,
    so the others used to yield the same configuration again (a restart of the ingest's source each)."""
    docs = [{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 2, "b": 2}, {"a": 2, "b": 2}, {"a": 3, "b": 2}]
    reads = iter(docs)

    async def get(ctx: CallContext, args: dict[str, Any]) -> Any:
        return next(reads)

    async def watch(ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for key in "ababa":
            yield {"component": "alice", "key_path": [key]}
        await asyncio.Event().wait()

    core.register("config.get", get)
    core.register_stream("config.subscribe", watch)
    async with Client(path_of(server), "tok-alice") as c:
        changes = c.configuration_changes(dict, errors=(ValueError,), rejected=lambda exc: None)
        got = [await asyncio.wait_for(anext(changes), 10) for _ in range(3)]
        await changes.aclose()
    assert got == [{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3, "b": 2}]


async def test_call_timeout(core: IpcCore, server: IpcServer) -> None:
    async def slow(ctx: CallContext, args: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    core.register("slow.op", slow)
    async with Client(path_of(server), "tok-alice") as c:
        with pytest.raises(Timeout, match=r"slow\.op"):
            await c.call("slow.op", timeout=0.05)
        assert await c.call("pubsub.publish", {"topic": "x", "payload": b"\xc0"}) == 0


async def test_nucleus_publishes_to_clients(core: IpcCore, server: IpcServer) -> None:
    async with Client(path_of(server), "tok-bob") as c, c.subscribe("nucleus/#") as ms:
        assert await core.publish(NUCLEUS, "nucleus/state", {"x": 1}) == 1
        (m,) = await take(ms, 1)
        assert (m.topic, m.payload, m.sender) == ("nucleus/state", {"x": 1}, "nucleus")


async def test_close_sessions_of_disconnects_that_principal_only(core: IpcCore, server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as a, Client(path_of(server), "tok-bob") as b:
        await core.close_sessions_of("alice")
        with pytest.raises(ConnectionClosed):
            for _ in range(100):  # bounded: the close arrives within a few loop turns
                await a.call("pubsub.publish", {"topic": "x", "payload": b"\xc0"}, timeout=5)
        assert await b.call("pubsub.publish", {"topic": "x", "payload": b"\xc0"}) == 0


async def test_server_close_ends_clients(core: IpcCore, sock_dir: Path) -> None:
    srv = IpcServer(core, sock_dir / "b.sock")
    await srv.start()
    c = Client(sock_dir / "b.sock", "tok-alice")
    await c.connect()
    async with c.subscribe("x") as ms:
        await srv.close()
        with pytest.raises(ConnectionClosed):
            await take(ms, 1)
    assert not (sock_dir / "b.sock").exists()
    await c.close()


async def test_stale_socket_is_replaced_and_live_one_refused(core: IpcCore, sock_dir: Path,
                                                            server: IpcServer) -> None:
    with pytest.raises(FileExistsError, match="already listening"):
        await IpcServer(core, path_of(server)).start()
    (sock_dir / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        await IpcServer(core, sock_dir / "file").start()


async def test_sync_client_in_a_script_thread(server: IpcServer) -> None:
    path = path_of(server)

    def script() -> list[Any]:
        with SyncClient(path, "tok-bob") as sc, sc.subscribe("sync/#") as msgs:
            sc.publish("sync/a", {"n": 1})
            sc.publish("sync/b", b"two")
            got = [msgs.get(timeout=10).payload, next(msgs).payload]
            with pytest.raises(UnknownOperation):
                sc.call("nope.op")
            return got

    assert await asyncio.to_thread(script) == [{"n": 1}, b"two"]


async def test_connect_to_missing_socket_says_where(sock_dir: Path) -> None:
    with pytest.raises(ConnectionClosed, match=r"nope\.sock"):
        await Client(sock_dir / "nope.sock", "t").connect()


def test_from_env_requires_nucleus_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUCLEUS_IPC_SOCKET", raising=False)
    monkeypatch.delenv("SVCUID", raising=False)
    monkeypatch.delenv("NUCLEUS_IPC_TOKEN", raising=False)
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "/tmp/gg.sock")
    with pytest.raises(InvalidArguments, match="NUCLEUS_IPC_SOCKET"):
        Client.from_env()
    monkeypatch.setenv("NUCLEUS_IPC_SOCKET", "/tmp/x.sock")
    monkeypatch.setenv("SVCUID", "secret")
    monkeypatch.setenv("NUCLEUS_COMPONENT_NAME", "com.example.X")
    c = Client.from_env()
    assert (c.socket_path, c.name) == ("/tmp/x.sock", "com.example.X")
    assert "secret" not in repr(c)


def test_protocol_error_class_for_codes() -> None:
    assert isinstance(from_wire("FRAME_TOO_LARGE", "x"), FrameTooLarge)
    assert isinstance(from_wire("FRAME_TOO_LARGE", "x"), ProtocolError)
    e = from_wire("SOMETHING_NEW", "m", {"a": 1})
    assert type(e) is IpcError and e.code == "SOMETHING_NEW" and e.details == {"a": 1}


async def test_policy_changes_reach_connected_clients(core: IpcCore, server: IpcServer, policy: Any) -> None:
    async with Client(path_of(server), "tok-eve") as eve:
        await eve.publish("public/a", 1, confirm=True)
        await eve.publish("public/a", 2, confirm=True)  # now served from the connection's cache
        policy.grants["eve"] = []
        core.policies_changed()
        with pytest.raises(Unauthorized):
            await eve.publish("public/a", 3, confirm=True)


async def test_cached_decisions_expire_without_being_told(auth: TokenAuth, policy: Any,
                                                          sock_dir: Path) -> None:
    core = IpcCore(auth, policy, authz_cache_ttl=0.0)
    async with IpcServer(core, sock_dir / "t.sock") as srv, Client(srv.socket_path, "tok-eve") as eve:
        await eve.publish("public/a", 1, confirm=True)
        policy.grants["eve"] = []
        with pytest.raises(Unauthorized):
            await eve.publish("public/a", 2, confirm=True)


async def test_sync_subscription_get_timeout_does_not_lose_the_next_message(server: IpcServer) -> None:
    path = path_of(server)

    def script() -> Any:
        with SyncClient(path, "tok-bob") as sc, sc.subscribe("late/#") as msgs:
            with pytest.raises(TimeoutError):
                msgs.get(timeout=0.05)
            sc.publish("late/x", "after the timeout")
            return msgs.get(timeout=10).payload

    assert await asyncio.to_thread(script) == "after the timeout"


async def test_calls_inside_a_lossless_subscription_loop_do_not_deadlock(server: IpcServer) -> None:
    """Credit-based delivery: the socket is never paused for a full subscription, so the replies
    to calls made while consuming keep arriving even when the subscription is saturated."""
    n = 300
    async with Client(path_of(server), "tok-alice") as pub, Client(path_of(server), "tok-bob") as sub, \
            sub.subscribe("work/#", queue_size=4, policy="block") as jobs:
        async def produce() -> None:
            for i in range(n):
                await pub.publish("work/item", i)

        producer = asyncio.create_task(produce())
        got = []
        async with asyncio.timeout(30):
            async for m in jobs:
                # a round trip per message on the same connection as the saturated subscription
                await sub.call("pubsub.publish", {"topic": "audit/x", "payload": b"\xc0"})
                got.append(m.payload)
                if len(got) == n:
                    break
            await producer
    assert got == list(range(n))


async def test_slow_sdk_subscriber_learns_what_the_server_dropped(server: IpcServer) -> None:
    n = 2000
    async with Client(path_of(server), "tok-alice") as pub, Client(path_of(server), "tok-bob") as sub, \
            sub.subscribe("tele/#", queue_size=8) as ms:
        for i in range(n):
            await pub.publish("tele/x", i)
        await pub.publish("tele/end", -1, confirm=True)  # everything above has been routed
        received, dropped, last = 0, 0, -1
        async with asyncio.timeout(30):
            async for m in ms:
                if m.payload == -1:
                    break
                assert m.payload > last
                dropped += m.dropped
                received += 1
                last = m.payload
    assert last == n - 1 and dropped > 0 and received + dropped == n
    assert received <= 2 * 8 + 1  # the credit window plus the server queue, not the whole burst


async def test_malformed_credit_closes_only_that_connection(server: IpcServer) -> None:
    raw = await RawConn.open(path_of(server), "tok-bob")
    raw.send(P.encode_frame([P.CREDIT, 1, -5]))
    assert [f[2] for f in await raw.frames_until_closed()] == ["PROTOCOL_ERROR"]
    async with Client(path_of(server), "tok-alice") as c:
        assert await c.call("pubsub.publish", {"topic": "x", "payload": b"\xc0"}) == 0


# --- batched delivery and publishing (MESSAGES / PUBLISH_MANY, opted into per peer) ------------------
def deliveries(frames: list[P.Frame]) -> list[tuple[int, int, Any, Any, str, bytes]]:
    """(sub_id, dropped, reply_to, sender, topic, data) per delivery, whether plain or batched."""
    out: list[tuple[int, int, Any, Any, str, bytes]] = []
    for f in frames:
        if f[0] == P.MESSAGE:
            out.append((f[1], f[2], f[3], f[4], f[5], f[6]))
        elif f[0] == P.MESSAGES:
            items = f[3]
            assert len(items) % 4 == 0 and len(items) >= 8  # a batch of one goes out as a plain MESSAGE
            for k in range(0, len(items), 4):
                out.append((f[1], f[2] if k == 0 else 0, *items[k:k + 4]))
    return out


async def read_deliveries(raw: RawConn, n: int) -> tuple[list[P.Frame], list[tuple[int, int, Any, Any, str, bytes]]]:
    frames: list[P.Frame] = []
    while len(deliveries(frames)) < n:
        frames.append(await raw.next_frame())
    return frames, deliveries(frames)


async def test_welcome_offers_batching_and_the_sdk_takes_it(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as c, c.subscribe("b/#"):
        assert P.FEATURE_BATCH in c.server_limits["features"]
        (sub,) = server.core.bus.subscriptions()
        assert sub.front.batch is True


async def test_batch_subscriber_gets_multi_message_frames_in_order(server: IpcServer) -> None:
    n = 500
    raw = await RawConn.open(path_of(server), "tok-bob")
    raw.send(P.request(1, "pubsub.subscribe", {"filter": "b/#", "batch": True}))
    assert await raw.next_frame() == [P.RESPONSE, 1, {"filter": "b/#", "batch": True}]
    async with Client(path_of(server), "tok-alice") as pub:
        await pub.publish("b/x", -1, confirm=True)
        for i in range(n):  # pipelined: the server reads them in a few chunks and batches per chunk
            await pub.publish("b/x", i)
        frames, got = await read_deliveries(raw, n + 1)
    assert [(sid, dropped, r, s, t) for sid, dropped, r, s, t, _ in got] == [(1, 0, None, "alice", "b/x")] * (n + 1)
    assert [decode(d) for *_, d in got] == list(range(-1, n))
    assert any(f[0] == P.MESSAGES for f in frames) and len(frames) < n / 4
    await raw.close()


async def test_peers_that_do_not_opt_in_get_plain_messages(server: IpcServer) -> None:
    n = 300
    raw = await RawConn.open(path_of(server), "tok-bob")
    raw.send(P.request(1, "pubsub.subscribe", {"filter": "b/#"}))
    assert (await raw.next_frame())[0] == P.RESPONSE
    async with Client(path_of(server), "tok-alice") as pub:
        for i in range(n):
            await pub.publish("b/x", i, confirm=i == 0)
        frames, got = await read_deliveries(raw, n)
    assert {f[0] for f in frames} == {P.MESSAGE} and [decode(d) for *_, d in got] == list(range(n))
    await raw.close()


async def test_batched_drop_oldest_counts_every_gap_exactly(server: IpcServer) -> None:
    """Credit 3, queue 4: the first three go out, the last four wait, the 93 between are counted."""
    raw = await RawConn.open(path_of(server), "tok-bob")
    raw.send(P.request(1, "pubsub.subscribe", {"filter": "d/#", "queue_size": 4, "credit": 3, "batch": True}))
    assert (await raw.next_frame())[0] == P.RESPONSE
    async with Client(path_of(server), "tok-alice") as pub:
        for i in range(100):
            await pub.publish("d/x", i, confirm=i in (0, 99))
    _, first = await read_deliveries(raw, 3)
    raw.send(P.credit(1, 100))
    _, rest = await read_deliveries(raw, 4)
    got = [(dropped, decode(d)) for _, dropped, *_, d in first + rest]
    assert got == [(0, 0), (0, 1), (0, 2), (93, 96), (0, 97), (0, 98), (0, 99)]
    await raw.close()


async def test_publish_many_routes_in_order_once_authorized(server: IpcServer) -> None:
    async with Client(path_of(server), "tok-alice") as sub, sub.subscribe("#") as ms:
        raw = await RawConn.open(path_of(server), "tok-bob")
        raw.send(P.publish_many("m/x", [encode(i) for i in range(5)]))
        got = await take(ms, 5)
        assert [(m.topic, m.sender, m.payload) for m in got] == [("m/x", "bob", i) for i in range(5)]
        # items that are not bin are refused (one ERROR for the frame); the others still go out
        raw.send(P.encode_frame([P.PUBLISH_MANY, "m/y", [encode(1), "text", 7, encode(2)]]))
        assert [m.payload for m in await take(ms, 2)] == [1, 2]
        err = await raw.next_frame()
        assert err[:3] == [P.ERROR, 0, "INVALID_ARGUMENTS"] and err[4] == {"topic": "m/y", "count": 2}
        await raw.close()

        eve = await RawConn.open(path_of(server), "tok-eve")
        eve.send(P.publish_many("secret/x", [encode(1)]) + P.publish_many("bad/#", [encode(1)]))
        denied, invalid = await eve.next_frame(), await eve.next_frame()
        assert denied[:3] == [P.ERROR, 0, "UNAUTHORIZED"] and denied[4]["topic"] == "secret/x"
        assert invalid[:3] == [P.ERROR, 0, "INVALID_ARGUMENTS"] and invalid[4]["topic"] == "bad/#"
        eve.send(P.encode_frame([P.PUBLISH_MANY, "public/x", b"not an array"]))
        assert [f[2] for f in await eve.frames_until_closed()] == ["PROTOCOL_ERROR"]
        await sub.publish("m/end", 0, confirm=True)
        assert [m.topic for m in await take(ms, 1)] == ["m/end"]  # nothing else got through


async def test_sdk_speaks_plain_version_1_to_a_server_without_batching(sock_dir: Path) -> None:
    """A nucleus that predates batching: the SDK neither asks for MESSAGES nor sends PUBLISH_MANY."""
    seen: list[P.Frame] = []
    done = asyncio.Event()

    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = P.FrameDecoder()
        while not done.is_set():
            data = await reader.read(65536)
            if not data:
                break
            for f in dec.feed(data):
                seen.append(f)
                if f[0] == P.HELLO:
                    writer.write(P.welcome("alice", {"max_frame": P.DEFAULT_MAX_FRAME}))
                elif f[0] == P.REQUEST:
                    writer.write(P.response(f[1], {"filter": f[3]["filter"]})
                                 + P.message(f[1], 0, P.message_tail(None, "x", "o/a", encode("m1")))
                                 + P.message(f[1], 2, P.message_tail(None, "x", "o/a", encode("m2"))))
                elif f[0] == P.PUBLISH and f[1]:
                    writer.write(P.response(f[1], 1))
                elif f[0] == P.PUBLISH and decode(f[3]) == "last":
                    done.set()
        writer.close()

    srv = await asyncio.start_unix_server(old_server, str(sock_dir / "old.sock"))
    async with srv, Client(sock_dir / "old.sock", "tok") as c:
        async with c.subscribe("o/#") as ms:
            got = await take(ms, 2)
        for i in range(50):
            await c.publish("o/b", i)
        await c.publish("o/b", "last")
        async with asyncio.timeout(10):
            await done.wait()
    assert [(m.payload, m.dropped) for m in got] == [("m1", 0), ("m2", 2)]
    (sub_req,) = [f for f in seen if f[0] == P.REQUEST and f[2] == "pubsub.subscribe"]
    assert "batch" not in sub_req[3]
    assert {f[0] for f in seen} <= {P.HELLO, P.REQUEST, P.CANCEL, P.CREDIT, P.PUBLISH}
    assert [decode(f[3]) for f in seen if f[0] == P.PUBLISH] == [*range(50), "last"]


async def test_publish_with_a_topic_that_is_not_a_string_is_refused_not_fatal(server: IpcServer) -> None:
    raw = await RawConn.open(path_of(server), "tok-bob")
    raw.send(P.encode_frame([P.PUBLISH, 0, ["a"], encode(1)])
             + P.encode_frame([P.PUBLISH_MANY, {"a": 1}, [encode(1)]]) + P.publish(5, "ok", encode(1)))
    frames = [await raw.next_frame() for _ in range(3)]
    assert [f[:3] for f in frames] == [[P.ERROR, 0, "INVALID_ARGUMENTS"], [P.ERROR, 0, "INVALID_ARGUMENTS"],
                                       [P.RESPONSE, 5, 0]]
    await raw.close()
