"""The native front end: a Unix domain socket speaking :mod:`ipc.protocol` on top of :class:`IpcCore`.

Built on asyncio Protocols (not streams) so a read turns into routed deliveries without a task
switch, and output is gathered per connection and written once per loop turn (or every 64 KiB),
so a burst of publishes costs a handful of ``send`` calls, not one per message.

Batching: for subscriptions opened with ``batch`` the deliveries gathered in one loop turn go out
as one MESSAGES frame per subscription (the cached per-message tails laid end to end behind one
head), and PUBLISH_MANY frames route a run of publishes with one dispatch. That divides the
per-frame work of this process *and* of every subscriber process by the batch size, which is what
bounds fan-out on a small machine where subscribers outnumber cores.

Every failure is confined to its connection: a bad frame, a bad token, a flood or a silent client
gets an ERROR frame and/or a closed socket, one log line, and nobody else notices.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import msgpack
import structlog

from ipc import protocol as P
from ipc.admission import MAX_ANONYMOUS_FRAME, has_pending_bytes, peer_credentials
from ipc.bus import BusMessage, Subscription
from ipc.core import IpcCore, Session
from ipc.errors import (
    ConnectionClosed,
    FrameTooLarge,
    InvalidArguments,
    IpcError,
    LimitExceeded,
    ProtocolError,
    ServiceError,
)
from ipc.listener import listen_unix, shut_down

log = structlog.get_logger("ipc.server")

FLUSH_AT = 64 * 1024
BATCH_MAX = FLUSH_AT  # a delivery that would take an open batch past this starts a new frame
DRAIN_CHUNK = 256  # queued messages taken from one subscription before the next gets its turn
_HDR = P.HEADER.pack
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_PUB_CACHE_MAX = 4096


class _SubOut:
    """One subscription's delivery state on its connection (kept in ``Subscription.front``)."""

    __slots__ = ("batch", "credit", "dropped", "head", "id", "listed", "n", "parts", "size")

    def __init__(self, sub_id: int, credit: int | None, batch: bool) -> None:
        self.id = sub_id
        self.credit = credit  # MESSAGEs the client can still take; None: no credit flow control
        self.batch = batch
        self.head = P.message_head(sub_id) + b"\x00"  # [10, sub_id, dropped=0
        self.parts: list[bytes] = []  # open batch: tail prefix, data, tail prefix, data, ...
        self.n = 0
        self.size = 0
        self.dropped = 0  # the gap before the open batch's first delivery
        self.listed = False  # in the connection's list of open batches


def _encode_or_error(build: Callable[[], bytes], req_id: int) -> bytes:
    """Handlers may return things msgpack cannot carry; that is the handler's bug, reported as such."""
    try:
        return build()
    except (TypeError, ValueError, OverflowError) as exc:
        return P.error(req_id, "SERVICE_ERROR", f"result cannot be encoded: {exc}")


