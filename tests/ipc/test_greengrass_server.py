"""The Greengrass front end on a real Unix socket: handshake, protocol errors, operations, the bus.

Raw-socket peers send what awsiotsdk never would (bad CRCs, skipped stream ids, a second CONNECT,
frames before CONNECT, oversized frames); each must close that connection only. The awsiotsdk
client itself runs against the daemon in tests/nucleus/test_greengrass_components.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ipc import Client, codec
from ipc.core import IpcCore
from ipc.greengrass.eventstream import EventStreamDecoder
from ipc.greengrass.rpc import (
    MessageFlag,
    MessageType,
    RpcMessage,
    connect_request,
    encode_rpc,
    operation_request,
    parse_rpc,
    ping,
)
from ipc.greengrass.server import GreengrassServer
from ipc.server import IpcServer

MAX_MESSAGE = 64 * 1024
P = "aws.greengrass#"


@pytest.fixture
async def gg(core: IpcCore, sock_dir: Path) -> AsyncIterator[GreengrassServer]:
    async with GreengrassServer(core, sock_dir / "gg.sock", max_message_size=MAX_MESSAGE,
                                handshake_timeout=0.5, reject_linger=0.05, queue_size=64) as srv:
        yield srv


class Peer:
    """A hand-driven event-stream RPC client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = EventStreamDecoder()
        self.messages: list[RpcMessage] = []
        self.next_stream = 1

    @classmethod
    async def open(cls, server: GreengrassServer, token: str | None = "tok-alice") -> Peer:
        reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
        peer = cls(reader, writer)
        if token is not None:
            peer.send(connect_request(token))
            ack = await peer.next()
            assert ack.message_type == MessageType.CONNECT_ACK and ack.flags == MessageFlag.CONNECTION_ACCEPTED
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def call(self, operation: str, body: dict[str, Any], shape: str | None = None) -> int:
        sid = self.next_stream
        self.next_stream += 1
        self.send(operation_request(sid, P + operation, shape or f"{P}{operation}Request",
                                    json.dumps(body).encode()))
        return sid

    async def next(self, timeout: float = 10.0) -> RpcMessage:
        async with asyncio.timeout(timeout):
            while not self.messages:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("connection closed")
                self.messages.extend(parse_rpc(m) for m in self.decoder.feed(data))
        return self.messages.pop(0)

    async def until_closed(self, timeout: float = 10.0) -> list[RpcMessage]:
        out: list[RpcMessage] = []
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                out.append(await self.next(timeout))
        return out

    async def reply(self, sid: int) -> tuple[RpcMessage, Any]:
        m = await self.next()
        assert m.stream_id == sid, (m.stream_id, sid)
        return m, json.loads(m.payload)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def publish_body(topic: str, *, json_message: Any = None, binary: bytes | None = None) -> dict[str, Any]:
    if binary is not None:
        return {"topic": topic, "publishMessage": {"binaryMessage": {"message": base64.b64encode(binary).decode()}}}
    return {"topic": topic, "publishMessage": {"jsonMessage": {"message": json_message}}}


async def alive(server: GreengrassServer) -> None:
    """Another connection still gets answers: a failure stayed on its own connection."""
    peer = await Peer.open(server)
    peer.send(ping(b"hi"))
    m = await peer.next()
    assert m.message_type == MessageType.PING_RESPONSE and m.payload == b"hi"
    await peer.close()


