"""The event-stream RPC layer: frame builders and a pure server-side connection state machine.

Every RPC frame is an event-stream message with three int32 headers, ``:message-type``,
``:message-flags`` and ``:stream-id`` (names compared case-insensitively, as
``aws_event_stream_rpc_extract_message_metadata`` does). Stream 0 carries the connection-level
messages (CONNECT, CONNECT_ACK, PING, PING_RESPONSE, PROTOCOL_ERROR, INTERNAL_ERROR); positive
stream ids carry APPLICATION_MESSAGE / APPLICATION_ERROR of one operation, the first message on
a stream naming it in the ``operation`` string header.

:class:`ServerConnection` enforces the server rules of aws-c-event-stream
(``source/event_stream_rpc_server.c``, ``s_route_message_by_type``) plus the connection handling
of the Greengrass Java nucleus (``ServiceOperationMappingContinuationHandler``): CONNECT first and
only once, nothing else until the CONNECT_ACK went out, a new stream id exactly one above the last,
messages for a stream that already ended are a protocol error unless they carry TERMINATE_STREAM
(a simultaneous close, silently ignored). It is sans-I/O in the h11/h2 manner: bytes in, events
out, frames to write collected in :meth:`ServerConnection.data_to_send`, so the rules are tested
in milliseconds and the asyncio server stays a thin loop. docs/greengrass-ipc.md is the contract.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from typing import Any, Final

from ipc.errors import ConnectionClosed, ProtocolError
from ipc.greengrass.eventstream import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EventStreamDecoder,
    EventStreamError,
    Header,
    HeaderType,
    Message,
    encode_headers,
    encode_raw,
)


class MessageType(IntEnum):
    """``enum aws_event_stream_rpc_message_type`` (event_stream_rpc.h)."""

    APPLICATION_MESSAGE = 0
    APPLICATION_ERROR = 1
    PING = 2
    PING_RESPONSE = 3
    CONNECT = 4
    CONNECT_ACK = 5
    PROTOCOL_ERROR = 6
    INTERNAL_ERROR = 7  # AWS_EVENT_STREAM_RPC_MESSAGE_TYPE_SERVER_ERROR in C, ServerError in Java


MESSAGE_TYPE_COUNT: Final = 8


class MessageFlag(IntFlag):
    """``enum aws_event_stream_rpc_message_flag``."""

    NONE = 0
    CONNECTION_ACCEPTED = 1
    TERMINATE_STREAM = 2


MESSAGE_TYPE_HEADER: Final = ":message-type"
MESSAGE_FLAGS_HEADER: Final = ":message-flags"
STREAM_ID_HEADER: Final = ":stream-id"
VERSION_HEADER: Final = ":version"
OPERATION_HEADER: Final = "operation"
SERVICE_MODEL_TYPE_HEADER: Final = "service-model-type"
CONTENT_TYPE_HEADER: Final = ":content-type"
CONTENT_TYPE_JSON: Final = "application/json"
PROTOCOL_VERSION: Final = "0.1.0"
MAX_STREAM_ID: Final = 2**31 - 1

# Payloads of connection-level errors: the texts of event_stream_rpc_priv.h, as valid JSON.
CONNECT_NOT_COMPLETED_ERROR: Final = (
    "A CONNECT message must be received, and the CONNECT_ACK must be sent in response, before any "
    "other message-types can be sent on this connection. In addition, only one CONNECT message is "
    "allowed on a connection."
)
INVALID_STREAM_ID_ERROR: Final = (
    "non-zero stream-id field is only allowed for messages of type APPLICATION_MESSAGE. "
    "The stream id max value is INT32_MAX."
)
INVALID_CLIENT_STREAM_ID_ERROR: Final = (
    "stream-id values must be monotonically incrementing. A stream-id arrived that was lower than "
    "the last seen stream-id."
)
INVALID_NEW_CLIENT_STREAM_ID_ERROR: Final = (
    "stream-id values must be monotonically incrementing. A new stream-id arrived that was "
    "incremented by more than 1."
)
INVALID_MESSAGE_TYPE_ERROR: Final = "an invalid value for message-type field was received."
INVALID_MESSAGE_ERROR: Final = (
    "A message was received with missing required fields. Check that your client is sending at "
    "least, :message-type, :message-flags, and :stream-id"
)
MISSING_OPERATION_ERROR: Final = (
    "The first message for on a non-zero :stream-id must contain an operation header value."
)


class RpcProtocolError(ProtocolError):
    """A message that is valid event-stream but not a valid RPC frame; ``reason`` as in events."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, {"reason": reason})
        self.reason = reason


