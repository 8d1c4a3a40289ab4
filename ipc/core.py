"""The transport-independent IPC service: sessions, authentication, authorization, operations.

Every front end (the native socket server here, the Greengrass event-stream server later) turns
its frames into calls on :class:`IpcCore`, so tokens, policies, topics and operations behave the
same whichever protocol a component speaks, and both kinds of client see each other's messages.

Payloads cross this layer as codec-encoded bytes (``data``, see :mod:`ipc.codec`); only the
convenience :meth:`IpcCore.publish` for the nucleus encodes Python values itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from ipc import codec
from ipc.admission import Admission
from ipc.bus import Bus, BusMessage, Policy, Subscription
from ipc.errors import (
    InvalidArguments,
    IpcError,
    LimitExceeded,
    ResourceNotFound,
    ServiceError,
    Timeout,
    Unauthenticated,
    Unauthorized,
    UnknownOperation,
)
from ipc.topics import validate_topic

log = structlog.get_logger("ipc.core")

PUBSUB = "aws.greengrass.ipc.pubsub"
OP_PUBLISH = "aws.greengrass#PublishToTopic"
OP_SUBSCRIBE = "aws.greengrass#SubscribeToTopic"
DENIAL_LOG_INTERVAL_S = 60.0
_AUTHZ_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    kind: Literal["component", "client", "nucleus"]


NUCLEUS = Principal("nucleus", "nucleus")


class Authenticator(Protocol):
    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        """Map a token (and the peer's PID where known) to a principal or raise Unauthenticated."""
        ...


class Authorizer(Protocol):
    def is_authorized(self, principal: Principal, service: str, operation: str, resource: str) -> bool:
        ...


@dataclass(slots=True)
class CallContext:
    principal: Principal
    session_id: int
    _core: IpcCore | None = field(default=None, repr=False, compare=False)
    _cache: dict[tuple[str, str, str], bool] | None = field(default=None, repr=False, compare=False)
    #: A stream's context: the grants its handler was given (re-checked when policies change).
    _stream: StreamState | None = field(default=None, repr=False, compare=False)

    def authorize(self, service: str, operation: str, resource: str) -> None:
        """Raise Unauthorized naming operation and resource unless a policy allows it."""
        if self._core is None:
            raise ServiceError("call context is not bound to an IPC core")
        self._core.check(self, service, operation, resource)


Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[CallContext, dict[str, Any]], AsyncIterator[Any]]


@dataclass(slots=True, eq=False)
class StreamState:
    """One running stream op of a session, as :meth:`IpcCore.policies_changed` sees it.

    ``grants`` are the (service, operation, resource) its handler was authorized for; a policy change
    that denies one of them ends the stream with the Unauthorized a new call would get. ``task`` is the
    task running the handler's step while it waits for its next item (None between items)."""

    op: str
    grants: dict[tuple[str, str, str], None] = field(default_factory=dict)
    denied: Unauthorized | None = None
    task: asyncio.Task[Any] | None = None
    cancelled: bool = False

    def raise_if_denied(self) -> None:
        if self.denied is not None:
            raise self.denied


MAX_GRANTS_PER_STREAM = 64


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: int
    principal: Principal
    pid: int | None
    since: float        # wall-clock seconds (time.time()) when the session was opened
    name: str | None    # the name the client gave in its handshake
    front_end: str


@dataclass(slots=True, eq=False)
class Session:
    """One authenticated connection as the core sees it; the front end owns the transport."""

    id: int
    principal: Principal
    pid: int | None
    name: str | None
    front_end: str
    since: float
    closer: Callable[[], Awaitable[None]] | None
    ctx: CallContext
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    streams: dict[StreamState, None] = field(default_factory=dict)
    authz_gen: int = 0
    authz_since: float = 0.0
    closed: bool = False

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.principal, self.pid, self.since, self.name, self.front_end)


def _arg(args: Mapping[str, Any], name: str, kind: type | tuple[type, ...], op: str) -> Any:
    value = args.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise InvalidArguments(f"{op}: argument {name!r} is missing or not {getattr(kind, '__name__', kind)}",
                               {"op": op, "argument": name})
    return value