async def no_sessions(core: IpcCore) -> None:
    """Sessions end when the server sees the close; wait for that (bounded), then check."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while core.sessions():
                await asyncio.sleep(0.01)
    assert core.sessions() == []


# --- handshake ---------------------------------------------------------------------------------------

async def test_connect_accepts_a_known_token_and_refuses_others(gg: GreengrassServer, core: IpcCore) -> None:
    peer = await Peer.open(gg)
    assert [s.front_end for s in core.sessions()] == ["greengrass"]
    bad = await Peer.open(gg, token=None)
    bad.send(connect_request("tok-nobody"))
    msgs = await bad.until_closed()
    assert [(m.message_type, m.flags) for m in msgs] == [(MessageType.CONNECT_ACK, 0)]
    assert len(core.sessions()) == 1
    await peer.close()


async def test_silent_client_is_closed_after_the_handshake_timeout(gg: GreengrassServer) -> None:
    peer = await Peer.open(gg, token=None)
    assert await peer.until_closed() == []
    await alive(gg)


async def test_an_anonymous_peer_cannot_make_the_server_buffer_a_large_connect(core: IpcCore,
                                                                               sock_dir: Path) -> None:
    """Before CONNECT a peer could announce a message up to the 16 MiB limit and have the server
    buffer it until the handshake timeout; a CONNECT is a token, so past 16 KiB it is closed at once."""
    from ipc.admission import MAX_ANONYMOUS_FRAME

    async with GreengrassServer(core, sock_dir / "big.sock", handshake_timeout=30.0) as srv:
        peer = await Peer.open(srv, token=None)
        prelude = struct.pack(">II", 1 << 20, 0)
        peer.send(prelude + struct.pack(">I", zlib.crc32(prelude)) + b"\x00" * (4 * MAX_ANONYMOUS_FRAME))
        await peer.until_closed(timeout=5.0)  # well before the 30 s handshake timeout
        assert core.admission.anonymous == 0
        await alive(srv)


# --- protocol errors, each closing only its own connection ---------------------------------------------

async def test_bad_crc_closes_without_reply(gg: GreengrassServer) -> None:
    peer = await Peer.open(gg)
    frame = bytearray(ping(b"x"))
    frame[-1] ^= 0xFF
    peer.send(bytes(frame))
    assert await peer.until_closed() == []
    await alive(gg)


async def test_skipped_stream_id_is_a_protocol_error(gg: GreengrassServer) -> None:
    peer = await Peer.open(gg)
    peer.send(operation_request(2, P + "PublishToTopic", P + "PublishToTopicRequest",
                                json.dumps(publish_body("a", json_message={})).encode()))
    msgs = await peer.until_closed()
    assert [m.message_type for m in msgs] == [MessageType.PROTOCOL_ERROR]
    assert "incremented by more than 1" in json.loads(msgs[0].payload)["message"]
    await alive(gg)


async def test_second_connect_is_a_protocol_error(gg: GreengrassServer, core: IpcCore) -> None:
    peer = await Peer.open(gg)
    peer.send(connect_request("tok-alice"))
    msgs = await peer.until_closed()
    assert [m.message_type for m in msgs] == [MessageType.PROTOCOL_ERROR]
    await alive(gg)
    await no_sessions(core)


async def test_frames_before_connect_are_a_protocol_error(gg: GreengrassServer, core: IpcCore) -> None:
    peer = await Peer.open(gg, token=None)
    peer.send(operation_request(1, P + "ListComponents", P + "ListComponentsRequest", b"{}"))
    msgs = await peer.until_closed()
    assert [m.message_type for m in msgs] == [MessageType.PROTOCOL_ERROR]
    await no_sessions(core)
    await alive(gg)


async def test_oversized_frame_is_refused_from_its_prelude(gg: GreengrassServer) -> None:
    peer = await Peer.open(gg)
    total = MAX_MESSAGE + 1
    prelude = struct.pack(">II", total, 0)
    peer.send(prelude + struct.pack(">I", zlib.crc32(prelude)))  # nothing after the 12-byte prelude
    assert await peer.until_closed() == []
    await alive(gg)


# --- operations ------------------------------------------------------------------------------------------

async def test_publish_subscribe_json_binary_wildcards_and_receive_mode(gg: GreengrassServer) -> None:
    sub = await Peer.open(gg, "tok-bob")
    s_all = sub.call("SubscribeToTopic", {"topic": "a/+/c"})
    m, body = await sub.reply(s_all)
    assert m.service_model_type == P + "SubscribeToTopicResponse" and not m.terminates_stream
    assert m.content_type == "application/json" and body == {"topicName": "a/+/c"}
    s_others = sub.call("SubscribeToTopic", {"topic": "a/#", "receiveMode": "RECEIVE_MESSAGES_FROM_OTHERS"})
    await sub.reply(s_others)
    pub = await Peer.open(gg, "tok-alice")
    sid = pub.call("PublishToTopic", publish_body("a/b/c", json_message={"x": [1, "ü"]}))
    m, body = await pub.reply(sid)
    assert (m.service_model_type, m.terminates_stream, body) == (P + "PublishToTopicResponse", True, {})
    sid = pub.call("PublishToTopic", publish_body("a/b/c", binary=b"\x00\xff"))
    await pub.reply(sid)
    got = [await sub.next() for _ in range(4)]
    by_stream: dict[int, list[Any]] = {}
    for m in got:
        assert m.service_model_type == P + "SubscriptionResponseMessage"
        by_stream.setdefault(m.stream_id, []).append(json.loads(m.payload))
    expected = [{"jsonMessage": {"message": {"x": [1, "ü"]}, "context": {"topic": "a/b/c"}}},
                {"binaryMessage": {"message": base64.b64encode(b"\x00\xff").decode(), "context": {"topic": "a/b/c"}}}]
    assert by_stream == {s_all: expected, s_others: expected}
    # bob's own publish reaches the receive-all stream only
    sid = sub.call("PublishToTopic", publish_body("a/b/c", json_message={"own": True}))
    replies = [await sub.next() for _ in range(2)]
    assert sorted(m.stream_id for m in replies) == [s_all, sid]
    await sub.close()
    await pub.close()


async def test_native_and_greengrass_clients_see_each_other(gg: GreengrassServer, core: IpcCore,
                                                            sock_dir: Path) -> None:
    async with IpcServer(core, sock_dir / "native.sock"), \
            Client(sock_dir / "native.sock", "tok-bob") as native, native.subscribe("x/#") as messages:
        peer = await Peer.open(gg)
        sid = peer.call("SubscribeToTopic", {"topic": "y/#"})
        await peer.reply(sid)
        for body in (publish_body("x/1", binary=b"\x01\x02"), publish_body("x/2", json_message={"k": 1})):
            await peer.reply(peer.call("PublishToTopic", body))
        got = []
        async with asyncio.timeout(10):
            async for m in messages:
                got.append((m.topic, m.payload, m.sender))
                if len(got) == 2:
                    break
        assert got == [("x/1", b"\x01\x02", "alice"), ("x/2", {"k": 1}, "alice")]
        await native.publish("y/1", b"raw")
        await native.publish("y/2", {"list": [1, 2]})
        await native.publish("y/3", "text")
        events = [json.loads((await peer.next()).payload) for _ in range(3)]
        assert events == [
            {"binaryMessage": {"message": base64.b64encode(b"raw").decode(), "context": {"topic": "y/1"}}},
            {"jsonMessage": {"message": {"list": [1, 2]}, "context": {"topic": "y/2"}}},
            {"jsonMessage": {"message": "text", "context": {"topic": "y/3"}}},
        ]
        await peer.close()


async def test_errors_are_modeled_and_keep_the_connection(gg: GreengrassServer) -> None:
    peer = await Peer.open(gg, "tok-eve")
    cases = [
        ("PublishToTopic", publish_body("secret/x", json_message={}), "UnauthorizedError", "secret/x"),
        ("SubscribeToTopic", {"topic": "secret/#"}, "UnauthorizedError", "SubscribeToTopic"),
        ("PublishToTopic", publish_body("public/+", json_message={}), "InvalidArgumentsError", "wildcard"),
        ("PublishToTopic", {"topic": "public/a", "publishMessage": {}}, "InvalidArgumentsError", "exactly one"),
        ("SubscribeToTopic", {"topic": "public/#", "receiveMode": "SOMETIMES"}, "InvalidArgumentsError",
         "receiveMode"),
        ("GetSecretValue", {"secretId": "x"}, "ServiceError", "aws.greengrass#GetSecretValue"),
        ("ValidateAuthorizationToken", {"token": "tok-bob"}, "UnauthorizedError", "ValidateAuthorizationToken"),
        ("ListComponents", {}, "ServiceError", "components.list"),  # not registered on this bare core
    ]
    for operation, body, shape, text in cases:
        sid = peer.call(operation, body)
        m, reply = await peer.reply(sid)
        assert m.message_type == MessageType.APPLICATION_ERROR and m.terminates_stream, operation
        assert m.service_model_type == P + shape, (operation, reply)
        assert text in reply["message"], (operation, reply)
    sid = peer.next_stream
    peer.next_stream += 1
    peer.send(operation_request(sid, P + "PublishToTopic", P + "PublishToTopicRequest", b"not json"))
    m, reply = await peer.reply(sid)
    assert m.service_model_type == P + "InvalidArgumentsError"
    m, reply = await peer.reply(peer.call("PublishToTopic", publish_body("public/a", json_message={})))
    assert m.service_model_type == P + "PublishToTopicResponse"
    await peer.close()


async def test_closing_a_subscription_stream_unsubscribes(gg: GreengrassServer, core: IpcCore) -> None:
    peer = await Peer.open(gg)
    sid = peer.call("SubscribeToTopic", {"topic": "z/#"})
    await peer.reply(sid)
    assert len(core.bus) == 1
    peer.send(encode_rpc(MessageType.APPLICATION_MESSAGE, flags=MessageFlag.TERMINATE_STREAM, stream_id=sid))
    peer.send(ping())
    assert (await peer.next()).message_type == MessageType.PING_RESPONSE
    assert len(core.bus) == 0
    sid = peer.call("SubscribeToTopic", {"topic": "z/#"})
    await peer.reply(sid)
    await peer.close()
    await no_sessions(core)
    assert len(core.bus) == 0


async def test_a_subscriber_that_stops_reading_is_bounded(gg: GreengrassServer, core: IpcCore) -> None:
    slow = await Peer.open(gg)
    slow.call("SubscribeToTopic", {"topic": "flood"})
    await slow.reply(1)
    fast = await Peer.open(gg, "tok-bob")
    fast_sid = fast.call("SubscribeToTopic", {"topic": "flood"})
    await fast.reply(fast_sid)
    (sub,) = [s for s in core.bus.subscriptions() if s.owner.principal.name == "alice"]
    n = 3000
    payload = "x" * 1000
    seen: list[int] = []

    async def read_fast() -> None:
        while len(seen) < n:
            m = await fast.next()
            seen.append(json.loads(m.payload)["jsonMessage"]["message"]["i"])

    reader = asyncio.create_task(read_fast())
    async with asyncio.timeout(20):
        for i in range(n):
            core.bus.publish("flood", codec.encode({"i": i, "p": payload}), "nucleus")
            assert len(sub.queue) <= 64
            while len(seen) < i - 200:  # the fast reader keeps up; the silent one never reads
                await asyncio.sleep(0.001)
        await reader
    assert seen == list(range(n))
    assert sub.dropped_total > 0  # the silent reader lost the oldest, nobody waited for it
    await slow.close()
    await fast.close()
