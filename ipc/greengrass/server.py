"""The Greengrass front end: a Unix socket speaking AWS event-stream RPC on top of :class:`IpcCore`.

Components written with AWS's ``awsiotsdk`` (``GreengrassCoreIPCClientV2``) connect here, find the
socket through ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and authenticate with the
``SVCUID`` token the nucleus gives every component. Sessions, tokens, accessControl and the bus are
the core's, so an awsiotsdk component and a native client see each other's messages and are held to
the same policies.

The protocol rules live in the sans-I/O :class:`~ipc.greengrass.rpc.ServerConnection`; this module
is the I/O around it (an asyncio Protocol, so a read turns into routed deliveries without a task
switch), the dispatch of operations (:mod:`ipc.greengrass.operations`), and the bus sink for
SubscribeToTopic streams with the same bounded per-subscriber queues as the native server. Every
failure is confined to its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import structlog

from ipc.admission import MAX_ANONYMOUS_FRAME, has_pending_bytes, peer_credentials
from ipc.bus import BusMessage, Subscription
from ipc.core import IpcCore, Session
from ipc.errors import InvalidArguments, IpcError, LimitExceeded, ServiceError
from ipc.greengrass import operations as ops
from ipc.greengrass.eventstream import DEFAULT_MAX_MESSAGE_SIZE, Header, encode_headers
from ipc.greengrass.rpc import (
    CONTENT_TYPE_HEADER,
    CONTENT_TYPE_JSON,
    SERVICE_MODEL_TYPE_HEADER,
    ConnectRefused,
    ConnectRequested,
    MessageType,
    ProtocolViolation,
    RpcMessage,
    RpcProtocolError,
    ServerConnection,
    StreamClosed,
    StreamClosedError,
    StreamOpened,
)
from ipc.listener import listen_unix, shut_down

log = structlog.get_logger("ipc.greengrass")

FLUSH_AT = 64 * 1024
_PUB_CACHE_MAX = 4096
_WIRE_KEY = "greengrass"
_END: Any = object()  # end of a core stream, for anext()


def _model_headers(shape: str) -> bytes:
    return encode_headers([Header.from_string(CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON),
                           Header.from_string(SERVICE_MODEL_TYPE_HEADER, shape)])


_EVENT_HEADERS = _model_headers(ops.SUBSCRIPTION_RESPONSE_MESSAGE)
_PUBLISH_RESPONSE_HEADERS = _model_headers(ops.PUBLISH_TO_TOPIC_RESPONSE)
_SUBSCRIBE_RESPONSE_HEADERS = _model_headers(ops.SUBSCRIBE_TO_TOPIC_RESPONSE)


@dataclass(slots=True, eq=False)
class _TopicStream:
    """A SubscribeToTopic stream: its bus subscription and receive mode."""

    stream_id: int
    sub: Subscription | None = None
    from_others: bool = False


class _Connection(asyncio.Protocol):
    """One awsiotsdk client: handshake, dispatch, and the bus sink of its SubscribeToTopic streams."""

    def __init__(self, server: GreengrassServer) -> None:
        self.server = server
        self.core = server.core
        self.loop = asyncio.get_running_loop()
        self.rpc = ServerConnection(max_message_size=server.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.pid: int | None = None
        self.uid: int | None = None
        self.closing = False
        self.paused = False
        self.reading_paused = False
        self._flush_handle: asyncio.Handle | None = None
        self._hs_timer: asyncio.TimerHandle | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._topics: dict[int, _TopicStream] = {}     # by subscription id
        self._topic_streams: dict[int, _TopicStream] = {}  # by stream id
        self._pending: dict[Subscription, None] = {}
        self._pub_ok: set[str] = set()
        self._pub_gen = -1
        self._pub_expiry = 0.0
        self._writable = asyncio.Event()
        self._writable.set()
        self._blocked_on: dict[Subscription, None] = {}
        self._block_waiter: asyncio.Task[None] | None = None
        self.dropped = 0

    # --- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server._conns.add(self)
        transport.set_write_buffer_limits(high=server.write_buffer_high)
        self.pid, self.uid = peer_credentials(transport.get_extra_info("socket"))
        if len(server._conns) > server.max_connections:
            log.warning("greengrass.connection_refused", pid=self.pid, reason="too_many_connections",
                        limit=server.max_connections)
            self._abort()
            return
        # Anonymous until CONNECT: a slot of its own bound (ipc/admission.py).
        self.core.admission.admit(self, self.uid, self.pid)
        if self.closing:
            return
        self._hs_timer = self.loop.call_later(server.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._conns.discard(self)
        if self.session is None:
            self.core.admission.done(self, self.uid)
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for task in self._tasks.values():
            task.cancel()
        self._writable.set()
        self._pending.clear()
        self._blocked_on.clear()
        if self.session is not None:
            self.core.end_session(self.session)
            self.session.closer = None
        self._topics.clear()
        self._topic_streams.clear()
        if self.dropped:
            log.info("greengrass.subscriber_dropped", pid=self.pid, dropped=self.dropped)

    def pause_writing(self) -> None:
        self.paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._writable.set()
        if self.reading_paused and self._block_waiter is None and self.transport is not None \
                and not self.closing:
            self.reading_paused = False
            self.transport.resume_reading()
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        rpc = self.rpc
        if rpc.closed:
            return  # lingering after a refusal: read and drop whatever else the client sends
        now = self.loop.time()
        if now > self._pub_expiry or self._pub_gen != self.core.authz_generation:
            self._pub_ok.clear()  # publish decisions follow the core's cache rules
            self._pub_gen = self.core.authz_generation
            self._pub_expiry = now + self.core.authz_cache_ttl
        for event in rpc.receive_data(data):
            if self.closing:
                return
            if isinstance(event, StreamOpened):
                self._on_stream_opened(event)
            elif isinstance(event, StreamClosed):
                self._on_stream_closed(event.stream_id)
            elif isinstance(event, ConnectRequested):
                self._on_connect(event)
            elif isinstance(event, ProtocolViolation):
                if self._log_refusal():
                    log.warning("greengrass.protocol_error", pid=self.pid, reason=event.reason,
                                detail=event.detail[:200],
                                principal=self.session.principal.name if self.session else None)
            elif isinstance(event, ConnectRefused) and self._log_refusal():
                log.warning("greengrass.connect_refused", pid=self.pid, reason=event.reason, detail=event.detail)
            # PingReceived: answered by the state machine; StreamMessage: no operation streams input
        if self.session is None and rpc.buffered > MAX_ANONYMOUS_FRAME and not rpc.closed:
            # A CONNECT is a token: an anonymous peer does not get to buffer a 16 MiB message.
            if self._log_refusal():
                log.warning("greengrass.connect_too_large", pid=self.pid, uid=self.uid, buffered=rpc.buffered,
                            limit=MAX_ANONYMOUS_FRAME)
            self.rpc.close("connect_too_large")
        self._flush()
        if rpc.closed:
            self._finish()
        elif self.paused and not self.reading_paused and self.transport is not None:
            # replies are piling up unread: stop reading this client until its socket drains
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        for event in self.rpc.receive_eof():
            if isinstance(event, ProtocolViolation) and self._log_refusal():
                log.warning("greengrass.protocol_error", pid=self.pid, reason=event.reason)
        return None

    def _log_refusal(self) -> bool:
        """Whether to log a failure of this connection: always once authenticated; before, admission
        counts it and says whether it is the first of a burst (ipc/admission.py, ``refused``)."""
        return self.session is not None or self.core.admission.refused(self.uid, self.pid)

    # --- output -------------------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.transport is None or self.closing:
            return
        data = self.rpc.data_to_send()
        if data:
            self.transport.write(data)

    def _finish(self) -> None:
        """The state machine closed the connection: flush, and close (after a refusal, linger)."""
        if self.closing or self.transport is None:
            return
        self._flush()
        reason = self.rpc.close_reason
        if reason in ("rejected", "version_mismatch", "missing_auth_token"):
            # let the client read the refusing CONNECT_ACK instead of a reset
            self.loop.call_later(self.server.reject_linger, self._abort)
            return
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    # --- handshake ---------------------------------------------------------------------------------
    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if self.session is None and not self.closing:
            self.core.admission.handshake_timed_out(self.uid, self.pid, self.server.handshake_timeout)
            self.rpc.close("handshake_timeout")
            self._abort()

    def subscription_denied(self, sub: Subscription, exc: IpcError) -> None:
        """The core ended ``sub`` on a policy change: its SubscribeToTopic stream ends with the denial."""
        self._pending.pop(sub, None)
        ts = self._topics.pop(sub.id, None)
        if ts is None:
            return
        self._topic_streams.pop(ts.stream_id, None)
        if not self.closing:
            self._send_error(ts.stream_id, exc)

    def speaking(self) -> bool:
        transport = self.transport
        return bool(self.rpc.buffered) or (
            transport is not None and has_pending_bytes(transport.get_extra_info("socket")))

    def shed(self, reason: str) -> None:
        """Admission closes this anonymous connection to make room (ipc/admission.py); it logs the burst."""
        self.rpc.close("shed")
        self._abort()

    def _on_connect(self, event: ConnectRequested) -> None:
        try:
            self.session = self.core.open_session(event.auth_token, self.pid, front_end="greengrass",
                                                  closer=self._revoke)
        except IpcError as exc:
            if self._log_refusal():
                log.warning("greengrass.connect_refused", pid=self.pid, reason=exc.code, detail=exc.message)
            self.rpc.reject()
            return
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self.core.admission.done(self, self.uid)
        self.rpc.accept()

    async def _revoke(self) -> None:
        self._flush()
        self.rpc.close("revoked")
        self._abort()

    # --- dispatch ------------------------------------------------------------------------------------
    def _on_stream_opened(self, event: StreamOpened) -> None:
        sid, op = event.stream_id, event.operation
        if op == ops.PUBLISH_TO_TOPIC:
            self._on_publish(sid, event.message)
            return
        session = self.session
        assert session is not None
        if len(self._tasks) + len(self._topic_streams) >= self.server.max_streams:
            self._send_error(sid, LimitExceeded(f"at most {self.server.max_streams} open operations "
                                                "per connection", {"limit": self.server.max_streams}))
            return
        try:
            req = self._request(event.message)
        except IpcError as exc:
            self._send_error(sid, exc)
            return
        if op == ops.SUBSCRIBE_TO_TOPIC:
            self._on_subscribe(sid, req)
            return
        unary = ops.UNARY.get(op)
        if unary is not None:
            self._start(sid, self._run_unary(sid, op, unary, req))
            return
        stream = ops.STREAMS.get(op)
        if stream is not None:
            self._start(sid, self._run_stream(sid, op, stream, req))
            return
        log.info("greengrass.unsupported_operation", operation=op[:200], principal=session.principal.name)
        self._send_error(sid, ops.unsupported(op))

    @staticmethod
    def _request(message: RpcMessage) -> dict[str, Any]:
        try:
            req = message.json()
        except RpcProtocolError as exc:
            raise InvalidArguments(f"request is not JSON: {exc.message}") from exc
        if not isinstance(req, dict):
            raise InvalidArguments("request must be a JSON object")
        return req

    def _send_error(self, sid: int, exc: IpcError) -> None:
        shape, message, fields = ops.error_shape(exc)
        with contextlib.suppress(StreamClosedError):
            self.rpc.send_error(sid, shape, message, fields=fields)
        self._schedule_flush()

    def _start(self, sid: int, coro: Any) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks[sid] = task
        task.add_done_callback(lambda t: self._tasks.pop(sid, None) if self._tasks.get(sid) is t else None)

    def _on_stream_closed(self, sid: int) -> None:
        task = self._tasks.pop(sid, None)
        if task is not None:
            task.cancel()
        ts = self._topic_streams.pop(sid, None)
        if ts is not None and ts.sub is not None:
            self._topics.pop(ts.sub.id, None)
            self._pending.pop(ts.sub, None)
            if self.session is not None:
                self.core.unsubscribe(self.session, ts.sub)

    # --- PublishToTopic: synchronous fast path -----------------------------------------------------------
    def _on_publish(self, sid: int, message: RpcMessage) -> None:
        session = self.session
        assert session is not None
        try:
            topic, data = ops.publish_data(self._request(message))
            if topic not in self._pub_ok:
                self.core.check_publish(session, topic)
                if len(self._pub_ok) >= _PUB_CACHE_MAX:
                    self._pub_ok.clear()
                self._pub_ok.add(topic)
            _, full = self.core.bus.route(BusMessage(topic, data, session.principal.name))
        except IpcError as exc:
            self._send_error(sid, exc)
            return
        with contextlib.suppress(StreamClosedError):
            self.rpc.send(sid, headers=_PUBLISH_RESPONSE_HEADERS, payload=b"{}", terminate_stream=True)
        if full:
            self._block_reading(full)

    def _block_reading(self, full: list[Subscription]) -> None:
        """A lossless (native) subscriber is full: stop reading this publisher until it has room."""
        assert self.transport is not None
        for sub in full:
            self._blocked_on[sub] = None
        if self._block_waiter is not None:
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

        async def wait() -> None:
            try:
                while self._blocked_on:
                    sub = next(iter(self._blocked_on))
                    await sub.wait_room()
                    self._blocked_on.pop(sub, None)
            finally:
                self._block_waiter = None
                self._blocked_on.clear()
                if not self.closing and self.transport is not None and not self.paused:
                    self.reading_paused = False
                    self.transport.resume_reading()

        self._block_waiter = self.loop.create_task(wait())

    # --- SubscribeToTopic: a bus sink ------------------------------------------------------------------------
    def _on_subscribe(self, sid: int, req: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        ts = _TopicStream(sid)
        try:
            topic_filter, ts.from_others = ops.subscribe_request(req)
            ts.sub = self.core.subscribe(session, topic_filter, self, queue_size=self.server.queue_size)
        except IpcError as exc:
            self._send_error(sid, exc)
            return
        self._topics[ts.sub.id] = ts
        self._topic_streams[sid] = ts
        with contextlib.suppress(StreamClosedError):
            self.rpc.send(sid, headers=_SUBSCRIBE_RESPONSE_HEADERS,
                          payload=ops.dumps({"topicName": topic_filter}))
        self._schedule_flush()

    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        if self.paused or self.closing:
            return False
        ts = self._topics.get(sub.id)
        if ts is None:
            return True  # ended while the message was in flight: nothing to deliver to
        if dropped:
            self.dropped += dropped
        session = self.session
        if ts.from_others and session is not None and msg.sender == session.principal.name:
            return True
        extra = msg.wire_extra
        if extra is None:
            extra = msg.wire_extra = {}
        payload = extra.get(_WIRE_KEY)
        if payload is None:
            payload = extra[_WIRE_KEY] = ops.subscription_event(msg.topic, msg.data)
        try:
            self.rpc.send(ts.stream_id, headers=_EVENT_HEADERS, payload=payload)
        except StreamClosedError:
            return True
        self._schedule_flush()
        return True

    def pending(self, sub: Subscription) -> None:
        if sub.closed:
            self._pending.pop(sub, None)
            return
        self._pending[sub] = None
        if not self.paused and not self.closing:
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Queued messages to the socket, round-robin between subscriptions, until full again."""
        while self._pending and not self.paused and not self.closing:
            for sub in list(self._pending):
                if sub.closed:
                    self._pending.pop(sub, None)
                    continue
                for _ in range(64):
                    item = sub.take()
                    if item is None:
                        self._pending.pop(sub, None)
                        break
                    msg, dropped = item
                    self.offer(sub, msg, dropped)
                    if self.rpc.closed:
                        break
                self._flush()
                if self.paused or self.closing:
                    break
        self._flush()

    # --- other operations ---------------------------------------------------------------------------------------
    async def _run_unary(self, sid: int, op: str, spec: ops.UnaryOperation, req: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        try:
            body = await spec.handler(self.core, session, req)
        except IpcError as exc:
            self._send_error(sid, exc)
            return
        except Exception as exc:
            log.exception("greengrass.handler_failed", operation=op, principal=session.principal.name)
            self._send_error(sid, ServiceError(f"{op} failed: {type(exc).__name__}: {exc}"))
            return
        with contextlib.suppress(StreamClosedError):
            self.rpc.send(sid, headers=_model_headers(spec.response_shape), payload=ops.dumps(body),
                          terminate_stream=True)
        self._schedule_flush()

    async def _run_stream(self, sid: int, op: str, spec: ops.StreamOperation, req: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        try:
            plan = await spec.prepare(self.core, session, req)
        except IpcError as exc:
            self._send_error(sid, exc)
            return
        agen = cast(AsyncGenerator[Any, None], self.core.stream(session, plan.op, plan.args))
        event_headers = _model_headers(spec.stream_shape)
        # The core's stream handlers make their checks (authorization, that the component exists,
        # that the caller is a component) before they first wait. Run the handler up to that wait
        # before answering, so a refusal fails the call, as on Greengrass, instead of arriving
        # after a successful response as the stream's error. One loop turn is enough: the task's
        # first step is queued before this coroutine resumes.
        first: asyncio.Future[Any] = asyncio.ensure_future(agen.__anext__())
        try:
            await asyncio.sleep(0)
            if first.done() and first.exception() is not None and not isinstance(
                    first.exception(), StopAsyncIteration):
                first.result()  # raises: the error below answers the call, no response is sent
            self.rpc.send(sid, headers=_model_headers(spec.response_shape), payload=ops.dumps(plan.response))
            self._schedule_flush()
            try:
                item = await first
            except StopAsyncIteration:
                item = _END
            while item is not _END:
                if self.paused:
                    await self._writable.wait()
                if self.closing:
                    return
                self.rpc.send(sid, headers=event_headers, payload=ops.dumps(plan.event(item)))
                self._schedule_flush()
                item = await anext(agen, _END)
            # the core ended the stream: tell the client
            self.rpc.send(sid, MessageType.APPLICATION_MESSAGE, terminate_stream=True)
            self._schedule_flush()
        except StreamClosedError:
            return
        except IpcError as exc:
            self._send_error(sid, exc)
        except Exception as exc:
            log.exception("greengrass.stream_failed", operation=op, principal=session.principal.name)
            self._send_error(sid, ServiceError(f"{op} failed: {type(exc).__name__}: {exc}"))
        finally:
            if not first.done():  # cancelled before the handler's first step finished
                first.cancel()
                await asyncio.wait({first})
            if not first.cancelled():
                first.exception()  # retrieved, so asyncio does not log it as lost
            await agen.aclose()


class GreengrassServer:
    """Listens on a Unix socket for awsiotsdk clients; ``async with GreengrassServer(core, path):``.

    ``queue_size`` bounds each SubscribeToTopic subscription (drop-oldest, as the native default;
    the byte bound is the core's); ``max_streams`` bounds the operations open at once per connection.
    """

    def __init__(self, core: IpcCore, socket_path: str | Path, *, mode: int = 0o600, group: str | None = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, handshake_timeout: float = 10.0,
                 reject_linger: float = 0.5, max_connections: int = 10000, max_streams: int = 1000,
                 queue_size: int = 1024, write_buffer_high: int = 256 * 1024) -> None:
        self.core = core
        self.socket_path = Path(socket_path)
        self.mode = 0o660 if group is not None and mode == 0o600 else mode
        self.group = group
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.reject_linger = reject_linger
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.queue_size = queue_size
        self.write_buffer_high = write_buffer_high
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        path = self.socket_path
        self._server = await listen_unix(path, lambda: _Connection(self), mode=self.mode, group=self.group)
        log.info("greengrass.server_started", path=str(path), mode=oct(self.mode), group=self.group)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        tasks: list[asyncio.Task[None]] = []
        for conn in list(self._conns):
            tasks.extend(conn._tasks.values())
            conn.rpc.close("server_shutdown")
            conn._abort()
        await shut_down(self._server, self.socket_path, tasks)
        self._server = None
        log.info("greengrass.server_stopped", path=str(self.socket_path))

    async def __aenter__(self) -> GreengrassServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
