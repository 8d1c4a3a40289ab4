"""How the Greengrass server opens a stream operation, on a bare core with stream handlers of each shape.

The server runs a core stream handler up to its first wait before it answers (so a refusal fails
the call, tests/ipc/test_gg_walk.py); these are the other shapes that first step can take: a
stream that ends at once, one whose first item is ready at once, one that fails after waiting,
and a client that closes the stream while the server still awaits the handler's first item.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from test_greengrass_server import Peer, gg  # noqa: F401 - gg is the fixture

from ipc.core import CallContext, IpcCore
from ipc.errors import ResourceNotFound
from ipc.greengrass.rpc import MessageFlag, MessageType, encode_rpc, ping
from ipc.greengrass.server import GreengrassServer

OP = "SubscribeToComponentUpdates"
P = "aws.greengrass#"


def register(core: IpcCore, kind: str, released: asyncio.Event, closed: list[str]) -> None:
    async def updates(ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            if kind == "ready":
                yield {"kind": "pre_update", "deployment_id": "d-1"}
            elif kind == "fails_later":
                await released.wait()
                raise ResourceNotFound("gone", {"component": "c"})
            elif kind == "waits":
                await released.wait()
                yield {"kind": "post_update", "deployment_id": "d-2"}
            # "ends": no item at all
        finally:
            closed.append(kind)

    core.register_stream("lifecycle.subscribe_updates", updates)


async def test_a_stream_that_ends_at_once_is_answered_then_closed(gg: GreengrassServer, core: IpcCore) -> None:  # noqa: F811
    closed: list[str] = []
    register(core, "ends", asyncio.Event(), closed)
    peer = await Peer.open(gg)
    sid = peer.call(OP, {})
    m, _ = await peer.reply(sid)
    assert m.service_model_type == P + "SubscribeToComponentUpdatesResponse" and not m.terminates_stream
    end = await peer.next()
    assert (end.stream_id, end.message_type, end.terminates_stream) == (sid, MessageType.APPLICATION_MESSAGE, True)
    assert closed == ["ends"]
    await peer.close()


async def test_a_first_item_ready_at_once_follows_the_response(gg: GreengrassServer, core: IpcCore) -> None:  # noqa: F811
    closed: list[str] = []
    register(core, "ready", asyncio.Event(), closed)
    peer = await Peer.open(gg)
    sid = peer.call(OP, {})
    m, _ = await peer.reply(sid)
    assert m.service_model_type == P + "SubscribeToComponentUpdatesResponse"
    m, event = await peer.reply(sid)
    assert m.service_model_type == P + "ComponentUpdatePolicyEvents"
    assert event == {"preUpdateEvent": {"deploymentId": "d-1", "isGgcRestarting": False}}
    await peer.close()


async def test_an_error_after_waiting_arrives_as_the_streams_error(gg: GreengrassServer, core: IpcCore) -> None:  # noqa: F811
    released = asyncio.Event()
    closed: list[str] = []
    register(core, "fails_later", released, closed)
    peer = await Peer.open(gg)
    sid = peer.call(OP, {})
    m, _ = await peer.reply(sid)
    assert m.service_model_type == P + "SubscribeToComponentUpdatesResponse"
    released.set()
    m, body = await peer.reply(sid)
    assert m.message_type == MessageType.APPLICATION_ERROR and m.terminates_stream
    assert m.service_model_type == P + "ResourceNotFoundError" and body["message"] == "gone"
    await peer.close()


async def test_closing_while_the_handler_waits_ends_it(gg: GreengrassServer, core: IpcCore) -> None:  # noqa: F811
    released = asyncio.Event()
    closed: list[str] = []
    register(core, "waits", released, closed)
    peer = await Peer.open(gg)
    sid = peer.call(OP, {})
    await peer.reply(sid)
    peer.send(encode_rpc(MessageType.APPLICATION_MESSAGE, flags=MessageFlag.TERMINATE_STREAM, stream_id=sid))
    peer.send(ping())
    assert (await peer.next()).message_type == MessageType.PING_RESPONSE
    async with asyncio.timeout(5):
        while closed != ["waits"]:
            await asyncio.sleep(0.01)
    # and the connection goes on: a new stream on it is answered
    released.set()
    sid = peer.call(OP, {})
    m, _ = await peer.reply(sid)
    assert m.service_model_type == P + "SubscribeToComponentUpdatesResponse"
    await peer.close()
