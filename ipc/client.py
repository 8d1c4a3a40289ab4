"""The component SDK: one connection to the nucleus, pub/sub, request/reply and nucleus operations.

Design choices a component author can rely on:

* ``publish`` is pipelined: it returns once the frame is buffered (awaiting only when the socket
  is full), and frames are written in batches once per event-loop turn. By default the first
  publish on each topic waits for the server's verdict so a denied or invalid topic raises at
  once; errors of later pipelined publishes are raised by the next ``publish``.
* A subscription is an async iterator inside an ``async with`` block: leaving the block
  unsubscribes. Each has a bounded local queue with the same policy as the server side
  (``drop_oldest``: the oldest is dropped and counted into the next message's ``dropped``;
  ``block``: the connection stops reading, so back-pressure reaches the publisher).
* Where the server offers it (WELCOME ``features``), deliveries arrive in batches (MESSAGES) and
  runs of pipelined publishes to one topic leave as one PUBLISH_MANY frame: a message then costs
  this process a list item and a :class:`Message`, not a frame. Nothing changes for the caller.
* Failures raise the :mod:`ipc.errors` subclass matching the server's stable code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import structlog

from ipc import codec
from ipc import protocol as P
from ipc.errors import (
    ConnectionClosed,
    InvalidArguments,
    IpcError,
    ProtocolError,
    Timeout,
    Unauthenticated,
    from_wire,
)

log = structlog.get_logger("ipc.client")

DEFAULT_MAX_FRAME = P.DEFAULT_MAX_FRAME
_FLUSH_AT = 64 * 1024
_RUN_ITEM_MAX = 16 * 1024  # larger payloads leave as their own PUBLISH (no batching gain, bounded frames)
_CONFIRMED_MAX = 10_000
_NO_PAYLOAD: Any = object()
_RECONNECT_HINT = ("; the nucleus stopped or restarted, or dropped this client: it cannot be used again, connect "
                   "a new Client once the nucleus is back (a component is restarted by the nucleus instead)")
_HDR = P.HEADER.pack
_decode = codec.decode
_ITEM_HEADS: dict[int, bytes] = {}
T = TypeVar("T")


def _item_head(n: int) -> bytes:
    """What precedes an ``n``-byte bytes payload in PUBLISH data: bin(bin(payload)) headers, cached."""
    inner = P.bin_header(n)
    head = P.bin_header(len(inner) + n) + inner
    if len(_ITEM_HEADS) < 4096:
        _ITEM_HEADS[n] = head
    return head


class Message:
    """A delivered pub/sub message; ``payload`` is decoded on first access."""

    __slots__ = ("_client", "_payload", "data", "dropped", "reply_to", "sender", "topic")

    def __init__(self, topic: str, data: bytes, dropped: int = 0,  # noqa: PLR0917 - hot path, positional
                 reply_to: str | None = None, sender: str | None = None, client: Client | None = None,
                 payload: Any = _NO_PAYLOAD) -> None:
        self.topic = topic
        self.data = data
        self.dropped = dropped
        self.reply_to = reply_to
        self.sender = sender
        self._client = client
        self._payload = payload

    @property
    def payload(self) -> Any:
        p = self._payload
        if p is _NO_PAYLOAD:
            p = self._payload = _decode(self.data)
        return p

    @property
    def raw(self) -> bytes | None:
        """The payload if it was sent as bytes, else None."""
        if self._payload is _NO_PAYLOAD:
            raw = codec.encoded_bytes(self.data)
            if raw is not None:
                return raw
        p = self.payload
        return p if isinstance(p, bytes) else None

    async def reply(self, payload: Any) -> None:
        """Answer a request (only messages sent with ``Client.request`` carry a reply handle)."""
        if self.reply_to is None or self._client is None:
            raise InvalidArguments("this message was not sent as a request; there is nothing to reply to",
                                   {"topic": self.topic})
        await self._client.call("pubsub.reply", {"reply_to": self.reply_to, "payload": codec.encode(payload)})

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, bytes={len(self.data)}, dropped={self.dropped}, "
                f"sender={self.sender!r})")


class CloudMessage(Message):
    """A message from the cloud broker: also whether the broker sent it as retained, and its MQTT 5
    publish properties (``{}`` when it had none; names as in ``cloud_sync.service.PROPERTY_NAMES``)."""

    __slots__ = ("properties", "retain")

    def __init__(self, topic: str, payload: Any, *, dropped: int, retain: bool, properties: dict[str, Any],
                 client: Client | None) -> None:
        super().__init__(topic, b"", dropped, None, "cloud", client, payload=payload)
        self.retain = retain
        self.properties = properties


class _Feed:
    """A bounded local queue behind an async iterator (subscriptions and generic streams).

    Subscriptions use credit: the server sends at most ``queue_size`` messages ahead of what the
    consumer has taken, and the feed returns credit as it is consumed. So the local queue never
    overflows, the socket is never paused for it, and replies to calls made from inside the
    ``async for`` loop keep flowing (no deadlock). Generic streams fall back to pausing the socket.
    """

    __slots__ = ("_client", "_waiter", "consumed", "ended", "error", "policy", "q", "queue_size", "sid",
                 "throttled")

    def __init__(self, client: Client, queue_size: int, policy: str, sid: int = 0) -> None:
        self._client = client
        self.sid = sid  # > 0: a credit-based subscription
        self.consumed = 0
        self.q: deque[Any] = deque()
        self.queue_size = queue_size
        self.policy = policy
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.error: BaseException | None = None
        self.throttled = False

    def push(self, item: Any) -> None:
        q = self.q
        if len(q) >= self.queue_size:
            if self.policy == "drop_oldest":
                old = q.popleft()
                if isinstance(old, Message):
                    carried = old.dropped + 1
                    if q:
                        q[0].dropped += carried
                    else:
                        item.dropped += carried
            elif not self.throttled and not self.sid:
                self.throttled = True
                self._client._throttle(+1)
        q.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def push_many(self, items: list[Any]) -> None:
        """A batch from one frame: appended at once, one wake-up for the consumer."""
        q = self.q
        if len(q) + len(items) <= self.queue_size:
            q.extend(items)
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)
        else:
            for item in items:  # over the bound: the per-item policy decides
                self.push(item)

    def end(self, error: BaseException | None = None) -> None:
        self.ended = True
        if error is not None and self.error is None:
            self.error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> Any:
        q = self.q
        if not q:
            await self._wait()
        item = q.popleft()
        if self.sid:
            c = self.consumed + 1
            if c * 2 >= self.queue_size and not self.ended:
                self._client._grant(self.sid, c)
                c = 0
            self.consumed = c
        elif self.throttled and len(q) <= self.queue_size // 2:
            self.throttled = False
            self._client._throttle(-1)
        return item

    async def _wait(self) -> None:
        """The slow path: only an empty queue creates a future and suspends."""
        q = self.q
        while not q:
            if self.ended:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            if self._waiter is not None:
                # a second consumer would replace the first one's waiter, which then never wakes (not even
                # when the connection ends): refuse it instead of hanging
                raise InvalidArguments("this subscription is already being iterated by another task or thread; "
                                       "it has one consumer: subscribe again (same filter) for a second one")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client._transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(exc)

    def pause_writing(self) -> None:
        self.client._can_write.clear()

    def resume_writing(self) -> None:
        self.client._can_write.set()


class Client:
    """An async IPC client; use as ``async with Client.from_env() as c:``."""

    def __init__(self, socket_path: str | Path, token: str, *, name: str | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, connect_timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self._token = token
        self.name = name
        self.max_frame = max_frame
        self.connect_timeout = connect_timeout
        self.principal: str | None = None
        self.server_limits: dict[str, Any] = {}
        self._transport: asyncio.Transport | None = None
        self._decoder = P.FrameDecoder(max_frame)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._feeds: dict[int, _Feed] = {}
        self._welcome: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closed_error: IpcError | None = None
        self._pipeline_error: IpcError | None = None
        self._confirmed: set[str] = set()
        self._topics: dict[str, bytes] = {}
        self._batch = False  # the server accepts PUBLISH_MANY and sends MESSAGES (WELCOME features)
        self._run_topic: str | None = None  # the open PUBLISH_MANY run: its topic, items and size
        self._run: list[bytes] = []
        self._run_n = 0
        self._run_size = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._throttles = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"Client(socket_path={self.socket_path!r}, name={self.name!r})"  # never the token

    @classmethod
    def from_env(cls, *, max_frame: int = DEFAULT_MAX_FRAME) -> Client:
        """Build from what the nucleus hands a component: NUCLEUS_IPC_SOCKET and SVCUID."""
        path = os.environ.get("NUCLEUS_IPC_SOCKET")
        token = os.environ.get("SVCUID") or os.environ.get("NUCLEUS_IPC_TOKEN")
        if not path or not token:
            missing = [n for n, v in (("NUCLEUS_IPC_SOCKET", path), ("SVCUID or NUCLEUS_IPC_TOKEN", token))
                       if not v]
            raise InvalidArguments(
                f"not running under nucleus: environment variable(s) {', '.join(missing)} unset",
                {"missing": missing})
        return cls(path, token, name=os.environ.get("NUCLEUS_COMPONENT_NAME"), max_frame=max_frame)

    # --- connection -----------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._transport is not None:
            # already connected (``await c.connect()`` then ``async with c``): nothing to do. A second
            # connection would orphan the first (its socket and its session on the server); and after
            # close() or a lost connection this client's state is the old connection's: it would not work.
            if self.connected:
                return
            raise ConnectionClosed(f"this Client ({self.socket_path}) is closed: create a new Client to connect "
                                   "again", {"socket": self.socket_path})
        loop = self._loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        self._lost = loop.create_future()
        try:
            await loop.create_unix_connection(lambda: _Protocol(self), self.socket_path)
        except OSError as exc:
            raise ConnectionClosed(
                f"cannot connect to {self.socket_path}: {exc.strerror or exc}; is a nucleus running there "
                "('nucleus status --root DIR'; its socket is <root>/ipc.sock) and may this user open it?",
                {"socket": self.socket_path}) from exc
        self._write(P.hello(self._token, self.name))
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._welcome
        except TimeoutError:
            await self.close()
            raise Timeout(f"no WELCOME from {self.socket_path} within {self.connect_timeout} s") from None
        except Unauthenticated as exc:
            await self.close()
            raise Unauthenticated(
                f"{exc.message} (connecting to {self.socket_path}"
                + (f" as {self.name}" if self.name else "") + "): a component's SVCUID is new at every daemon "
                "start (use the one its process was started with); a declared client's token is in "
                "<root>/clients/NAME.token, and 'nucleus client add NAME' replaces it", exc.details) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        t = self._transport
        if t is None:
            return
        self._closing = True
        if self._loop is not None and self._loop.is_closed():
            # connected under an event loop that has ended: that loop can no longer close its transport
            # ("Event loop is closed"), so close the socket itself, or its fd stays open
            sock = t.get_extra_info("socket")
            if sock is not None:
                getattr(sock, "_sock", sock).close()
            if self._closed_error is None:
                self._closed_error = ConnectionClosed(f"this Client ({self.socket_path}) is closed; create a new "
                                                      "Client", {"socket": self.socket_path})
            return
        self._flush()
        if not t.is_closing():
            t.close()
        if self._lost is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._lost), 5.0)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._closed_error is None and not self._transport.is_closing()

    # --- protocol callbacks --------------------------------------------------------------------------
    def _protocol_error(self, exc: ProtocolError) -> None:
        self._closed_error = exc
        if self._transport is not None:
            self._transport.close()

    def _on_data(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        feeds = self._feeds
        for f in frames:
            t = f[0]
            if t == P.MESSAGES:
                feed = feeds.get(f[1])
                items = f[3]
                if type(items) is not list or len(items) % P.MESSAGES_FIELDS:
                    self._protocol_error(ProtocolError("MESSAGES items are not reply_to, sender, topic, data"))
                    return
                if feed is not None and items:
                    it = iter(items)
                    batch = [Message(topic, data_, 0, reply_to, sender, self)
                             for reply_to, sender, topic, data_ in zip(it, it, it, it, strict=True)]
                    if f[2]:
                        batch[0].dropped = f[2]
                    feed.push_many(batch)
            elif t == P.MESSAGE:
                _, sid, dropped, reply_to, sender, topic, data_ = f
                feed = feeds.get(sid)
                if feed is not None:
                    feed.push(Message(topic, data_, dropped, reply_to, sender, self))
            elif t == P.RESPONSE:
                fut = self._pending.pop(f[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(f[2])
            elif t == P.STREAM_ITEM:
                feed = feeds.get(f[1])
                if feed is not None:
                    feed.push(f[2])
            elif t == P.STREAM_END:
                feed = feeds.pop(f[1], None)
                if feed is not None:
                    err = f[2]
                    feed.end(from_wire(*err) if isinstance(err, list) and len(err) == 3 else None)
            elif t == P.ERROR:
                self._on_error(f)
            elif t == P.WELCOME:
                self.principal = f[2]
                self.server_limits = f[3] if isinstance(f[3], dict) else {}
                features = self.server_limits.get("features")
                self._batch = isinstance(features, list) and P.FEATURE_BATCH in features
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(None)

    def _on_error(self, f: P.Frame) -> None:
        _, rid, code, message, details = f
        err = from_wire(str(code), str(message), details if isinstance(details, dict) else None)
        if rid is None:  # connection-level: the server closes after this
            if isinstance(err, ConnectionClosed):  # e.g. "the server is shutting down": and then what
                err = ConnectionClosed(err.message + _RECONNECT_HINT, err.details)
            self._closed_error = err
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(err)
            log.warning("ipc.client_rejected", code=err.code, reason=err.message)
            return
        if rid == 0:
            if self._pipeline_error is None:
                self._pipeline_error = err
            return
        fut = self._pending.pop(rid, None)
        if fut is not None:
            if not fut.done():
                fut.set_exception(err)
            return
        feed = self._feeds.pop(rid, None)
        if feed is not None:
            feed.end(err)

    def _on_lost(self, exc: Exception | None) -> None:
        if self._closed_error is not None:
            err = self._closed_error
        elif self._closing:
            err = ConnectionClosed(f"this Client ({self.socket_path}) is closed (close() or the end of its "
                                   "'async with'); create a new Client", {"socket": self.socket_path})
        else:
            err = ConnectionClosed(f"connection to {self.socket_path} lost" + (f" ({exc})" if exc else "")
                                   + _RECONNECT_HINT, {"socket": self.socket_path})
        self._closed_error = err
        self._can_write.set()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for feed in self._feeds.values():
            feed.end(err)
        self._feeds.clear()
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(err)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _grant(self, sid: int, n: int) -> None:
        if self.connected and sid in self._feeds:
            self._write(P.credit(sid, n))

    def _throttle(self, delta: int) -> None:
        """Lossless feeds stop the socket reader when full (so the server holds, then the publisher)."""
        self._throttles += delta
        t = self._transport
        if t is None or t.is_closing():
            return
        if delta > 0 and self._throttles == 1:
            t.pause_reading()
        elif delta < 0 and self._throttles == 0:
            t.resume_reading()

    # --- output ------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error
        if self._transport is None:
            raise ConnectionClosed("not connected; use 'async with Client(...)' or await connect()")
        loop = self._loop
        if loop is not None and loop.is_closed():
            # asyncio would say only "Event loop is closed", from deep inside a write
            raise ConnectionClosed(
                "this Client was connected in an event loop that has ended (asyncio.run returned); a Client "
                "belongs to the loop it connected in: create and connect a new one in this loop",
                {"socket": self.socket_path})
        if loop is not None and asyncio.get_running_loop() is not loop:
            # its futures belong to its own loop: awaited here they fail deep in asyncio, or never resolve
            raise InvalidArguments(
                "this Client is used from another event loop (thread) than the one it connected in; a Client "
                "belongs to one loop: connect one per loop, or share a SyncClient between threads",
                {"socket": self.socket_path})

    def _refuse_oversize(self, size: int, what: str) -> None:
        """Refuse a frame over the server's limit here: sent, it would make the server close the whole
        connection (FRAME_TOO_LARGE), failing every subscription and call of this client with it."""
        limit = self.server_limits.get("max_frame")
        if not isinstance(limit, int) or limit <= 0:
            limit = self.max_frame
        if size > limit:
            raise InvalidArguments(
                f"{what}: the frame would be {size} bytes, over the nucleus's frame limit of {limit} bytes "
                "(limits.max_frame); send less per message (split it, or publish a file's path instead); "
                "nothing was sent and the connection stays open", {"size": size, "limit": limit})

    def _write(self, frame: bytes) -> None:
        if self._run_n:
            self._close_run()  # frames leave in the order they were written
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= _FLUSH_AT:
            self._flush()
        elif self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._run_n:
            self._close_run()
        out = self._out
        if not out:
            return
        t = self._transport
        if t is None or t.is_closing():
            out.clear()
            self._out_bytes = 0
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        t.write(data)

    # --- pub/sub -----------------------------------------------------------------------------------------
    async def publish(self, topic: str, payload: Any, *, confirm: bool | None = None) -> None:
        """Publish; see the module docstring for the pipelining and confirmation rules."""
        if self._pipeline_error is not None:
            err, self._pipeline_error = self._pipeline_error, None
            raise err
        if self._closed_error is not None:
            raise self._closed_error
        if confirm is None:
            confirm = topic not in self._confirmed
        if confirm:
            self._check()
            data = codec.encode(payload)
            rid = next(self._ids)
            fut = self._loop.create_future() if self._loop else asyncio.get_running_loop().create_future()
            head, body = P.publish_parts(rid, topic, data)
            self._refuse_oversize(len(head) - P.HEADER.size + len(body), f"publish to {topic!r}")
            self._pending[rid] = fut
            self._write(head)
            self._write(body)
            await fut
            if len(self._confirmed) >= _CONFIRMED_MAX:
                self._confirmed.clear()
            self._confirmed.add(topic)
            return
        if self._transport is None:
            self._check()
        if type(payload) is bytes:
            # the payload goes to the output list as is: copied once, when the batch is joined
            ln = len(payload)
            if self._batch and ln <= _RUN_ITEM_MAX:
                item = _ITEM_HEADS.get(ln) or _item_head(ln)
                if topic != self._run_topic:
                    if self._run_n:
                        self._close_run()
                    self._run_topic = topic
                run = self._run
                run.append(item)
                run.append(payload)
                self._run_n += 1
                ln += len(item)
                self._run_size += ln
                self._out_bytes += ln
            else:
                inner = P.bin_header(ln)
                self._append_publish(topic, inner, len(inner) + ln, payload)
        else:
            data = codec.encode(payload)
            if self._batch and len(data) <= _RUN_ITEM_MAX:
                if topic != self._run_topic:
                    if self._run_n:
                        self._close_run()
                    self._run_topic = topic
                item = P.bin_header(len(data)) + data
                self._run.append(item)
                self._run_n += 1
                self._run_size += len(item)
                self._out_bytes += len(item)
            else:
                self._append_publish(topic, data, len(data), None)
        if self._out_bytes >= _FLUSH_AT:
            self._flush()
            if not self._can_write.is_set():
                await self._can_write.wait()
                if self._closed_error is not None:
                    raise self._closed_error
        elif self._flush_handle is None:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)

    def _close_run(self) -> None:
        """The open run of pipelined publishes to one topic goes out: PUBLISH_MANY, or PUBLISH for one."""
        topic = self._run_topic
        assert topic is not None
        run = self._run
        out = self._out
        if self._run_n == 1:
            tp = self._topic_head(topic)
            out.append(_HDR(len(tp) + self._run_size) + tp)
        else:
            out.append(P.publish_many_head(topic, self._run_n, self._run_size))
        out.extend(run)
        run.clear()
        self._run_n = self._run_size = 0
        self._run_topic = None

    def _topic_head(self, topic: str) -> bytes:
        """``[9, 0, topic`` of an unconfirmed PUBLISH, cached per topic."""
        tp = self._topics.get(topic)
        if tp is None:
            if len(self._topics) >= _CONFIRMED_MAX:
                self._topics.clear()
            tp = self._topics[topic] = b"\x94\x09\x00" + P.encode_value(topic)
        return tp

    def _append_publish(self, topic: str, data: bytes, size: int, more: bytes | None) -> None:
        """An unconfirmed PUBLISH whose data is ``data`` (+ ``more``), ``size`` bytes in all."""
        head = self._topic_head(topic) + P.bin_header(size)
        self._refuse_oversize(len(head) + size, f"publish to {topic!r}")
        if self._run_n:
            self._close_run()
        out = self._out
        out.append(_HDR(len(head) + size) + head + data)
        if more is not None:
            out.append(more)
        self._out_bytes += size + 16

    @contextlib.asynccontextmanager
    async def subscribe(self, topic_filter: str, *, queue_size: int = 1024,
                        policy: Literal["drop_oldest", "block"] = "drop_oldest",
                        ) -> AsyncIterator[AsyncIterator[Message]]:
        """``async with c.subscribe("sensors/#") as messages: async for m in messages: ...``"""
        if type(queue_size) is not int or queue_size < 1:  # else the server names "credit", which we set
            raise InvalidArguments(f"subscribe {topic_filter!r}: queue_size must be a positive integer, "
                                   f"not {queue_size!r}", {"queue_size": repr(queue_size)})
        self._check()
        rid = next(self._ids)
        feed = _Feed(self, queue_size, policy, rid)
        self._feeds[rid] = feed
        try:
            args: dict[str, Any] = {"filter": topic_filter, "queue_size": queue_size, "policy": policy,
                                    "credit": queue_size}
            if self._batch:
                args["batch"] = True
            await self._roundtrip(rid, P.request(rid, "pubsub.subscribe", args), None, "pubsub.subscribe")
        except BaseException:
            self._feeds.pop(rid, None)
            raise
        try:
            yield feed
        finally:
            self._end_feed(rid, feed)

    def _end_feed(self, rid: int, feed: _Feed) -> None:
        if self._feeds.pop(rid, None) is not None and self.connected:
            self._write(P.cancel(rid))
        if feed.throttled:
            feed.throttled = False
            self._throttle(-1)
        feed.end()

    async def request(self, topic: str, payload: Any, *, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """Publish with a reply handle and return the first reply's payload (Timeout after ``timeout``)."""
        try:
            data = await self.call("pubsub.request", {"topic": topic, "payload": codec.encode(payload),
                                                      "timeout": timeout}, timeout=timeout + 5.0)
        except Timeout as exc:  # the server's (after ``timeout``) or ours (server silent): say which request
            raise Timeout(f"no reply to the request on {topic!r} within {timeout} s",
                          {"topic": topic, "timeout": timeout}) from exc
        return codec.decode(data)

    # --- generic RPC ---------------------------------------------------------------------------------------
    async def _roundtrip(self, rid: int, frame: bytes, timeout: float | None,  # noqa: ASYNC109
                         what: str = "call") -> Any:
        self._check()
        self._refuse_oversize(len(frame) - P.HEADER.size, what)
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = fut
        self._write(frame)
        try:
            if timeout is None:
                return await fut
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            if self.connected:
                self._write(P.cancel(rid))
            raise Timeout(f"{what}: no answer within {timeout} s", {"op": what, "timeout": timeout}) from None
        finally:
            self._pending.pop(rid, None)

    async def call(self, op: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = 30.0) -> Any:  # noqa: ASYNC109 - part of the documented SDK API
        """Call any operation by wire name; raises the IpcError subclass for the server's code."""
        rid = next(self._ids)
        return await self._roundtrip(rid, P.request(rid, op, args or {}), timeout, op)

    @contextlib.asynccontextmanager
    async def stream(self, op: str, args: dict[str, Any] | None = None, *,
                     queue_size: int = 1024) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a stream op; items arrive in order; leaving the block cancels it on the server."""
        self._check()
        rid = next(self._ids)
        frame = P.request(rid, op, args or {})
        self._refuse_oversize(len(frame) - P.HEADER.size, op)
        feed = _Feed(self, queue_size, "block")
        self._feeds[rid] = feed
        self._write(frame)
        try:
            yield feed
        finally:
            self._end_feed(rid, feed)

    # --- typed wrappers over nucleus operations -----------------------------------------------------------
    async def get_configuration(self, key_path: Sequence[str] = (), *, component: str | None = None) -> Any:
        return await self.call("config.get", {"component": component, "key_path": list(key_path)})

    async def update_configuration(self, key_path: Sequence[str], value: Any, *,
                                   timestamp: float | None = None, component: str | None = None) -> None:
        """Merge ``value`` at ``key_path`` in this component's configuration (another's with a policy)."""
        args: dict[str, Any] = {"key_path": list(key_path), "value": value, "timestamp": timestamp}
        if component is not None:
            args["component"] = component
        await self.call("config.update", args)

    def watch_configuration(self, key_path: Sequence[str] = (), *, component: str | None = None,
                            ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """One item per change at or below ``key_path``: ``{"component": name, "key_path": [...]}`` (the
        changed path; the component, because one may watch another's), not the value: fetch that with
        get_configuration, which also sees the changes that arrived meanwhile."""
        return self.stream("config.subscribe", {"component": component, "key_path": list(key_path)})

    async def configuration_changes(self, parse: Callable[[Any], T], *, errors: tuple[type[Exception], ...],
                                    rejected: Callable[[Exception], None]) -> AsyncIterator[T]:
        """This component's configuration, parsed, after each change: what a component that reconfigures
        itself at run time loops over. A configuration ``parse`` refuses (raises one of ``errors``) goes to
        ``rejected`` and is skipped, so the caller keeps running on the last valid one. Against a bus with
        no configuration store (``ipc.devserver`` without ``--config``) it logs that once and never yields,
        rather than ending: an ended stream means the nucleus closed it, i.e. the component is being stopped.

        While it is iterated it also answers the nucleus's validation of proposed configurations with the
        same ``parse`` (:meth:`validate_configurations`), so a deployment with a configuration this
        component would refuse fails before anything is written, naming the component and the reason.

        A configuration equal to the one yielded last is not yielded again (one deployment that sets
        several keys arrives as one change per key)."""
        validating = asyncio.create_task(self.validate_configurations(parse, errors=errors))
        last: list[T] = []  # the configuration yielded last
        try:
            async with self.watch_configuration() as changes:
                async for _ in changes:
                    try:
                        current = parse(await self.get_configuration())
                    except errors as exc:
                        rejected(exc)
                        continue
                    # The nucleus notifies once per changed key, and the first read already sees every key
                    # of the deployment: the rest would hand the caller the same configuration again (an
                    # ingest would restart its source once per key).
                    if last and current == last[0]:
                        continue
                    last[:] = [current]
                    yield current
        except IpcError as exc:
            if exc.code != "UNKNOWN_OPERATION":
                raise
            log.info("ipc.config_watch_unavailable", reason=exc.code)
            await asyncio.Event().wait()
        finally:
            validating.cancel()
            with contextlib.suppress(asyncio.CancelledError, IpcError):
                await validating

    def configuration_validations(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """Proposed configurations of this component, before a deployment applies them:
        ``{"deployment_id": ..., "configuration": {...}}``; answer each with report_configuration_validity."""
        return self.stream("config.validation.subscribe", {})

    async def report_configuration_validity(self, deployment_id: str, *, accepted: bool, message: str = "") -> None:
        await self.call("config.validation.report", {"deployment_id": deployment_id,
                                                      "status": "ACCEPTED" if accepted else "REJECTED",
                                                      "message": message})

    async def validate_configurations(self, parse: Callable[[Any], object], *,
                                      errors: tuple[type[Exception], ...]) -> None:
        """Answer every proposed configuration: ACCEPTED if ``parse`` takes it, REJECTED with its error
        otherwise. Runs until cancelled; returns at once on a bus without validation (ipc.devserver)."""
        try:
            async with self.configuration_validations() as proposals:
                async for proposal in proposals:
                    try:
                        parse(proposal.get("configuration") or {})
                        accepted, message = True, ""
                    except errors as exc:
                        accepted, message = False, str(exc)[:2000]
                    try:
                        await self.report_configuration_validity(str(proposal.get("deployment_id")),
                                                                 accepted=accepted, message=message)
                    except IpcError as exc:  # too late (the nucleus stopped waiting): the next one still counts
                        if exc.code != "INVALID_ARGUMENTS":
                            raise
                        log.warning("ipc.config_validation_late", deployment_id=proposal.get("deployment_id"),
                                    error=str(exc))
        except IpcError as exc:
            if exc.code != "UNKNOWN_OPERATION":
                raise
            log.info("ipc.config_validation_unavailable", reason=exc.code)

    async def update_state(self, state: Literal["RUNNING", "ERRORED"], *, message: str = "") -> None:
        """Report this component's state; with ERRORED, ``message`` says why (the nucleus puts it in the
        state's reason, where a deployment's failure and `nucleus list` show it)."""
        args: dict[str, Any] = {"state": state}
        if message:
            args["message"] = message
        await self.call("state.update", args)

    def component_updates(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        return self.stream("lifecycle.subscribe_updates", {})

    async def defer_update(self, deployment_id: str, *, recheck_after_s: float = 0,
                           message: str = "") -> None:
        await self.call("lifecycle.defer_update", {"deployment_id": deployment_id,
                                                   "recheck_after_s": recheck_after_s, "message": message})

    async def list_components(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call("components.list", {})
        return result

    async def get_component(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("components.get", {"name": name})
        return result

    async def restart_component(self, name: str, *, force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("components.restart", {"name": name, "force": force})
        return result

    async def stop_component(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("components.stop", {"name": name})
        return result

    async def create_deployment(self, **spec: Any) -> str:
        """Queue a local deployment (``root_components={"name": "1.0.0"}``, ...); returns its id."""
        result = await self.call("deployments.create", spec)
        return str(result["id"] if isinstance(result, dict) and "id" in result else result)

    async def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("deployments.get", {"id": deployment_id})
        return result

    async def list_deployments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call("deployments.list", {})
        return result

    async def put_metric(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        await self.call("metrics.put", {"metrics": [dict(m) for m in metrics]})

    async def publish_to_cloud(self, topic: str, payload: Any, *, qos: int = 1, priority: int = 0,
                               ttl_s: float | None = None, retain: bool = False, raw: bool = False,
                               properties: dict[str, Any] | None = None) -> str:
        """Hand a message to the cloud uplink; returns once it is durable in the spool.

        The returned id is stable across retries and restarts: the cloud side dedupes on it.
        ``raw=True`` (bytes or text only) sends the payload alone and unchanged, outside the device's
        batch envelope, for cloud consumers that parse the payload itself (the id then travels only
        as the MQTT 5 user property ``nucleus-id``). ``properties`` (with ``raw`` only) are the message's
        MQTT 5 publish properties: ``user_properties`` ([[key, value], ...]), ``message_expiry_s``,
        ``correlation_data`` (bytes), ``response_topic``, ``payload_format`` ("bytes"/"utf8"),
        ``content_type`` (docs/cloud-sync.md, "Per message").
        """
        args = {"topic": topic, "payload": payload, "qos": qos, "priority": priority, "ttl_s": ttl_s,
                "retain": retain}
        if raw:  # only when asked: a daemon without the argument still accepts the call
            args["raw"] = True
        if properties:
            args["properties"] = properties
        result = await self.call("cloud.publish", args)
        return str(result["id"]) if isinstance(result, dict) and "id" in result else ""

    @contextlib.asynccontextmanager
    async def subscribe_to_cloud(self, topic_filter: str) -> AsyncIterator[AsyncIterator[CloudMessage]]:
        """Cloud messages as :class:`CloudMessage` (topic, payload, retain, MQTT 5 properties)."""
        async with self.stream("cloud.subscribe", {"filter": topic_filter}) as items:
            async def messages() -> AsyncIterator[CloudMessage]:
                async for item in items:
                    if isinstance(item, dict):
                        props = item.get("properties")
                        yield CloudMessage(str(item.get("topic", "")), item.get("payload"),
                                           dropped=int(item.get("dropped", 0) or 0), retain=bool(item.get("retain")),
                                           properties=dict(props) if isinstance(props, dict) else {}, client=self)

            yield messages()


class SyncClient:
    """A blocking wrapper for scripts: a private event loop runs the async client in a thread."""

    def __init__(self, socket_path: str | Path, token: str, *, name: str | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, timeout: float = 60.0) -> None:
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ipc-sync-client", daemon=True)
        self._thread.start()
        self._client = Client(socket_path, token, name=name, max_frame=max_frame)
        # Dropped without close(), the loop thread (and its socket) would live as long as the process:
        # the finalizer closes both, and says so, as an unclosed file does.
        self._finalizer = weakref.finalize(self, _shutdown_sync, self._loop, self._thread, self._client,
                                           f"({self._client.socket_path})")
        try:
            self._run(self._client.connect())
        except BaseException:
            self._finalizer.detach()
            self._stop_loop()
            raise

    @classmethod
    def from_env(cls) -> SyncClient:
        c = Client.from_env()
        return cls(c.socket_path, c._token, name=c.name)

    def _run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        if self._loop.is_closed():
            if asyncio.iscoroutine(coro):
                coro.close()  # never run: no "coroutine was never awaited" warning on top of the error
            raise ConnectionClosed(f"this SyncClient ({self._client.socket_path}) is closed; create a new one",
                                   {"socket": self._client.socket_path})
        fut = asyncio.run_coroutine_threadsafe(_as_coro(coro), self._loop)
        try:
            return fut.result(timeout if timeout is not None else self._timeout)
        except BaseException:
            # a timeout, or Ctrl-C in a subscription get(): the coroutine is still waiting, and left
            # alone it would take (and lose) the next message
            fut.cancel()
            raise

    def publish(self, topic: str, payload: Any, *, confirm: bool | None = None) -> None:
        self._run(self._client.publish(topic, payload, confirm=confirm))

    def request(self, topic: str, payload: Any, *, timeout: float = 5.0) -> Any:
        return self._run(self._client.request(topic, payload, timeout=timeout), timeout + 10.0)

    def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = 30.0) -> Any:
        # the call's own timeout governs (an ipc.Timeout), not the SyncClient's default wait
        return self._run(self._client.call(op, args, timeout=timeout), 10 ** 9 if timeout is None else timeout + 10.0)

    def get_configuration(self, key_path: Sequence[str] = (), *, component: str | None = None) -> Any:
        return self._run(self._client.get_configuration(key_path, component=component))

    def update_configuration(self, key_path: Sequence[str], value: Any, *,
                             timestamp: float | None = None, component: str | None = None) -> None:
        self._run(self._client.update_configuration(key_path, value, timestamp=timestamp, component=component))

    def update_state(self, state: Literal["RUNNING", "ERRORED"], *, message: str = "") -> None:
        self._run(self._client.update_state(state, message=message))

    def subscribe(self, topic_filter: str, *, queue_size: int = 1024,
                  policy: Literal["drop_oldest", "block"] = "drop_oldest") -> SyncSubscription:
        return SyncSubscription(self, topic_filter, queue_size, policy)

    def close(self) -> None:
        self._finalizer.detach()
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close(), 10.0)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


def _shutdown_sync(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: Client, what: str) -> None:
    """A SyncClient collected (or left at exit) unclosed: close its connection, stop its thread."""
    if loop.is_closed():
        return
    if not sys.is_finalizing():
        warnings.warn(f"unclosed SyncClient {what}: use 'with SyncClient(...)' or call close()",
                      ResourceWarning, stacklevel=2)
    if thread.is_alive():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(5.0)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(5.0)
    if not thread.is_alive():
        loop.close()


class SyncSubscription:
    """Blocking iterator over a subscription; ``with sc.subscribe("a/#") as msgs: for m in msgs``."""

    def __init__(self, owner: SyncClient, topic_filter: str, queue_size: int,
                 policy: Literal["drop_oldest", "block"]) -> None:
        self._owner = owner
        self._filter = topic_filter
        self._cm = owner._client.subscribe(topic_filter, queue_size=queue_size, policy=policy)
        self._it: AsyncIterator[Message] = owner._run(self._cm.__aenter__())
        self._closed = False

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        return self.get()

    def get(self, timeout: float | None = None) -> Message:
        """Next message; ``TimeoutError`` after ``timeout`` seconds (None waits forever)."""
        if self._closed:
            raise StopIteration
        try:
            return self._owner._run(self._it.__anext__(), timeout if timeout is not None else 10 ** 9)
        except StopAsyncIteration:
            raise StopIteration from None
        except TimeoutError as exc:
            if isinstance(exc, IpcError):
                raise
            raise TimeoutError(f"no message on {self._filter!r} within {timeout} s") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owner._loop.is_closed():  # the SyncClient closed first: that ended this subscription
                return
            self._owner._run(self._cm.__aexit__(None, None, None))

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def run_component(main: Callable[[Client], Awaitable[None]]) -> None:
    """Run a component's ``main(client)``: connect from env, report RUNNING, exit cleanly on SIGTERM.

    An exception in ``main`` is reported as ERRORED and the process exits with status 1 so the
    nucleus applies its restart policy; SIGTERM/SIGINT cancel ``main`` and exit 0.
    """
    try:
        code = asyncio.run(_run_component(main))
    except IpcError as exc:  # connecting or the RUNNING report failed: main never ran
        # one line, not a traceback through asyncio and the SDK: the error already says what to do
        print(f"{Path(sys.argv[0]).name}: cannot start the component: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


async def _run_component(main: Callable[[Client], Awaitable[None]]) -> int:
    loop = asyncio.get_running_loop()
    async with Client.from_env() as client:
        try:
            await client.update_state("RUNNING")
        except IpcError as exc:
            if exc.code != "UNKNOWN_OPERATION":  # a bare bus (ipc.devserver) has no lifecycle service
                raise
        task = asyncio.ensure_future(main(client))
        stopping = False

        def stop() -> None:
            nonlocal stopping
            stopping = True
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await task
        except asyncio.CancelledError:
            if not stopping:
                raise
            log.info("component.stopping", reason="signal")
            return 0
        except Exception as exc:
            log.exception("component.failed", error=str(exc))
            with contextlib.suppress(IpcError):
                await client.update_state("ERRORED", message=f"{type(exc).__name__}: {exc}")
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0
