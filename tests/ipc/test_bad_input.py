"""Hostile or broken peers: each gets an ERROR frame and/or a closed socket; everyone else carries on."""

from __future__ import annotations

import asyncio
import resource
import struct
from pathlib import Path

import pytest
from ipc_testkit import RawConn

from ipc import Client
from ipc import protocol as P
from ipc.core import IpcCore
from ipc.errors import LimitExceeded, ProtocolError
from ipc.server import IpcServer

pytestmark = pytest.mark.timeout(120)


async def bystander_works(path: Path) -> None:
    """A well-behaved client can still connect, subscribe, publish and receive."""
    async with Client(path, "tok-bob") as c, c.subscribe("ok/#") as ms:
        await c.publish("ok/1", "still here")
        async with asyncio.timeout(10):
            m = await anext(aiter(ms))
        assert m.payload == "still here"


@pytest.fixture
async def bystander(server: IpcServer):  # type: ignore[no-untyped-def]
    """A client connected before the bad one arrives, checked again after it is gone."""
    async with Client(server.socket_path, "tok-alice") as c:
        yield c
        assert await c.call("pubsub.publish", {"topic": "ok/x", "payload": b"\xc0"}, timeout=10) == 0


async def test_garbage_bytes(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    raw.send(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    frames = await raw.frames_until_closed()
    assert [(f[0], f[1], f[2]) for f in frames] == [(P.ERROR, None, "PROTOCOL_ERROR")]
    await bystander_works(server.socket_path)


async def test_garbage_before_handshake(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # 'GET ' is read as a 1.2 GB length
    frames = await raw.frames_until_closed()
    assert [f[2] for f in frames] == ["FRAME_TOO_LARGE"]
    await bystander_works(server.socket_path)


async def test_truncated_frame_then_close(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    frame = P.request(1, "pubsub.subscribe", {"filter": "a"})
    raw.send(frame[: len(frame) // 2])
    await raw.writer.drain()
    await raw.close()
    await bystander_works(server.socket_path)
    for _ in range(200):  # bounded wait for the server to notice the EOF
        if len(server.core.sessions()) == 1:
            break
        await asyncio.sleep(0.01)
    assert [s.principal.name for s in server.core.sessions()] == ["alice"]


async def test_oversized_frame(core: IpcCore, sock_dir: Path) -> None:
    async with IpcServer(core, sock_dir / "s.sock", max_frame=64 * 1024) as srv, \
            Client(srv.socket_path, "tok-alice") as ok:
        raw = await RawConn.open(srv.socket_path, "tok-bob")
        raw.send(struct.pack(">I", 64 * 1024 + 1) + b"\x00" * 1000)
        frames = await raw.frames_until_closed()
        assert [f[2] for f in frames] == ["FRAME_TOO_LARGE"]
        assert frames[0][4] == {"size": 64 * 1024 + 1, "limit": 64 * 1024}
        await ok.publish("a", b"x" * 60_000)  # below the limit: fine
        await bystander_works(srv.socket_path)


async def test_unexpected_frame_type_from_client(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    raw.send(P.welcome("me", {}))
    frames = await raw.frames_until_closed()
    assert [f[2] for f in frames] == ["PROTOCOL_ERROR"]
    await bystander_works(server.socket_path)


async def test_bad_request_fields_get_errors_not_crashes(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    raw.send(P.encode_frame([P.REQUEST, 1, 5, {}]))                       # op not a string
    raw.send(P.encode_frame([P.REQUEST, 2, "pubsub.subscribe", {"filter": 5}]))
    raw.send(P.encode_frame([P.REQUEST, 3, "pubsub.subscribe", {"filter": "a", "queue_size": -1}]))
    raw.send(P.encode_frame([P.REQUEST, 4, "pubsub.publish", {"topic": "a"}]))
    raw.send(P.encode_frame([P.PUBLISH, 5, "a", "not-bin"]))
    raw.send(P.encode_frame([P.PUBLISH, 6, "a/+", b"\xc0"]))
    raw.send(P.encode_frame([P.CANCEL, 12345]))                            # unknown id: ignored
    raw.send(P.encode_frame([P.REQUEST, 7, "pubsub.publish", {"topic": "a", "payload": b"\xc0"}]))
    got = {}
    for _ in range(7):
        f = await raw.next_frame()
        got[f[1]] = f[2] if f[0] == P.ERROR else ("ok", f[2])
    assert got == {1: "INVALID_ARGUMENTS", 2: "INVALID_ARGUMENTS", 3: "INVALID_ARGUMENTS",
                   4: "INVALID_ARGUMENTS", 5: "INVALID_ARGUMENTS", 6: "INVALID_ARGUMENTS", 7: ("ok", 0)}
    raw.send(P.encode_frame([P.REQUEST, -1, "x", {}]))                    # ids must be positive
    assert [f[2] for f in await raw.frames_until_closed()] == ["PROTOCOL_ERROR"]
    await bystander_works(server.socket_path)


async def test_publish_with_negative_id_is_a_protocol_error(server: IpcServer, bystander: Client) -> None:
    """PUBLISH ids are >= 0 (0 = unconfirmed); -1 used to be routed and answered RESPONSE(-1, n)."""
    raw = await RawConn.open(server.socket_path, "tok-bob")
    raw.send(P.encode_frame([P.PUBLISH, -1, "ok/x", b"\xc0"]))
    frames = await raw.frames_until_closed()
    assert [(f[0], f[1], f[2], f[3]) for f in frames] == [
        (P.ERROR, None, "PROTOCOL_ERROR", "PUBLISH id must be an integer >= 0")]
    await bystander_works(server.socket_path)


async def test_cancel_with_a_non_integer_id_is_a_protocol_error(server: IpcServer, bystander: Client) -> None:
    """As for CREDIT: a CANCEL that cannot name a stream is refused, not silently ignored while the
    stream the client meant to end runs on."""
    raw = await RawConn.open(server.socket_path, "tok-bob")
    raw.send(P.request(1, "pubsub.subscribe", {"filter": "ok/#"}))
    assert (await raw.next_frame())[0] == P.RESPONSE
    raw.send(P.encode_frame([P.CANCEL, "1"]))
    raw.send(P.publish(2, "ok/x", b"\xc0"))  # answered (and delivered) only if the CANCEL was ignored
    frames = await raw.frames_until_closed()
    assert [(f[0], f[1], f[2], f[3]) for f in frames] == [
        (P.ERROR, None, "PROTOCOL_ERROR", "CANCEL id must be a positive integer")]
    await bystander_works(server.socket_path)


async def test_hello_with_a_non_string_token_says_so(server: IpcServer, bystander: Client) -> None:
    """A token of the wrong type was refused as 'missing token', which sends its author looking for
    a token that is there."""
    raw = await RawConn.open(server.socket_path)
    raw.send(P.encode_frame([P.HELLO, 1, 12345, "raw"]))
    frames = await raw.frames_until_closed()
    assert [(f[0], f[1], f[2], f[3]) for f in frames] == [
        (P.ERROR, None, "PROTOCOL_ERROR", "token must be a string, not int")]
    raw = await RawConn.open(server.socket_path)
    raw.send(P.encode_frame([P.HELLO, 1, None, "raw"]))  # nil is a missing token, as documented
    assert [(f[2], f[3]) for f in await raw.frames_until_closed()] == [("UNAUTHENTICATED", "missing token")]
    await bystander_works(server.socket_path)


async def test_subscription_flood_is_capped_per_session(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    limit = server.core.max_subscriptions_per_session
    raw.send(b"".join(P.request(i, "pubsub.subscribe", {"filter": f"f/{i}"}) for i in range(1, limit + 11)))
    frames = [await raw.next_frame() for _ in range(limit + 10)]
    ok = [f for f in frames if f[0] == P.RESPONSE]
    refused = [f for f in frames if f[0] == P.ERROR]
    assert len(ok) == limit and len(refused) == 10
    assert {f[2] for f in refused} == {"LIMIT_EXCEEDED"}
    await bystander_works(server.socket_path)
    await raw.close()
    for _ in range(200):
        if len(server.core.bus) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(server.core.bus) == 0  # the flood's subscriptions died with its connection


async def test_idle_clients_time_out_while_others_work(core: IpcCore, sock_dir: Path) -> None:
    async with IpcServer(core, sock_dir / "s.sock", handshake_timeout=0.2) as srv:
        idle = [await RawConn.open(srv.socket_path) for _ in range(20)]
        await bystander_works(srv.socket_path)
        for raw in idle:
            frames = await raw.frames_until_closed()
            assert [f[2] for f in frames] == ["PROTOCOL_ERROR"]
        assert srv.connections == 0


async def test_an_anonymous_peer_cannot_make_the_server_buffer_a_large_frame(server: IpcServer) -> None:
    """Before its HELLO a peer could announce a 16 MiB frame and have the server buffer it (times
    every anonymous connection). A HELLO is a token and a name: past 16 KiB it is refused at once."""
    from ipc.admission import MAX_ANONYMOUS_FRAME

    raw = await RawConn.open(server.socket_path)
    raw.send(struct.pack(">I", 1 << 20) + b"\x00" * (4 * MAX_ANONYMOUS_FRAME))
    frames = await raw.frames_until_closed()
    assert [f[2] for f in frames] == ["FRAME_TOO_LARGE"]
    await bystander_works(server.socket_path)


async def test_silent_peers_over_the_anonymous_bound_make_room_for_a_real_client(core: IpcCore,
                                                                                 sock_dir: Path) -> None:
    """Silent connections of one uid beyond its anonymous bound: the oldest silent ones are closed
    (quietly, counted), a client that says HELLO gets in, and the rest go at the handshake timeout."""
    core.admission.max_anonymous_per_uid = 8
    async with IpcServer(core, sock_dir / "s.sock", handshake_timeout=0.5) as srv:
        idle = [await RawConn.open(srv.socket_path) for _ in range(30)]
        await bystander_works(srv.socket_path)
        assert core.admission.counters["anonymous_shed"] >= 30 - 8
        for raw in idle:
            frames = await raw.frames_until_closed()
            assert [f[2] for f in frames] in (["LIMIT_EXCEEDED"], ["PROTOCOL_ERROR"])
        assert core.admission.anonymous == 0
        assert core.admission.counters["handshake_timeouts"] >= 1


async def test_connection_limit(core: IpcCore, sock_dir: Path) -> None:
    async with IpcServer(core, sock_dir / "s.sock", max_connections=3) as srv:
        clients = [Client(srv.socket_path, "tok-alice") for _ in range(3)]
        for c in clients:
            await c.connect()
        with pytest.raises(LimitExceeded):
            await Client(srv.socket_path, "tok-bob").connect()
        await clients[0].close()
        for _ in range(200):
            if srv.connections < 3:
                break
            await asyncio.sleep(0.01)
        await bystander_works(srv.socket_path)
        for c in clients[1:]:
            await c.close()


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.mark.slow
async def test_thousand_connections_at_once(server: IpcServer) -> None:
    n = 1000
    raise_fd_limit(2 * n + 256)  # both ends live in this process
    server.core.max_sessions_per_principal = n  # the server's capacity, not the per-principal bound
    clients = [Client(server.socket_path, "tok-alice" if i % 2 else "tok-bob", name=f"c{i}")
               for i in range(n)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        assert len(server.core.sessions()) == n
        async with clients[0].subscribe("fan/#") as ms:
            await asyncio.gather(*(c.publish("fan/x", i, confirm=True) for i, c in enumerate(clients)))
            got = sorted([(await anext(aiter(ms))).payload for _ in range(n)])
        assert got == list(range(n))
        await bystander_works(server.socket_path)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    for _ in range(500):
        if not server.core.sessions():
            break
        await asyncio.sleep(0.01)
    assert server.core.sessions() == []


def test_msgpack_bomb_in_body_is_bounded_by_frame_size() -> None:
    """A body claiming a huge array is rejected without allocating it."""
    body = b"\xdd\xff\xff\xff\xff"  # array32 with 4 billion elements, no data
    with pytest.raises(ProtocolError):
        P.FrameDecoder().feed(struct.pack(">I", len(body)) + body)


async def test_peer_that_never_reads_cannot_grow_server_memory(server: IpcServer, bystander: Client) -> None:
    raw = await RawConn.open(server.socket_path, "tok-bob")
    chunk = b"".join(P.publish(i + 1, "pipe/x", b"\xc0") for i in range(5000))  # each wants a RESPONSE
    stalled = False
    for _ in range(400):  # at most ~60 MB offered; the server must stop reading long before
        raw.send(chunk)
        try:
            await asyncio.wait_for(raw.writer.drain(), 0.5)
        except TimeoutError:
            stalled = True
            break
    assert stalled, "the server kept reading from a peer that reads nothing"
    (conn,) = [c for c in server._conns if c.session is not None and c.session.principal.name == "bob"]
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 4 * 1024 * 1024
    await bystander_works(server.socket_path)
    raw.writer.transport.abort()