class QueueSink:
    """A sink that feeds an async iterator: for the nucleus's own subscriptions and generic streams."""

    def __init__(self) -> None:
        self._ready: deque[tuple[BusMessage, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.sub: Subscription | None = None
        self.denied: IpcError | None = None

    def subscription_denied(self, sub: Subscription, exc: IpcError) -> None:
        """A policy change ended the subscription: the iterator raises ``exc`` instead of ending."""
        self.denied = exc
        self._ready.clear()
        self._wake()

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        self._ready.append((msg, dropped))
        self._wake()
        return True

    def pending(self, sub: Subscription) -> None:  # offer never refuses
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _refill(self) -> None:
        """Hook for sinks that let the bus hold their overflow."""

    async def get(self) -> tuple[BusMessage, int]:
        while True:
            self._refill()
            if self.denied is not None:
                raise self.denied
            if self._ready:
                break
            if self.sub is not None and self.sub.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._ready.popleft()


class _BoundedQueueSink(QueueSink):
    """QueueSink whose ready list is bounded by the subscription queue: overflow goes to the bus."""

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        if len(self._ready) >= sub.queue_size:
            return False
        return super().offer(sub, msg, dropped)

    def _refill(self) -> None:
        sub = self.sub
        if sub is not None:
            while sub.queue and len(self._ready) < sub.queue_size:
                nxt = sub.take()
                if nxt is None:
                    break
                self._ready.append(nxt)


class IpcCore:
    def __init__(self, authenticator: Authenticator, authorizer: Authorizer, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_subscriptions_per_session: int = 1000,
                 max_sessions_per_principal: int = 256,
                 request_timeout_max: float = 300.0,
                 authz_cache_ttl: float = 2.0,
                 max_queue_bytes: int = 4 * 1024 * 1024) -> None:
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.clock = clock
        self.bus = Bus(max_queue_bytes=max_queue_bytes)
        self.max_subscriptions_per_session = max_subscriptions_per_session
        self.max_sessions_per_principal = max_sessions_per_principal
        self.request_timeout_max = request_timeout_max
        self.authz_cache_ttl = authz_cache_ttl
        #: connections still in their handshake, on every front end of this core (ipc/admission.py)
        self.admission = Admission()
        self._handlers: dict[str, Handler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._authz_gen = 0
        self._denials: dict[tuple[str, str, str], float] = {}
        self._replies: dict[str, asyncio.Future[bytes]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.register("pubsub.publish", self._op_publish)
        self.register("pubsub.request", self._op_request)
        self.register("pubsub.reply", self._op_reply)
        self.register_stream("pubsub.subscribe", self._op_subscribe)

    # --- registry -------------------------------------------------------------------------------
    def register(self, op: str, handler: Handler) -> None:
        if op in self._streams:
            raise ValueError(f"operation {op!r} is already registered as a stream")
        self._handlers[op] = handler

    def register_stream(self, op: str, handler: StreamHandler) -> None:
        if op in self._handlers:
            raise ValueError(f"operation {op!r} is already registered as a unary call")
        self._streams[op] = handler

    def is_stream(self, op: str) -> bool:
        """True for stream ops, False for unary ones; UnknownOperation naming the op otherwise."""
        if op in self._handlers:
            return False
        if op in self._streams:
            return True
        raise UnknownOperation(f"unknown operation {op!r}", {"op": op})

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(self, token: str, peer_pid: int | None, *, name: str | None = None,
                     front_end: str = "native",
                     closer: Callable[[], Awaitable[None]] | None = None) -> Session:
        """Authenticate and register a session; raises Unauthenticated (the token is never logged)."""
        if not isinstance(token, str) or not token:
            raise Unauthenticated("missing token")
        principal = self.authenticator.authenticate(token, peer_pid)
        if principal.kind != "nucleus":
            # One principal must not take the servers' connection slots (and, at 1000 subscriptions
            # each, the memory) that every other component and the CLI share.
            held = sum(1 for s in self._sessions.values() if s.principal == principal)
            if held >= self.max_sessions_per_principal:
                raise LimitExceeded(f"{principal.name} already holds {held} sessions, the most one principal may "
                                    "open", {"limit": self.max_sessions_per_principal, "principal": principal.name})
        sid = next(self._ids)
        ctx = CallContext(principal, sid, self, {})
        session = Session(sid, principal, peer_pid, name, front_end, time.time(), closer, ctx,
                          authz_gen=self._authz_gen, authz_since=self.clock())
        self._sessions[sid] = session
        log.info("ipc.session_opened", session_id=sid, principal=principal.name, kind=principal.kind,
                 pid=peer_pid, client_name=name, front_end=front_end)
        return session

    def end_session(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        for sub in list(session.subscriptions.values()):
            self.bus.unsubscribe(sub)
        session.subscriptions.clear()
        session.streams.clear()
        log.info("ipc.session_closed", session_id=session.id, principal=session.principal.name)

    def sessions(self) -> list[SessionInfo]:
        return [s.info() for s in self._sessions.values()]

    async def close_sessions_of(self, principal_name: str, *, kind: str | None = None) -> None:
        """End the live sessions of a principal (of one ``kind`` only, when given), connections too."""
        for s in [s for s in self._sessions.values()
                  if s.principal.name == principal_name and (kind is None or s.principal.kind == kind)]:
            if s.closer is not None:
                await s.closer()
            self.end_session(s)

    def revoke_sessions(self, principal_name: str, kind: str) -> None:
        """:meth:`close_sessions_of` for synchronous callers (a token rotated or removed): a session
        authenticated with a token that no longer exists must not outlive it. Its subscriptions end
        now; its connections close on the next turn of the loop."""
        doomed = [s for s in self._sessions.values() if s.principal.name == principal_name and s.principal.kind == kind]
        for s in doomed:
            self._revoke(s)

    def _revoke(self, session: Session) -> None:
        closer = session.closer
        self.end_session(session)
        if closer is not None:
            task = asyncio.ensure_future(closer())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- authorization ------------------------------------------------------------------------------
    @property
    def authz_generation(self) -> int:
        """Bumped by :meth:`policies_changed`; front ends key their own decision caches on it."""
        return self._authz_gen

    def policies_changed(self) -> None:
        """Drop cached decisions now (they also expire after ``authz_cache_ttl`` seconds on their own),
        and end what is open that the new policies no longer allow.

        A subscription or a stream is authorized once, when it is made; without this one made under a
        policy a deployment has since narrowed or removed would go on receiving what the policy now
        denies. Each denied one ends alone, with the Unauthorized a new call would get (naming the
        operation and the resource): a local subscription (its sink's ``subscription_denied`` tells the
        client), a stream op (SubscribeToIoTCore, deployments.watch, a watch of another component's
        configuration...). The session and its other subscriptions and streams go on without a gap.
        """
        self._authz_gen += 1
        for session in list(self._sessions.values()):
            principal = session.principal
            if principal.kind == "nucleus":
                continue
            for sub in list(session.subscriptions.values()):
                if not self.authorizer.is_authorized(principal, PUBSUB, OP_SUBSCRIBE, sub.filter):
                    self._end_subscription(session, sub)
            for stream in list(session.streams):
                if stream.denied is not None:
                    continue
                for service, operation, resource in stream.grants:
                    if not self.authorizer.is_authorized(principal, service, operation, resource):
                        self._end_stream(session, stream, service, operation, resource)
                        break

    def _end_subscription(self, session: Session, sub: Subscription) -> None:
        exc = self._denial(session.principal, PUBSUB, OP_SUBSCRIBE, sub.filter)
        log.warning("ipc.subscription_ended_by_policy", session_id=session.id, principal=session.principal.name,
                    filter=sub.filter)
        session.subscriptions.pop(sub.id, None)
        self.bus.unsubscribe(sub)  # what it queued under the old policy goes with it
        denied = getattr(sub.sink, "subscription_denied", None)
        if denied is not None:
            denied(sub, exc)

    def _end_stream(self, session: Session, stream: StreamState, service: str, operation: str,
                    resource: str) -> None:
        stream.denied = self._denial(session.principal, service, operation, resource)
        log.warning("ipc.stream_ended_by_policy", session_id=session.id, principal=session.principal.name,
                    op=stream.op, operation=operation, resource=resource)
        task = stream.task
        if task is not None and not task.done():
            stream.cancelled = True
            task.cancel()  # waiting in the handler: IpcCore.stream turns this into the denial

    def check(self, ctx: CallContext, service: str, operation: str, resource: str) -> None:
        principal = ctx.principal
        if principal.kind == "nucleus":
            return
        cache = ctx._cache
        key = (service, operation, resource)
        if cache is not None:
            session = self._sessions.get(ctx.session_id)
            if session is None:
                # Ended (token revoked, component removed) while its connection is still draining.
                raise Unauthenticated("the session was closed by the nucleus")
            now = self.clock()
            if session.authz_gen != self._authz_gen or now - session.authz_since > self.authz_cache_ttl:
                cache.clear()
                session.authz_gen = self._authz_gen
                session.authz_since = now
            allowed = cache.get(key)
            if allowed is None:
                allowed = bool(self.authorizer.is_authorized(principal, service, operation, resource))
                if len(cache) >= _AUTHZ_CACHE_MAX:
                    cache.clear()
                cache[key] = allowed
        else:
            allowed = bool(self.authorizer.is_authorized(principal, service, operation, resource))
        if not allowed:
            raise self._denial(principal, service, operation, resource)
        stream = ctx._stream
        if stream is not None and key not in stream.grants and len(stream.grants) < MAX_GRANTS_PER_STREAM:
            stream.grants[key] = None

    def _denial(self, principal: Principal, service: str, operation: str, resource: str) -> Unauthorized:
        """The Unauthorized naming operation and resource (logged once a minute per principal, op, resource)."""
        now = self.clock()
        key = (principal.name, operation, resource)
        last = self._denials.get(key)
        if last is None or now - last >= DENIAL_LOG_INTERVAL_S:
            if len(self._denials) >= 10_000:
                self._denials = {k: t for k, t in self._denials.items() if now - t < DENIAL_LOG_INTERVAL_S}
            self._denials[key] = now
            log.warning("ipc.denied", principal=principal.name, service=service, operation=operation,
                        resource=resource)
        return Unauthorized(f"{principal.name} is not authorized to perform {operation} on {resource!r}",
                           {"principal": principal.name, "service": service, "operation": operation,
                            "resource": resource})

    # --- calls ------------------------------------------------------------------------------------
    async def call(self, session: Session, op: str, args: dict[str, Any]) -> Any:
        handler = self._handlers.get(op)
        if handler is None:
            self.is_stream(op)  # raises UnknownOperation for unregistered names
            raise InvalidArguments(f"operation {op!r} is a stream; open it as a stream", {"op": op})
        try:
            return await handler(session.ctx, args)
        except (IpcError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("ipc.handler_failed", op=op, principal=session.principal.name)
            raise ServiceError(f"{op} failed: {type(exc).__name__}: {exc}", {"op": op}) from exc

    async def stream(self, session: Session, op: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        """Run a stream op; the caller owns iteration and must ``aclose()`` on cancel/disconnect.

        The handler runs with a context of its own that records what it was authorized for: when
        policies change and one of those grants is gone, the stream raises that Unauthorized (at once
        if the handler is waiting for its next item, else before the next item is handed out)."""
        handler = self._streams.get(op)
        if handler is None:
            if not self.is_stream(op):
                raise InvalidArguments(f"operation {op!r} is unary; call it", {"op": op})
            raise UnknownOperation(f"unknown operation {op!r}", {"op": op})
        state = StreamState(op)
        base = session.ctx
        ctx = CallContext(base.principal, base.session_id, base._core, base._cache, state)
        if not session.closed:
            session.streams[state] = None
        gen = handler(ctx, args)
        try:
            while True:
                state.raise_if_denied()
                state.task = asyncio.current_task()
                try:
                    item = await gen.__anext__()
                except (Exception, asyncio.CancelledError) as exc:
                    task, state.task = state.task, None
                    if state.cancelled and task is not None:
                        # Our own cancel (policies_changed), however the handler ended on it.
                        state.cancelled = False
                        task.uncancel()
                        state.raise_if_denied()
                    if isinstance(exc, StopAsyncIteration):
                        return
                    raise
                finally:
                    state.task = None
                state.raise_if_denied()
                yield item
        except (IpcError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            log.exception("ipc.handler_failed", op=op, principal=session.principal.name)
            raise ServiceError(f"{op} failed: {type(exc).__name__}: {exc}", {"op": op}) from exc
        finally:
            session.streams.pop(state, None)
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()

    # --- pub/sub ----------------------------------------------------------------------------------
    def check_publish(self, session: Session, topic: str) -> None:
        validate_topic(topic)
        self.check(session.ctx, PUBSUB, OP_PUBLISH, topic)

    async def publish(self, principal: Principal, topic: str, payload: Any) -> int:
        """Publish a Python value (encoded here); the nucleus's own publishing path."""
        validate_topic(topic)
        if principal.kind != "nucleus":
            self.check(CallContext(principal, 0, self), PUBSUB, OP_PUBLISH, topic)
        return await self.bus.publish_async(topic, codec.encode(payload), principal.name)

    async def publish_data(self, session: Session, topic: str, data: bytes, *,
                           reply_to: str | None = None) -> int:
        self.check_publish(session, topic)
        return await self.bus.publish_async(topic, data, session.principal.name, reply_to=reply_to)

    def subscribe(self, session: Session, topic_filter: str, sink: Any, *, queue_size: int = 1024,
                  policy: Policy = "drop_oldest", sub_id: int | None = None) -> Subscription:
        """Authorize and register a subscription owned by ``session`` (ended with it)."""
        if session.closed:
            raise ResourceNotFound("session is closed")
        if not isinstance(topic_filter, str):
            raise InvalidArguments("filter must be a string", {"filter": repr(topic_filter)})
        if len(session.subscriptions) >= self.max_subscriptions_per_session:
            raise LimitExceeded(f"at most {self.max_subscriptions_per_session} subscriptions per session",
                                {"limit": self.max_subscriptions_per_session})
        if sub_id is not None and sub_id in session.subscriptions:
            raise InvalidArguments(f"subscription id {sub_id} is already in use", {"id": sub_id})
        self.check(session.ctx, PUBSUB, OP_SUBSCRIBE, topic_filter)
        sub = self.bus.subscribe(topic_filter, sink, queue_size, policy, owner=session, sub_id=sub_id)
        session.subscriptions[sub.id] = sub
        return sub

    def unsubscribe(self, session: Session, sub: Subscription) -> None:
        session.subscriptions.pop(sub.id, None)
        self.bus.unsubscribe(sub)

    @contextlib.asynccontextmanager
    async def messages(self, topic_filter: str, *, queue_size: int = 1024, policy: Policy = "drop_oldest",
                       ) -> AsyncIterator[AsyncIterator[tuple[BusMessage, int]]]:
        """The nucleus's own subscription (no authorization, no session).

        ``async with core.messages("x/#") as it: async for msg, dropped in it: ...``
        """
        sink = _BoundedQueueSink()
        sub = self.bus.subscribe(topic_filter, sink, queue_size, policy, owner=None)
        sink.sub = sub

        async def it() -> AsyncIterator[tuple[BusMessage, int]]:
            while True:
                try:
                    yield await sink.get()
                except StopAsyncIteration:
                    return

        try:
            yield it()
        finally:
            self.bus.unsubscribe(sub)

    # --- built-in operations --------------------------------------------------------------------------
    async def _op_publish(self, ctx: CallContext, args: dict[str, Any]) -> int:
        topic = _arg(args, "topic", str, "pubsub.publish")
        data = _arg(args, "payload", bytes, "pubsub.publish")
        validate_topic(topic)
        ctx.authorize(PUBSUB, OP_PUBLISH, topic)
        return await self.bus.publish_async(topic, data, ctx.principal.name)

    async def _op_subscribe(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        session = self._sessions.get(ctx.session_id)
        if session is None:
            raise ResourceNotFound("session is closed")
        sink = _BoundedQueueSink()
        sub = self.subscribe(session, _arg(args, "filter", str, "pubsub.subscribe"), sink,
                             queue_size=args.get("queue_size", 1024),
                             policy=args.get("policy", "drop_oldest"))
        sink.sub = sub
        try:
            while True:
                try:
                    msg, dropped = await sink.get()
                except StopAsyncIteration:
                    return
                yield {"topic": msg.topic, "payload": msg.data, "sender": msg.sender,
                       "reply_to": msg.reply_to, "dropped": dropped}
        finally:
            self.unsubscribe(session, sub)

    async def _op_request(self, ctx: CallContext, args: dict[str, Any]) -> bytes:
        topic = _arg(args, "topic", str, "pubsub.request")
        data = _arg(args, "payload", bytes, "pubsub.request")
        timeout = args.get("timeout", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= self.request_timeout_max:
            raise InvalidArguments(f"pubsub.request: timeout must be in (0, {self.request_timeout_max}] s",
                                   {"timeout": repr(timeout)})
        validate_topic(topic)
        ctx.authorize(PUBSUB, OP_PUBLISH, topic)
        handle = "r." + secrets.token_urlsafe(12)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[handle] = fut
        try:
            n = await self.bus.publish_async(topic, data, ctx.principal.name, reply_to=handle)
            if n == 0:
                raise ResourceNotFound(f"no subscriber for request topic {topic!r}", {"topic": topic})
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise Timeout(f"no reply on {topic!r} within {timeout} s",
                              {"topic": topic, "timeout": timeout}) from None
        finally:
            self._replies.pop(handle, None)

    async def _op_reply(self, ctx: CallContext, args: dict[str, Any]) -> None:
        handle = _arg(args, "reply_to", str, "pubsub.reply")
        data = _arg(args, "payload", bytes, "pubsub.reply")
        fut = self._replies.pop(handle, None)
        if fut is None or fut.done():
            raise ResourceNotFound("reply handle unknown, expired or already answered", {"reply_to": handle})
        fut.set_result(data)