class StreamClosedError(ConnectionClosed):
    """Sending on a stream that ended (either side sent TERMINATE_STREAM) or a closed connection.

    A race, not a bug: a client may end a subscription while the server is delivering to it.
    """

    default_code = "STREAM_CLOSED"


class InvalidStateError(RuntimeError):
    """The server called the state machine out of order (e.g. ``accept`` twice): a bug."""


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """An event-stream message with its RPC metadata pulled out of the headers.

    The fields are the raw int32 wire values: a peer can send any number, and the state machine,
    not the parser, decides what is allowed. ``headers`` keeps every header as received.
    """

    message_type: int
    flags: int
    stream_id: int
    operation: str | None
    headers: tuple[Header, ...]
    payload: bytes

    @property
    def terminates_stream(self) -> bool:
        return bool(self.flags & MessageFlag.TERMINATE_STREAM)

    def string_header(self, name: str) -> str | None:
        """First STRING header of that name, case-insensitive (awsiot's ``_find_header``)."""
        wanted = name.lower()
        for h in self.headers:
            if h.type is HeaderType.STRING and h.name.lower() == wanted:
                assert isinstance(h.value, str)
                return h.value
        return None

    @property
    def service_model_type(self) -> str | None:
        return self.string_header(SERVICE_MODEL_TYPE_HEADER)

    @property
    def content_type(self) -> str | None:
        return self.string_header(CONTENT_TYPE_HEADER)

    def json(self) -> Any:
        """The payload as JSON; ``RpcProtocolError(invalid_json)`` if it is not."""
        try:
            return json.loads(self.payload) if self.payload else {}
        except (ValueError, RecursionError) as exc:
            raise RpcProtocolError("invalid_json", f"payload is not JSON: {exc}") from exc


def parse_rpc(message: Message) -> RpcMessage:
    """Pull the RPC metadata out of a decoded message.

    Mirrors ``aws_event_stream_rpc_extract_message_metadata``: the three metadata headers must be
    INT32 and ``operation`` STRING (other types are ignored as if absent), names match
    case-insensitively, the scan stops once all four were seen (so a later duplicate is ignored,
    an earlier one overridden). Missing metadata raises ``RpcProtocolError(missing_rpc_headers)``.
    """
    message_type: int | None = None
    flags: int | None = None
    stream_id: int | None = None
    operation: str | None = None
    for h in message.headers:
        if h.type is HeaderType.INT32:
            name = h.name.lower()
            assert isinstance(h.value, int)
            if name == STREAM_ID_HEADER:
                stream_id = h.value
            elif name == MESSAGE_TYPE_HEADER:
                message_type = h.value
            elif name == MESSAGE_FLAGS_HEADER:
                flags = h.value
            else:
                continue
        elif h.type is HeaderType.STRING and h.name.lower() == OPERATION_HEADER:
            assert isinstance(h.value, str)
            operation = h.value
        else:
            continue
        if message_type is not None and flags is not None and stream_id is not None and operation is not None:
            break
    if message_type is None or flags is None or stream_id is None:
        raise RpcProtocolError("missing_rpc_headers", INVALID_MESSAGE_ERROR)
    return RpcMessage(message_type, flags, stream_id, operation, message.headers, message.payload)


def parse_connect_payload(payload: bytes) -> str | None:
    """The ``authToken`` of a CONNECT payload, or None when absent, empty or not JSON.

    The Java nucleus reads the payload into ``GreengrassEventStreamConnectMessage`` (unknown
    properties ignored) and refuses a missing or empty token; so do we.
    """
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    token = doc.get("authToken")
    return token if isinstance(token, str) and token else None


