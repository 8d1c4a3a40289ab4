"""IpcCore without a socket: registry, authorization and its rate-limited log, request/reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ipc_testkit import Policy, TokenAuth
from structlog.testing import capture_logs

from ipc import codec
from ipc.core import NUCLEUS, CallContext, IpcCore, Principal
from ipc.errors import (
    InvalidArguments,
    ResourceNotFound,
    ServiceError,
    Timeout,
    Unauthenticated,
    Unauthorized,
    UnknownOperation,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(clock: Clock | None = None) -> IpcCore:
    return IpcCore(TokenAuth(), Policy(), clock=clock or Clock())


def test_open_session_refuses_unknown_and_missing_tokens() -> None:
    core = make_core()
    with pytest.raises(Unauthenticated):
        core.open_session("nope", 1)
    with pytest.raises(Unauthenticated):
        core.open_session("", 1)
    s = core.open_session("tok-alice", 42, name="cli")
    assert [(i.principal.name, i.pid, i.name) for i in core.sessions()] == [("alice", 42, "cli")]
    core.end_session(s)
    assert core.sessions() == []


def test_denial_names_operation_and_resource_and_logs_once_per_minute() -> None:
    clock = Clock()
    core = make_core(clock)
    eve = core.open_session("tok-eve", None)
    with capture_logs() as logs:
        for _ in range(50):
            with pytest.raises(Unauthorized) as info:
                core.check_publish(eve, "private/x")
            assert "aws.greengrass#PublishToTopic" in str(info.value) and "private/x" in str(info.value)
        clock.now += 59
        with pytest.raises(Unauthorized):
            core.check_publish(eve, "private/x")
        with pytest.raises(Unauthorized):
            core.check_publish(eve, "private/y")  # another resource: its own log line
        clock.now += 2
        with pytest.raises(Unauthorized):
            core.check_publish(eve, "private/x")
    denied = [e for e in logs if e["event"] == "ipc.denied"]
    assert [(e["principal"], e["resource"]) for e in denied] == [
        ("eve", "private/x"), ("eve", "private/y"), ("eve", "private/x")]
    assert info.value.details["operation"] == "aws.greengrass#PublishToTopic"


def test_decisions_are_cached_until_policies_change() -> None:
    policy = Policy()
    core = IpcCore(TokenAuth(), policy)
    eve = core.open_session("tok-eve", None)
    for _ in range(10):
        core.check_publish(eve, "public/a")
    assert policy.calls == 1
    policy.grants["eve"] = []
    core.check_publish(eve, "public/a")  # still cached: the nucleus has not said policies changed
    core.policies_changed()
    with pytest.raises(Unauthorized):
        core.check_publish(eve, "public/a")


async def test_nucleus_principal_is_always_allowed() -> None:
    core = make_core()
    async with core.messages("nucleus/#") as it:
        assert await core.publish(NUCLEUS, "nucleus/x", {"a": 1}) == 1
        msg, dropped = await anext(aiter(it))
        assert codec.decode(msg.data) == {"a": 1} and msg.sender == "nucleus" and dropped == 0
    with pytest.raises(Unauthorized):
        await core.publish(Principal("eve", "component"), "nucleus/x", 1)


async def test_unknown_operation_is_named() -> None:
    core = make_core()
    s = core.open_session("tok-alice", None)
    with pytest.raises(UnknownOperation, match=r"'deployments\.create'"):
        await core.call(s, "deployments.create", {})
    with pytest.raises(UnknownOperation):
        core.is_stream("nope")


async def test_registered_handlers_get_context_and_failures_become_service_errors() -> None:
    core = make_core()
    seen: list[CallContext] = []

    async def ok(ctx: CallContext, args: dict[str, Any]) -> Any:
        seen.append(ctx)
        ctx.authorize("svc", "op", "res")
        return args["x"] * 2

    async def broken(ctx: CallContext, args: dict[str, Any]) -> Any:
        raise KeyError("boom")

    async def counter(ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[int]:
        for i in range(args["n"]):
            yield i

    core.register("t.ok", ok)
    core.register("t.broken", broken)
    core.register_stream("t.count", counter)
    s = core.open_session("tok-alice", None)
    assert await core.call(s, "t.ok", {"x": 21}) == 42
    assert seen[0].principal.name == "alice" and seen[0].session_id == s.id
    with pytest.raises(ServiceError, match=r"t\.broken"):
        await core.call(s, "t.broken", {})
    assert [i async for i in core.stream(s, "t.count", {"n": 3})] == [0, 1, 2]
    with pytest.raises(InvalidArguments):
        await core.call(s, "t.count", {})
    with pytest.raises(ValueError):
        core.register("t.count", ok)


async def test_request_reply_and_timeout() -> None:
    core = make_core()
    req = core.open_session("tok-alice", None)
    async with core.messages("svc/echo") as it:
        async def responder() -> None:
            async for msg, _ in it:
                await core.call(req, "pubsub.reply", {"reply_to": msg.reply_to, "payload": msg.data})
                return

        task = asyncio.create_task(responder())
        data = await core.call(req, "pubsub.request", {"topic": "svc/echo", "payload": codec.encode("hi")})
        assert codec.decode(data) == "hi"
        await task
        with pytest.raises(Timeout):
            await core.call(req, "pubsub.request", {"topic": "svc/echo", "payload": b"\xc0", "timeout": 0.05})
    with pytest.raises(ResourceNotFound):  # nobody subscribed: fail fast instead of waiting
        await core.call(req, "pubsub.request", {"topic": "svc/echo", "payload": b"\xc0"})
    with pytest.raises(ResourceNotFound):
        await core.call(req, "pubsub.reply", {"reply_to": "r.forged", "payload": b"\xc0"})


async def test_generic_subscribe_stream_for_other_front_ends() -> None:
    core = make_core()
    s = core.open_session("tok-bob", None)
    items = core.stream(s, "pubsub.subscribe", {"filter": "a/#", "queue_size": 4})
    first = asyncio.ensure_future(anext(items))
    await asyncio.sleep(0)
    await core.publish(NUCLEUS, "a/b", [1])
    item = await asyncio.wait_for(first, 5)
    assert item["topic"] == "a/b" and codec.decode(item["payload"]) == [1]
    await items.aclose()
    assert len(core.bus) == 0


async def test_close_sessions_of_calls_the_front_end_closer() -> None:
    core = make_core()
    closed: list[str] = []

    async def closer() -> None:
        closed.append("x")

    core.open_session("tok-alice", None, closer=closer)
    core.open_session("tok-bob", None)
    await core.close_sessions_of("alice")
    assert closed == ["x"] and [i.principal.name for i in core.sessions()] == ["bob"]


def test_subscription_cap_per_session() -> None:
    core = IpcCore(TokenAuth(), Policy(), max_subscriptions_per_session=3)
    s = core.open_session("tok-alice", None)

    class S:
        def offer(self, *a: object) -> bool:
            return True

        def pending(self, *a: object) -> None:
            return None

    for _ in range(3):
        core.subscribe(s, "a", S())
    with pytest.raises(Exception, match="at most 3") as info:
        core.subscribe(s, "a", S())
    assert getattr(info.value, "code", None) == "LIMIT_EXCEEDED"
