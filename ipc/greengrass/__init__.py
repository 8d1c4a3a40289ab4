"""Greengrass IPC compatibility: the wire layers of AWS's event-stream RPC protocol.

``eventstream`` is the message codec (prelude, typed headers, CRC32), ``rpc`` the RPC framing
and a sans-I/O server connection state machine. The socket server and the Greengrass operations
build on these; docs/greengrass-ipc.md describes what the awsiotsdk client sends and expects.
"""

from ipc.greengrass.eventstream import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EventStreamDecoder,
    EventStreamError,
    Header,
    HeaderType,
    HeaderValue,
    Message,
    decode_message,
    encode_message,
)
from ipc.greengrass.rpc import (
    PROTOCOL_VERSION,
    ConnectionState,
    ConnectRefused,
    ConnectRequested,
    Event,
    MessageFlag,
    MessageType,
    PingReceived,
    ProtocolViolation,
    RpcMessage,
    RpcProtocolError,
    ServerConnection,
    StreamClosed,
    StreamClosedError,
    StreamMessage,
    StreamOpened,
    parse_rpc,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "ConnectRefused",
    "ConnectRequested",
    "ConnectionState",
    "Event",
    "EventStreamDecoder",
    "EventStreamError",
    "Header",
    "HeaderType",
    "HeaderValue",
    "Message",
    "MessageFlag",
    "MessageType",
    "PingReceived",
    "ProtocolViolation",
    "RpcMessage",
    "RpcProtocolError",
    "ServerConnection",
    "StreamClosed",
    "StreamClosedError",
    "StreamMessage",
    "StreamOpened",
    "decode_message",
    "encode_message",
    "parse_rpc",
]