def version_matches(version: str | None) -> bool:
    """The Java nucleus compares ``:version`` as three numbers with 0.1.0."""
    if version is None:
        return False
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdecimal() and p.isascii() for p in parts):
        return False
    return tuple(int(p) for p in parts) == (0, 1, 0)


# --------------------------------------------------------------------------------------------
# Building frames


_I32 = struct.Struct(">i")


def _int32_prefix(name: str) -> bytes:
    """Header bytes up to the value, precomputed: every frame carries these three."""
    return bytes((len(name),)) + name.encode() + bytes((HeaderType.INT32,))


_TYPE_PREFIX = _int32_prefix(MESSAGE_TYPE_HEADER)
_FLAGS_PREFIX = _int32_prefix(MESSAGE_FLAGS_HEADER)
_STREAM_PREFIX = _int32_prefix(STREAM_ID_HEADER)
_JSON_CONTENT_TYPE = encode_headers([Header.from_string(CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON)])

Body = Mapping[str, Any] | bytes


def _json_bytes(body: Body) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_rpc(
    message_type: int,
    *,
    flags: int = 0,
    stream_id: int = 0,
    headers: Iterable[Header] | bytes = (),
    payload: bytes = b"",
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> bytes:
    """One RPC frame: the given headers (or pre-encoded header bytes), then the three metadata
    headers in the order aws-c-event-stream appends them."""
    block = headers if isinstance(headers, bytes) else encode_headers(headers)
    block += (
        _TYPE_PREFIX + _I32.pack(message_type)
        + _FLAGS_PREFIX + _I32.pack(flags)
        + _STREAM_PREFIX + _I32.pack(stream_id)
    )
    return encode_raw(block, payload, max_message_size=max_message_size)


def connect_ack(accepted: bool) -> bytes:
    """The Java nucleus sends CONNECT_ACK with no headers of its own and no payload."""
    flags = MessageFlag.CONNECTION_ACCEPTED if accepted else MessageFlag.NONE
    return encode_rpc(MessageType.CONNECT_ACK, flags=flags)


def ping_response(ping: RpcMessage) -> bytes:
    """Echo the PING's non-``:`` headers and payload, as the Java nucleus does."""
    echoed = [h for h in ping.headers if not h.name.startswith(":")]
    return encode_rpc(MessageType.PING_RESPONSE, headers=echoed, payload=ping.payload)


def connection_error(message_type: MessageType, text: str) -> bytes:
    """PROTOCOL_ERROR or INTERNAL_ERROR on stream 0 with ``{"message": text}``."""
    return encode_rpc(message_type, headers=_JSON_CONTENT_TYPE, payload=_json_bytes({"message": text}))


def _model_headers(service_model_type: str, extra: Iterable[Header]) -> bytes:
    return (
        encode_headers(extra)
        + _JSON_CONTENT_TYPE
        + encode_headers([Header.from_string(SERVICE_MODEL_TYPE_HEADER, service_model_type)])
    )


def application_message(
    stream_id: int,
    service_model_type: str,
    body: Body,
    *,
    terminate_stream: bool = False,
    headers: Iterable[Header] = (),
) -> bytes:
    """A modeled message: ``:content-type: application/json`` and ``service-model-type``."""
    return encode_rpc(
        MessageType.APPLICATION_MESSAGE,
        flags=MessageFlag.TERMINATE_STREAM if terminate_stream else MessageFlag.NONE,
        stream_id=stream_id,
        headers=_model_headers(service_model_type, headers),
        payload=_json_bytes(body),
    )


def application_error(
    stream_id: int,
    service_model_type: str,
    message: str,
    *,
    fields: Mapping[str, Any] | None = None,
    terminate_stream: bool = True,
) -> bytes:
    """A modeled error such as ``aws.greengrass#UnauthorizedError``: payload ``{"message": ...}``."""
    body: dict[str, Any] = {"message": message, **(fields or {})}
    return encode_rpc(
        MessageType.APPLICATION_ERROR,
        flags=MessageFlag.TERMINATE_STREAM if terminate_stream else MessageFlag.NONE,
        stream_id=stream_id,
        headers=_model_headers(service_model_type, ()),
        payload=_json_bytes(body),
    )


# Client-side frames: what awsiotsdk sends, for raw-socket tests and tools.


def connect_request(auth_token: str, *, version: str = PROTOCOL_VERSION) -> bytes:
    """CONNECT exactly as ``awsiot.eventstreamrpc`` builds it: ``:version`` then the metadata,
    payload ``{"authToken": "<token>"}`` (formatted with ``%s``, not JSON-escaped, by the SDK)."""
    payload = ('{"authToken": "%s"}' % auth_token).encode()  # noqa: UP031 - byte-identical to the SDK
    return encode_rpc(
        MessageType.CONNECT, headers=[Header.from_string(VERSION_HEADER, version)], payload=payload
    )


def operation_request(
    stream_id: int, operation: str, service_model_type: str, body: Body
) -> bytes:
    """The first message of a stream as ``ClientOperation._activate`` sends it."""
    return encode_rpc(
        MessageType.APPLICATION_MESSAGE,
        stream_id=stream_id,
        headers=[
            Header.from_string(CONTENT_TYPE_HEADER, CONTENT_TYPE_JSON),
            Header.from_string(SERVICE_MODEL_TYPE_HEADER, service_model_type),
            Header.from_string(OPERATION_HEADER, operation),
        ],
        payload=_json_bytes(body),
    )


def ping(payload: bytes = b"", headers: Iterable[Header] = ()) -> bytes:
    return encode_rpc(MessageType.PING, headers=headers, payload=payload)


# --------------------------------------------------------------------------------------------
# Server connection state machine


class ConnectionState(Enum):
    AWAITING_CONNECT = "awaiting_connect"
    AWAITING_ACK = "awaiting_ack"  # CONNECT received, the server is authenticating
    CONNECTED = "connected"
    CLOSED = "closed"  # flush data_to_send(), then close the transport


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Authenticate ``auth_token``, then call ``accept()`` or ``reject()``."""

    auth_token: str
    version: str
    message: RpcMessage


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """The machine refused the CONNECT itself (``version_mismatch``, ``missing_auth_token``);
    a CONNECT_ACK without the accepted flag is queued and the state is CLOSED."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The PING_RESPONSE is already queued; the event is for liveness bookkeeping only."""

    message: RpcMessage


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """First message of a new stream: dispatch ``operation`` with ``message`` as the request."""

    stream_id: int
    operation: str
    message: RpcMessage


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """A later message on an open stream (a client stream event, or its TERMINATE_STREAM)."""

    stream_id: int
    message: RpcMessage


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The client ended the stream (TERMINATE_STREAM); follows that message's own event."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The connection is CLOSED; an error frame may be queued (see docs/greengrass-ipc.md)."""

    reason: str
    detail: str


Event = ConnectRequested | ConnectRefused | PingReceived | StreamOpened | StreamMessage | StreamClosed | (
    ProtocolViolation
)


class ServerConnection:
    """One client connection's protocol state. Feed it bytes; act on the events; write out
    :meth:`data_to_send` after every call; close the transport once :attr:`closed` is true."""

    __slots__ = ("_decoder", "_last_stream_id", "_open", "_out", "_state", "close_reason", "max_message_size")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._decoder = EventStreamDecoder(max_message_size=max_message_size)
        self._state = ConnectionState.AWAITING_CONNECT
        self._last_stream_id = 0
        self._open: set[int] = set()
        self._out: list[bytes] = []
        self.close_reason: str | None = None

    # -- inspection -------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is ConnectionState.CLOSED

    @property
    def last_stream_id(self) -> int:
        return self._last_stream_id

    @property
    def buffered(self) -> int:
        """Bytes received but not yet a whole message."""
        return self._decoder.buffered

    @property
    def open_streams(self) -> frozenset[int]:
        return frozenset(self._open)

    def is_stream_open(self, stream_id: int) -> bool:
        return stream_id in self._open

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Bytes from the socket. A framing error closes the connection without a reply, as the
        C channel handler shuts the channel down; messages before the bad bytes still count."""
        if self.closed:
            return []
        error: EventStreamError | None = None
        try:
            messages = self._decoder.feed(data)
        except EventStreamError as exc:
            messages, error = exc.messages, exc
        events: list[Event] = []
        for m in messages:
            events.extend(self.receive_message(m))
            if self.closed:
                return events
        if error is not None:
            events.append(self._violation(error.reason, error.message, reply=None))
        return events

    def receive_eof(self) -> list[Event]:
        """The client closed its side: a partial message is a ``truncated`` violation."""
        if self.closed:
            return []
        try:
            self._decoder.eof()
        except EventStreamError as exc:
            return [self._violation(exc.reason, exc.message, reply=None)]
        self._close("eof")
        return []

    def receive_message(self, message: Message) -> list[Event]:
        if self.closed:
            return []
        try:
            rpc = parse_rpc(message)
        except RpcProtocolError as exc:
            return [self._violation(exc.reason, exc.message)]
        return self._route(rpc)

    # -- server decisions -------------------------------------------------------------------

    def accept(self) -> None:
        if self._state is not ConnectionState.AWAITING_ACK:
            raise InvalidStateError(f"accept() in state {self._state.value}")
        self._out.append(connect_ack(True))
        self._state = ConnectionState.CONNECTED

    def reject(self) -> None:
        """Queue the refusing CONNECT_ACK. Keep the socket open a moment after writing it so the
        client reads the refusal (raising AccessDeniedError) instead of a reset."""
        if self._state is not ConnectionState.AWAITING_ACK:
            raise InvalidStateError(f"reject() in state {self._state.value}")
        self._out.append(connect_ack(False))
        self._close("rejected")

    def close(self, reason: str = "server_close") -> None:
        """Server-initiated close: nothing more is accepted or sent."""
        if not self.closed:
            self._close(reason)

    def send(
        self,
        stream_id: int,
        message_type: MessageType = MessageType.APPLICATION_MESSAGE,
        *,
        headers: Iterable[Header] | bytes = (),
        payload: bytes = b"",
        terminate_stream: bool = False,
    ) -> None:
        """Queue an application frame on an open stream; TERMINATE_STREAM ends it."""
        if message_type not in (MessageType.APPLICATION_MESSAGE, MessageType.APPLICATION_ERROR):
            raise InvalidStateError(f"send() carries application messages, not {message_type.name}")
        self._check_sendable(stream_id)
        self._out.append(
            encode_rpc(
                message_type,
                flags=MessageFlag.TERMINATE_STREAM if terminate_stream else MessageFlag.NONE,
                stream_id=stream_id,
                headers=headers,
                payload=payload,
                max_message_size=self.max_message_size,
            )
        )
        if terminate_stream:
            self._open.discard(stream_id)

    def send_response(
        self,
        stream_id: int,
        service_model_type: str,
        body: Body,
        *,
        terminate_stream: bool = False,
    ) -> None:
        """A modeled APPLICATION_MESSAGE; one-shot operations pass ``terminate_stream=True``."""
        self.send(
            stream_id,
            headers=_model_headers(service_model_type, ()),
            payload=_json_bytes(body),
            terminate_stream=terminate_stream,
        )

    def send_error(
        self,
        stream_id: int,
        service_model_type: str,
        message: str,
        *,
        fields: Mapping[str, Any] | None = None,
        terminate_stream: bool = True,
    ) -> None:
        """A modeled APPLICATION_ERROR, ``{"message": ..., **fields}``; ends the stream by default."""
        self.send(
            stream_id,
            MessageType.APPLICATION_ERROR,
            headers=_model_headers(service_model_type, ()),
            payload=_json_bytes({"message": message, **(fields or {})}),
            terminate_stream=terminate_stream,
        )

    # -- internals --------------------------------------------------------------------------

    def _check_sendable(self, stream_id: int) -> None:
        if self._state is ConnectionState.CLOSED:
            raise StreamClosedError(
                f"connection closed ({self.close_reason})", {"stream_id": stream_id}
            )
        if self._state is not ConnectionState.CONNECTED:
            raise InvalidStateError(f"send() before the handshake completed (state {self._state.value})")
        if stream_id not in self._open:
            raise StreamClosedError(f"stream {stream_id} is not open", {"stream_id": stream_id})

    def _close(self, reason: str) -> None:
        self._state = ConnectionState.CLOSED
        self.close_reason = reason
        self._open.clear()

    def _violation(
        self, reason: str, detail: str, reply: MessageType | None = MessageType.PROTOCOL_ERROR
    ) -> ProtocolViolation:
        if reply is not None:
            self._out.append(connection_error(reply, detail))
        self._close(reason)
        return ProtocolViolation(reason, detail)

    def _route(self, rpc: RpcMessage) -> list[Event]:
        # The C server compares these as uint32, so negative values land above every limit.
        message_type = rpc.message_type & 0xFFFFFFFF
        stream_id = rpc.stream_id & 0xFFFFFFFF
        state = self._state

        if state is not ConnectionState.CONNECTED and message_type != MessageType.CONNECT:
            return [self._violation("connect_not_completed", CONNECT_NOT_COMPLETED_ERROR)]

        if stream_id > 0:
            if message_type > MessageType.APPLICATION_ERROR or stream_id > MAX_STREAM_ID:
                return [self._violation("invalid_stream_id", INVALID_STREAM_ID_ERROR)]
            events: list[Event]
            if stream_id <= self._last_stream_id:
                if stream_id not in self._open:
                    if rpc.terminates_stream:
                        return []  # simultaneous close: both sides ended the stream
                    return [self._violation("unknown_stream", INVALID_CLIENT_STREAM_ID_ERROR)]
                events = [StreamMessage(stream_id, rpc)]
            else:
                if stream_id != self._last_stream_id + 1:
                    return [self._violation("stream_id_not_sequential", INVALID_NEW_CLIENT_STREAM_ID_ERROR)]
                if not rpc.operation:
                    return [self._violation("missing_operation", MISSING_OPERATION_ERROR)]
                self._last_stream_id = stream_id
                self._open.add(stream_id)
                events = [StreamOpened(stream_id, rpc.operation, rpc)]
            if rpc.terminates_stream:
                self._open.discard(stream_id)
                events.append(StreamClosed(stream_id))
            return events

        if message_type <= MessageType.APPLICATION_ERROR or message_type >= MESSAGE_TYPE_COUNT:
            return [self._violation("invalid_message_type", INVALID_MESSAGE_TYPE_ERROR)]
        if message_type == MessageType.CONNECT:
            if state is not ConnectionState.AWAITING_CONNECT:
                return [self._violation("duplicate_connect", CONNECT_NOT_COMPLETED_ERROR)]
            return self._on_connect(rpc)
        if message_type == MessageType.PING:
            self._out.append(ping_response(rpc))
            return [PingReceived(rpc)]
        if message_type == MessageType.PING_RESPONSE:
            return []
        if message_type == MessageType.CONNECT_ACK:
            # The Java nucleus answers message types it does not serve with ServerError and closes.
            return [
                self._violation(
                    "unexpected_message_type",
                    f"message type value: {message_type} is not recognized as a valid request path.",
                    reply=MessageType.INTERNAL_ERROR,
                )
            ]
        # PROTOCOL_ERROR / INTERNAL_ERROR from the client: it gives up on us; answering is noise.
        text = rpc.payload.decode("utf-8", "replace")[:1024]
        detail = f"client sent {MessageType(message_type).name}: {text}"
        return [self._violation("peer_error", detail, reply=None)]

    def _on_connect(self, rpc: RpcMessage) -> list[Event]:
        version: str | None = None
        for h in rpc.headers:  # the Java nucleus matches this name exactly, not case-insensitively
            if h.name == VERSION_HEADER and h.type is HeaderType.STRING:
                assert isinstance(h.value, str)
                version = h.value
                break
        if not version_matches(version):
            self._out.append(connect_ack(False))
            self._close("version_mismatch")
            detail = f"client version {version!r}, server {PROTOCOL_VERSION}"
            return [ConnectRefused("version_mismatch", detail)]
        assert version is not None
        token = parse_connect_payload(rpc.payload)
        if token is None:
            self._out.append(connect_ack(False))
            self._close("missing_auth_token")
            return [ConnectRefused("missing_auth_token", "CONNECT payload has no authToken")]
        self._state = ConnectionState.AWAITING_ACK
        return [ConnectRequested(token, version, rpc)]