class _Connection(asyncio.Protocol):
    """One client: handshake, dispatch, and the bus sink for its subscriptions."""

    def __init__(self, server: IpcServer) -> None:
        self.server = server
        self.core = server.core
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.decoder = P.FrameDecoder(server.max_frame)
        self.session: Session | None = None
        self.pid: int | None = None
        self.uid: int | None = None
        self.closing = False
        self.paused = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._hs_timer: asyncio.TimerHandle | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._pending: dict[Subscription, None] = {}
        self._open: list[_SubOut] = []  # subscriptions with an open batch, closed at the next flush
        self._prefixes: dict[str, bytes] = {}
        self._pub_ok: set[str] = set()
        self._pub_gen = -1
        self._pub_expiry = 0.0
        self._writable = asyncio.Event()
        self._writable.set()
        self._blocked_on: dict[Subscription, None] = {}
        self._block_waiter: asyncio.Task[None] | None = None
        self._reading = True
        self.close_reason: str | None = None

    # --- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server._conns.add(self)
        transport.set_write_buffer_limits(high=server.write_buffer_high)
        self.pid, self.uid = peer_credentials(transport.get_extra_info("socket"))
        if len(server._conns) > server.max_connections:
            self._fail(LimitExceeded(f"the server accepts at most {server.max_connections} connections",
                                     {"limit": server.max_connections}))
            return
        # Anonymous until HELLO: a slot of its own bound (ipc/admission.py).
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
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for task in self._tasks.values():
            task.cancel()
        self._writable.set()  # release stream tasks waiting for room so they see the cancellation
        self._out.clear()
        self._open.clear()
        self._pending.clear()
        if self.session is not None:
            self.core.end_session(self.session)
            self.session.closer = None  # break the session <-> connection cycle now, not at the next full GC
        self._prefixes.clear()
        self._pub_ok.clear()
        self._blocked_on.clear()
        if exc is not None and self.close_reason is None:
            log.info("ipc.connection_lost", pid=self.pid, error=str(exc))

    def pause_writing(self) -> None:
        # A peer that does not read what we write gets nothing more read from it either: its
        # requests would only pile up responses in our buffer (no unbounded memory per client).
        self.paused = True
        self._writable.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._writable.set()
        self._update_reading()
        self._drain()

    def _update_reading(self) -> None:
        """Read only while our output to this peer flows and no lossless subscriber holds it back."""
        t = self.transport
        if t is None or self.closing:
            return
        want = not self.paused and self._block_waiter is None
        if want != self._reading:
            self._reading = want
            if want:
                t.resume_reading()
            else:
                t.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        now = self.loop.time()
        if now > self._pub_expiry or self._pub_gen != self.core.authz_generation:
            # publish decisions follow the core's: dropped on policies_changed() or after the TTL
            self._pub_ok.clear()
            self._pub_gen = self.core.authz_generation
            self._pub_expiry = now + self.core.authz_cache_ttl
        for f in frames:
            if self.closing:
                return
            t = f[0]
            if t == P.PUBLISH_MANY and self.session is not None:
                self._on_publish_many(f)
            elif t == P.PUBLISH and self.session is not None:
                self._on_publish(f)
            elif self.session is None:
                self._on_hello(f)
            elif t == P.REQUEST:
                self._on_request(f)
            elif t == P.CREDIT:
                self._on_credit(f)
            elif t == P.CANCEL:
                self._on_cancel(f)
            else:
                self._fail(ProtocolError(f"unexpected frame type {t} from a client", {"frame_type": t}))
                return
        if self.session is None and self.decoder.buffered > MAX_ANONYMOUS_FRAME:
            # A HELLO is a token and a name: an anonymous peer does not get to buffer a 16 MiB frame.
            self._fail(FrameTooLarge(f"a HELLO frame is at most {MAX_ANONYMOUS_FRAME} bytes",
                                     {"limit": MAX_ANONYMOUS_FRAME}))
            return
        if self._out:
            self._flush()

    def eof_received(self) -> bool | None:
        if self.decoder.buffered:
            self.close_reason = "truncated_frame"
            log.warning("ipc.connection_truncated", pid=self.pid, buffered=self.decoder.buffered)
        return None

    # --- output -----------------------------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        if self._open:
            self._close_batches()  # keep every frame after the deliveries gathered before it
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._open:
            self._close_batches()
        out = self._out
        if not out or self.transport is None or self.closing:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        self.transport.write(data)

    def _fail(self, err: IpcError, req_id: int | None = None, *, quiet: bool = False) -> None:
        """Tell the client why (one ERROR frame), log once (unless ``quiet``: admission logs a burst
        of them as one), close only this connection."""
        if self.closing or self.transport is None:
            return
        self.close_reason = err.code
        if not quiet and (self.session is not None or self.core.admission.refused(self.uid, self.pid)):
            log.warning("ipc.connection_rejected", pid=self.pid, code=err.code, reason=err.message,
                        principal=self.session.principal.name if self.session else None)
        if self._open:
            self._close_batches()
        self._out.append(P.error(req_id, *err.to_wire()))
        self._flush()
        self.closing = True
        self.transport.close()

    # --- bus sink -----------------------------------------------------------------------------------
    def offer(self, sub: Subscription, msg: BusMessage, dropped: int) -> bool:
        if self.paused or self.closing:
            return False
        st: _SubOut = sub.front
        c = st.credit
        if c is not None:
            if c <= 0:
                return False  # the bus queues it (and applies the policy) until CREDIT arrives
            st.credit = c - 1
        # the body of _put, inlined: this runs once per delivery
        wire = msg.wire
        data = msg.data
        if wire is None:
            wire = msg.wire = P.message_tail_prefix(msg.reply_to, msg.sender, msg.topic) \
                + P.bin_header(len(data))
        n = len(wire) + len(data)
        if st.batch:
            if st.n:
                if dropped or st.size + n > BATCH_MAX:
                    self._close_batch(st)
                    st.dropped = dropped
            else:
                st.dropped = dropped
                if not st.listed:
                    st.listed = True
                    self._open.append(st)
            parts = st.parts
            parts.append(wire)
            parts.append(data)
            st.n += 1
            st.size += n
        else:
            h = st.head if not dropped else st.head[:-1] + _packb(dropped)
            out = self._out
            # the payload is never copied per subscriber before the batch is joined at flush
            out.append(_HDR(len(h) + n) + h + wire)
            out.append(data)
        self._out_bytes += n + 16
        if self._out_bytes >= FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        return True

    def offer_many(self, sub: Subscription, msgs: list[BusMessage], dropped: int) -> int:
        """The bus's run delivery (:meth:`Bus.route_many`): take a prefix of ``msgs`` while writable
        and within credit; the bus queues the rest."""
        if self.paused or self.closing:
            return 0
        st: _SubOut = sub.front
        k = len(msgs)
        c = st.credit
        if c is not None:
            if c <= 0:
                return 0
            if c < k:
                msgs = msgs[:c]
                k = c
        done = self._put_many(st, msgs, dropped, stop_when_paused=True)
        if c is not None:
            st.credit = c - done
        return done

    def _put(self, st: _SubOut, msg: BusMessage, dropped: int) -> None:
        """Frame ``msg`` for the subscription (the caller checked writability and credit)."""
        wire = msg.wire
        data = msg.data
        if wire is None:
            wire = msg.wire = P.message_tail_prefix(msg.reply_to, msg.sender, msg.topic) \
                + P.bin_header(len(data))
        n = len(wire) + len(data)
        if st.batch:
            if st.n:
                if dropped or st.size + n > BATCH_MAX:
                    self._close_batch(st)
                    st.dropped = dropped
            else:
                st.dropped = dropped
                if not st.listed:
                    st.listed = True
                    self._open.append(st)
            st.parts.append(wire)
            st.parts.append(data)
            st.n += 1
            st.size += n
        else:
            h = st.head if not dropped else st.head[:-1] + _packb(dropped)
            self._out.append(_HDR(len(h) + n) + h + wire)
            self._out.append(data)
        self._out_bytes += n + 16
        if self._out_bytes >= FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _close_batch(self, st: _SubOut) -> None:
        """Move the open batch to the output: one MESSAGES frame, or a plain MESSAGE for a single one."""
        parts = st.parts
        out = self._out
        if st.n == 1:
            h = st.head if not st.dropped else st.head[:-1] + _packb(st.dropped)
            out.append(_HDR(len(h) + st.size) + h + parts[0])
            out.append(parts[1])
        else:
            out.append(P.messages_head(st.id, st.dropped, st.n, st.size))
            out.extend(parts)
        parts.clear()
        st.n = st.size = st.dropped = 0

    def _close_batches(self) -> None:
        for st in self._open:
            st.listed = False
            if st.n:
                self._close_batch(st)
        self._open.clear()

    def pending(self, sub: Subscription) -> None:
        if sub.closed:
            self._pending.pop(sub, None)  # an open batch still goes out, before the STREAM_END
            return
        self._pending[sub] = None
        if not self.paused and not self.closing:
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Move queued messages to the socket, round-robin between subscriptions, until full again."""
        while self._pending and not self.paused and not self.closing:
            for sub in list(self._pending):
                if sub.closed:
                    self._pending.pop(sub, None)
                    continue
                st: _SubOut = sub.front
                left = st.credit
                if left is not None and left <= 0:
                    self._pending.pop(sub, None)  # re-added when its CREDIT arrives
                    continue
                msgs, dropped = sub.take_many(DRAIN_CHUNK if left is None else min(DRAIN_CHUNK, left), FLUSH_AT)
                if left is not None:
                    st.credit = left - len(msgs)
                if not sub.queue:
                    self._pending.pop(sub, None)
                if msgs:
                    self._put_many(st, msgs, dropped)
                if self.paused or self.closing:
                    break
        if self._out:
            self._flush()

    def _put_many(self, st: _SubOut, msgs: list[BusMessage], dropped: int, *,
                  stop_when_paused: bool = False) -> int:
        """:meth:`_put` for a run of one subscription, the batch bookkeeping done once; returns how
        many were framed (all, unless ``stop_when_paused`` and a flush filled the socket)."""
        if not st.batch:
            done = 0
            for msg in msgs:
                self._put(st, msg, dropped)
                dropped = 0
                done += 1
                if stop_when_paused and (self.paused or self.closing):
                    break
            return done
        if st.n and dropped:
            self._close_batch(st)
        if not st.n:
            st.dropped = dropped
            if not st.listed:
                st.listed = True
                self._open.append(st)
        parts = st.parts
        append = parts.append
        size = st.size
        count = st.n
        room = FLUSH_AT - self._out_bytes  # bytes until the next flush
        done = 0
        for msg in msgs:
            wire = msg.wire
            data = msg.data
            if wire is None:
                wire = msg.wire = P.message_tail_prefix(msg.reply_to, msg.sender, msg.topic) \
                    + P.bin_header(len(data))
            n = len(wire) + len(data)
            if count and size + n > BATCH_MAX:
                st.n, st.size = count, size
                self._close_batch(st)
                size = count = 0
            append(wire)
            append(data)
            count += 1
            size += n
            done += 1
            room -= n + 16
            if room <= 0:
                st.n, st.size = count, size
                self._out_bytes = FLUSH_AT
                self._flush()  # closes the batch too
                size = count = 0
                room = FLUSH_AT
                if stop_when_paused and (self.paused or self.closing):
                    return done
                if not st.listed:
                    st.listed = True
                    self._open.append(st)
        st.n, st.size = count, size
        self._out_bytes = FLUSH_AT - room
        if self._out_bytes and self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        return done

    # --- handshake ---------------------------------------------------------------------------------
    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if self.session is None and not self.closing:
            timeout = self.server.handshake_timeout
            self.core.admission.handshake_timed_out(self.uid, self.pid, timeout)
            self._fail(ProtocolError(f"no HELLO within {timeout} s"), quiet=True)

    def subscription_denied(self, sub: Subscription, exc: IpcError) -> None:
        """The core ended ``sub`` on a policy change: its STREAM_END carries the denial."""
        self._pending.pop(sub, None)
        if not self.closing:
            self._send(P.stream_end(sub.id, exc.to_wire()))

    def speaking(self) -> bool:
        transport = self.transport
        return bool(self.decoder.buffered) or (
            transport is not None and has_pending_bytes(transport.get_extra_info("socket")))

    def shed(self, reason: str) -> None:
        """Admission closes this anonymous connection to make room (ipc/admission.py)."""
        self._fail(LimitExceeded(reason, {"limit": self.core.admission.max_anonymous_per_uid}), quiet=True)

    def _on_hello(self, f: P.Frame) -> None:
        if f[0] != P.HELLO:
            self._fail(ProtocolError("the first frame must be HELLO"))
            return
        _, version, token, name = f
        if version != P.PROTOCOL_VERSION:
            self._fail(ProtocolError(f"unsupported protocol version {version!r}; this server speaks "
                                     f"{P.PROTOCOL_VERSION}", {"supported": [P.PROTOCOL_VERSION]}))
            return
        if name is not None and not isinstance(name, str):
            self._fail(ProtocolError("client name must be a string or nil"))
            return
        if token is not None and not isinstance(token, str):  # was answered "missing token"
            self._fail(ProtocolError(f"token must be a string, not {type(token).__name__}"))
            return
        try:
            self.session = self.core.open_session(token or "", self.pid,
                                                  name=name, front_end="native", closer=self._revoke)
        except IpcError as exc:
            self._fail(exc)
            return
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self.core.admission.done(self, self.uid)
        srv = self.server
        self._send(P.welcome(self.session.principal.name, {
            "max_frame": srv.max_frame,
            "max_subscriptions": self.core.max_subscriptions_per_session,
            "max_inflight": srv.max_inflight,
            "features": list(P.FEATURES),
        }))

    async def _revoke(self) -> None:
        self._fail(ConnectionClosed("the session was closed by the nucleus "
                                    "(component removed or token revoked)"))

    # --- publish fast path ----------------------------------------------------------------------------
    def _on_publish(self, f: P.Frame) -> None:
        _, req_id, topic, data = f
        session = self.session
        assert session is not None
        try:
            if type(req_id) is not int or req_id < 0:  # (a negative id was answered as if it were one)
                raise ProtocolError("PUBLISH id must be an integer >= 0")  # noqa: TRY301 - mapped just below
            if type(topic) is not str or topic not in self._pub_ok:  # (a list topic is unhashable)
                if type(data) is not bytes:
                    raise InvalidArguments("PUBLISH payload must be bin (codec-encoded data)")
                self.core.check_publish(session, topic)
                if len(self._pub_ok) >= _PUB_CACHE_MAX:
                    self._pub_ok.clear()
                self._pub_ok.add(topic)
            elif type(data) is not bytes:
                raise InvalidArguments("PUBLISH payload must be bin (codec-encoded data)")
            prefix = self._prefixes.get(topic)
            if prefix is None:
                if len(self._prefixes) >= _PUB_CACHE_MAX:
                    self._prefixes.clear()
                prefix = self._prefixes[topic] = P.message_tail_prefix(None, session.principal.name, topic)
            n, full = self.core.bus.route(BusMessage(topic, data, session.principal.name, None,
                                                     prefix + P.bin_header(len(data))))
        except ProtocolError as exc:
            self._fail(exc)
            return
        except IpcError as exc:
            details = dict(exc.details)
            if isinstance(topic, str):
                details.setdefault("topic", topic[:256])
            self._send(P.error(req_id, exc.code, exc.message, details))
            return
        if req_id:
            self._send(P.response(req_id, n))
        if full:
            self._block_reading(full)

    def _on_publish_many(self, f: P.Frame) -> None:
        """A run of unconfirmed publishes to one topic: one authorization, one dispatch, routed in order."""
        _, topic, items = f
        session = self.session
        assert session is not None
        try:
            if type(items) is not list:
                raise ProtocolError("PUBLISH_MANY needs an array of data")  # noqa: TRY301 - mapped below
            if type(topic) is not str or topic not in self._pub_ok:
                self.core.check_publish(session, topic)  # InvalidArguments for a topic that is not a str
                if len(self._pub_ok) >= _PUB_CACHE_MAX:
                    self._pub_ok.clear()
                self._pub_ok.add(topic)
            prefix = self._prefixes.get(topic)
            if prefix is None:
                if len(self._prefixes) >= _PUB_CACHE_MAX:
                    self._prefixes.clear()
                prefix = self._prefixes[topic] = P.message_tail_prefix(None, session.principal.name, topic)
        except ProtocolError as exc:
            self._fail(exc)
            return
        except IpcError as exc:
            details = dict(exc.details)
            if isinstance(topic, str):
                details.setdefault("topic", topic[:256])
            self._send(P.error(0, exc.code, exc.message, details))
            return
        sender = session.principal.name
        wires: dict[int, bytes] = {}  # the MESSAGE tail prefix by data length: equal sizes share one
        msgs: list[BusMessage] = []
        append = msgs.append
        bad = 0
        for data in items:
            if type(data) is not bytes:
                bad += 1
                continue
            size = len(data)
            wire = wires.get(size)
            if wire is None:
                wire = wires[size] = prefix + P.bin_header(size)
            append(BusMessage(topic, data, sender, None, wire))
        full_all = self.core.bus.route_many(topic, msgs)[1] if msgs else None
        if bad:
            self._send(P.error(0, "INVALID_ARGUMENTS", f"{bad} PUBLISH_MANY item(s) are not bin (codec-encoded data)",
                               {"topic": topic[:256], "count": bad}))
        if full_all:
            self._block_reading(full_all)

    def _block_reading(self, full: list[Subscription]) -> None:
        """A lossless subscriber is full: stop reading this publisher until every such queue has room.

        Frames already read in this chunk are still routed (so a lossless queue may overshoot its
        bound by at most one read's worth of messages); one waiter per connection, not per publish.
        """
        assert self.transport is not None
        for sub in full:
            self._blocked_on[sub] = None
        if self._block_waiter is not None:
            return

        async def wait() -> None:
            try:
                while self._blocked_on:
                    sub = next(iter(self._blocked_on))
                    await sub.wait_room()
                    self._blocked_on.pop(sub, None)
            finally:
                self._block_waiter = None
                self._blocked_on.clear()
                self._update_reading()

        self._block_waiter = self._spawn(0, wait())
        self._update_reading()

    def _spawn(self, key: int, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if key == 0:
            key = -(len(self._tasks) + 1)
            while key in self._tasks:
                key -= 1
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks[key] = task
        self.server._tasks.add(task)

        def done(t: asyncio.Task[None], key: int = key) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
            self.server._tasks.discard(t)

        task.add_done_callback(done)
        return task

    # --- requests -------------------------------------------------------------------------------------
    def _on_request(self, f: P.Frame) -> None:
        _, req_id, op, args = f
        session = self.session
        assert session is not None
        if type(req_id) is not int or req_id <= 0:
            self._fail(ProtocolError("REQUEST id must be a positive integer"))
            return
        if not isinstance(op, str) or not isinstance(args, dict):
            self._send(P.error(req_id, "INVALID_ARGUMENTS", "REQUEST needs an op string and an args map"))
            return
        if req_id in self._tasks or req_id in session.subscriptions:
            self._send(P.error(req_id, "INVALID_ARGUMENTS", f"request id {req_id} is already in use",
                               {"id": req_id}))
            return
        try:
            if op == "pubsub.subscribe":
                self._subscribe(req_id, args)
                return
            is_stream = self.core.is_stream(op)
            if len(self._tasks) >= self.server.max_inflight:
                raise LimitExceeded(f"at most {self.server.max_inflight} calls in flight per connection",
                                    {"limit": self.server.max_inflight})
        except IpcError as exc:
            self._send(P.error(req_id, *exc.to_wire()))
            return
        if is_stream:
            self._spawn(req_id, self._run_stream(req_id, op, args))
        else:
            self._spawn(req_id, self._run_call(req_id, op, args))

    def _subscribe(self, req_id: int, args: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        topic_filter: Any = args.get("filter")
        credit = args.get("credit")
        if credit is not None and (type(credit) is not int or credit <= 0):
            raise InvalidArguments("credit must be a positive integer or absent", {"credit": repr(credit)})
        batch = args.get("batch", False)
        if type(batch) is not bool:
            raise InvalidArguments("batch must be a boolean or absent", {"batch": repr(batch)})
        sub = self.core.subscribe(session, topic_filter, self, queue_size=args.get("queue_size", 1024),
                                  policy=args.get("policy", "drop_oldest"), sub_id=req_id)
        sub.front = _SubOut(sub.id, credit, batch)
        self._send(P.response(req_id, {"filter": sub.filter, "batch": batch}))

    def _on_credit(self, f: P.Frame) -> None:
        _, sid, n = f
        if type(sid) is not int or type(n) is not int or n <= 0:
            self._fail(ProtocolError("CREDIT needs a subscription id and a positive count"))
            return
        session = self.session
        sub = session.subscriptions.get(sid) if session is not None else None
        st: _SubOut | None = sub.front if sub is not None else None
        if st is None or st.credit is None:
            return  # unknown or already ended subscription (crossed on the wire), or no credit flow
        st.credit = min(st.credit + n, 1 << 31)
        if sub is not None and sub.queue:
            self._pending[sub] = None
            if not self.paused:
                self._drain()

    def _on_cancel(self, f: P.Frame) -> None:
        sid = f[1]
        if type(sid) is not int or sid <= 0:  # as CREDIT: ignoring it would leave the stream running unsaid
            self._fail(ProtocolError("CANCEL id must be a positive integer"))
            return
        session = self.session
        assert session is not None
        sub = session.subscriptions.get(sid)
        if sub is not None:
            self.core.unsubscribe(session, sub)
            self._send(P.stream_end(sid))
            return
        task = self._tasks.get(sid)
        if task is not None:
            task.cancel()

    async def _run_call(self, req_id: int, op: str, args: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        try:
            result = await self.core.call(session, op, args)
        except IpcError as exc:
            self._send(P.error(req_id, *exc.to_wire()))
            return
        self._send(_encode_or_error(lambda: P.response(req_id, result), req_id))

    async def _run_stream(self, req_id: int, op: str, args: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        agen = cast(AsyncGenerator[Any, None], self.core.stream(session, op, args))
        try:
            async for item in agen:
                if self.paused:
                    await self._writable.wait()
                if self.closing:
                    return
                try:
                    frame = P.stream_item(req_id, item)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise ServiceError(f"stream item cannot be encoded: {exc}", {"op": op}) from exc
                self._send(frame)
            self._send(P.stream_end(req_id))
        except asyncio.CancelledError:
            if not self.closing:  # cancelled by the client's CANCEL: confirm the end
                self._send(P.stream_end(req_id))
        except IpcError as exc:
            self._send(P.stream_end(req_id, exc.to_wire()))
        finally:
            await agen.aclose()


class IpcServer:
    """Listens on a Unix socket; ``async with IpcServer(core, path):`` serves until the block ends."""

    def __init__(self, core: IpcCore, socket_path: str | Path, *, mode: int = 0o600, group: str | None = None,
                 max_frame: int = P.DEFAULT_MAX_FRAME, handshake_timeout: float = 5.0,
                 max_connections: int = 10000, max_inflight: int = 256,
                 write_buffer_high: int = 256 * 1024) -> None:
        self.core = core
        self.socket_path = Path(socket_path)
        self.mode = 0o660 if group is not None and mode == 0o600 else mode
        self.group = group
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.write_buffer_high = write_buffer_high
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        path = self.socket_path
        self._server = await listen_unix(path, lambda: _Connection(self), mode=self.mode, group=self.group)
        log.info("ipc.server_started", path=str(path), mode=oct(self.mode), group=self.group)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            conn._fail(ConnectionClosed("the server is shutting down"))
        await shut_down(self._server, self.socket_path, list(self._tasks))
        self._server = None
        log.info("ipc.server_stopped", path=str(self.socket_path))

    async def __aenter__(self) -> IpcServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
