"""Event-stream RPC: frame shapes and the server connection rules of aws-c-event-stream.

The rules come from ``source/event_stream_rpc_server.c`` (``s_route_message_by_type``) and the
Greengrass Java nucleus's ``ServiceOperationMappingContinuationHandler``; the client frames mirror
``awsiot/eventstreamrpc.py`` (awsiotsdk). Every case runs the pure state machine: bytes in,
events and bytes out.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.errors import ConnectionClosed, ProtocolError
from ipc.greengrass.eventstream import EventStreamDecoder, Header, HeaderType, Message, decode_message
from ipc.greengrass.rpc import (
    CONNECT_NOT_COMPLETED_ERROR,
    PROTOCOL_VERSION,
    ConnectionState,
    ConnectRefused,
    ConnectRequested,
    Event,
    InvalidStateError,
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
    application_error,
    application_message,
    connect_ack,
    connect_request,
    encode_rpc,
    operation_request,
    parse_connect_payload,
    parse_rpc,
    ping,
    version_matches,
)

FUZZ = settings(derandomize=True, deadline=None, max_examples=300)
PUBLISH = "aws.greengrass#PublishToTopic"
PUBLISH_REQ = "aws.greengrass#PublishToTopicRequest"
PUBLISH_RESP = "aws.greengrass#PublishToTopicResponse"


def frames(data: bytes) -> list[RpcMessage]:
    dec = EventStreamDecoder()
    out = [parse_rpc(m) for m in dec.feed(data)]
    dec.eof()
    return out


def app(stream_id: int, *, flags: int = 0, operation: str | None = None, payload: bytes = b"{}",
        message_type: int = MessageType.APPLICATION_MESSAGE) -> bytes:
    headers = [Header.from_string(":content-type", "application/json")]
    if operation is not None:
        headers.append(Header.from_string("operation", operation))
    return encode_rpc(message_type, flags=flags, stream_id=stream_id, headers=headers, payload=payload)


def connected() -> ServerConnection:
    conn = ServerConnection()
    events = conn.receive_data(connect_request("tok"))
    assert events == [ConnectRequested("tok", PROTOCOL_VERSION, frames(connect_request("tok"))[0])]
    conn.accept()
    (ack,) = frames(conn.data_to_send())
    assert (ack.message_type, ack.flags, ack.stream_id) == (MessageType.CONNECT_ACK, 1, 0)
    return conn


def violation(conn: ServerConnection, data: bytes) -> tuple[ProtocolViolation, list[RpcMessage]]:
    events = conn.receive_data(data)
    assert isinstance(events[-1], ProtocolViolation), events
    assert conn.closed
    assert conn.state is ConnectionState.CLOSED
    return events[-1], frames(conn.data_to_send())


def assert_protocol_error(sent: list[RpcMessage], text: str | None = None) -> None:
    (err,) = sent
    assert err.message_type == MessageType.PROTOCOL_ERROR
    assert err.stream_id == 0
    assert err.content_type == "application/json"
    body = json.loads(err.payload)
    assert isinstance(body["message"], str)
    if text is not None:
        assert body["message"] == text


# --- constants and frame shapes ----------------------------------------------------------------


def test_constants_match_event_stream_rpc_h() -> None:
    assert [t.value for t in MessageType] == list(range(8))
    assert [t.name for t in MessageType][:7] == [
        "APPLICATION_MESSAGE", "APPLICATION_ERROR", "PING", "PING_RESPONSE", "CONNECT", "CONNECT_ACK",
        "PROTOCOL_ERROR",
    ]
    assert int(MessageFlag.CONNECTION_ACCEPTED) == 1
    assert int(MessageFlag.TERMINATE_STREAM) == 2
    assert PROTOCOL_VERSION == "0.1.0"


def test_connect_request_is_what_awsiotsdk_sends() -> None:
    m = decode_message(connect_request("ABC123"))
    assert [(h.name, h.type) for h in m.headers] == [
        (":version", HeaderType.STRING),
        (":message-type", HeaderType.INT32),
        (":message-flags", HeaderType.INT32),
        (":stream-id", HeaderType.INT32),
    ]
    assert [h.value for h in m.headers] == ["0.1.0", MessageType.CONNECT, 0, 0]
    assert m.payload == b'{"authToken": "ABC123"}'


def test_operation_request_is_what_client_operation_activate_sends() -> None:
    rpc = parse_rpc(decode_message(operation_request(1, PUBLISH, PUBLISH_REQ, {"topic": "a"})))
    assert (rpc.message_type, rpc.flags, rpc.stream_id, rpc.operation) == (0, 0, 1, PUBLISH)
    assert rpc.content_type == "application/json"
    assert rpc.service_model_type == PUBLISH_REQ
    assert rpc.json() == {"topic": "a"}


def test_connect_ack_has_no_payload_and_only_the_rpc_headers() -> None:
    for accepted, flags in ((True, 1), (False, 0)):
        m = decode_message(connect_ack(accepted))
        assert m.payload == b""
        assert [(h.name, h.value) for h in m.headers] == [
            (":message-type", MessageType.CONNECT_ACK), (":message-flags", flags), (":stream-id", 0),
        ]


def test_application_frames_carry_content_type_and_model_type() -> None:
    (msg,) = frames(application_message(3, PUBLISH_RESP, {}, terminate_stream=True))
    assert (msg.message_type, msg.flags, msg.stream_id) == (0, MessageFlag.TERMINATE_STREAM, 3)
    assert msg.content_type == "application/json"
    assert msg.service_model_type == PUBLISH_RESP
    assert msg.json() == {}
    (err,) = frames(application_error(3, "aws.greengrass#ResourceNotFoundError", "no such thing",
                                      fields={"resourceType": "component"}))
    assert (err.message_type, err.flags) == (MessageType.APPLICATION_ERROR, MessageFlag.TERMINATE_STREAM)
    assert err.service_model_type == "aws.greengrass#ResourceNotFoundError"
    assert err.json() == {"message": "no such thing", "resourceType": "component"}


def test_parse_rpc_requires_the_three_int32_metadata_headers() -> None:
    with pytest.raises(RpcProtocolError) as info:
        parse_rpc(Message((Header.from_int32(":message-type", 0), Header.from_int32(":stream-id", 1))))
    assert info.value.reason == "missing_rpc_headers"
    assert isinstance(info.value, ProtocolError)
    # a metadata header of the wrong type counts as missing, as in the C extractor
    with pytest.raises(RpcProtocolError):
        parse_rpc(Message((
            Header.from_int32(":message-type", 0), Header.from_int64(":message-flags", 0),
            Header.from_int32(":stream-id", 1),
        )))


def test_parse_rpc_names_are_case_insensitive_and_operation_must_be_a_string() -> None:
    rpc = parse_rpc(Message((
        Header.from_int32(":Message-Type", 0), Header.from_int32(":MESSAGE-FLAGS", 2),
        Header.from_int32(":stream-ID", 7), Header.from_byte_array("operation", b"x"),
        Header.from_string("Operation", "op"),
    )))
    assert (rpc.message_type, rpc.flags, rpc.stream_id, rpc.operation) == (0, 2, 7, "op")
    assert rpc.terminates_stream


def test_parse_rpc_duplicates_follow_the_c_scan() -> None:
    # the C loop stops as soon as all four are found: a later duplicate is ignored ...
    rpc = parse_rpc(Message((
        Header.from_int32(":message-type", 0), Header.from_int32(":message-flags", 0),
        Header.from_int32(":stream-id", 1), Header.from_string("operation", "first"),
        Header.from_int32(":stream-id", 9),
    )))
    assert rpc.stream_id == 1
    # ... while before that point a later value overrides an earlier one
    rpc = parse_rpc(Message((
        Header.from_int32(":stream-id", 1), Header.from_int32(":stream-id", 2),
        Header.from_int32(":message-type", 0), Header.from_int32(":message-flags", 0),
    )))
    assert rpc.stream_id == 2


@pytest.mark.parametrize(
    ("payload", "token"),
    [
        (b'{"authToken": "abc"}', "abc"),
        (b'{"authToken":"abc","other":1}', "abc"),
        (b'{"authToken": ""}', None),
        (b'{"authToken": 5}', None),
        (b'{"token": "abc"}', None),
        (b'["abc"]', None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"", None),
        (b"[" * 100_000, None),
    ],
)
def test_parse_connect_payload(payload: bytes, token: str | None) -> None:
    assert parse_connect_payload(payload) == token


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.1.0", True), ("00.1.00", True), ("0.1.1", False), ("0.1", False), ("1.0.0", False),
     ("", False), (None, False), ("0.1.x", False), ("0.1.\uff10", False)],
)
def test_version_matches(version: str | None, ok: bool) -> None:
    assert version_matches(version) is ok


# --- handshake ---------------------------------------------------------------------------------


def test_accepted_handshake() -> None:
    conn = connected()
    assert conn.state is ConnectionState.CONNECTED
    assert conn.data_to_send() == b""


def test_rejected_handshake_sends_a_refusing_ack_and_closes() -> None:
    conn = ServerConnection()
    (event,) = conn.receive_data(connect_request("wrong"))
    assert isinstance(event, ConnectRequested)
    assert conn.state is ConnectionState.AWAITING_ACK
    conn.reject()
    (ack,) = frames(conn.data_to_send())
    assert (ack.message_type, ack.flags, ack.payload) == (MessageType.CONNECT_ACK, 0, b"")
    assert conn.closed
    assert conn.close_reason == "rejected"
    assert conn.receive_data(app(1, operation=PUBLISH)) == []


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([Header.from_string(":version", "0.2.0")], "version_mismatch"),
        ([], "version_mismatch"),
        ([Header.from_byte_array(":version", b"0.1.0")], "version_mismatch"),
        ([Header.from_string(":Version", "0.1.0")], "version_mismatch"),  # Java matches exactly
    ],
)
def test_connect_refused_for_version(headers: list[Header], reason: str) -> None:
    conn = ServerConnection()
    data = encode_rpc(MessageType.CONNECT, headers=headers, payload=b'{"authToken": "t"}')
    (event,) = conn.receive_data(data)
    assert isinstance(event, ConnectRefused)
    assert event.reason == reason
    (ack,) = frames(conn.data_to_send())
    assert (ack.message_type, ack.flags) == (MessageType.CONNECT_ACK, 0)
    assert conn.closed


def test_connect_refused_without_auth_token() -> None:
    conn = ServerConnection()
    data = encode_rpc(MessageType.CONNECT, headers=[Header.from_string(":version", "0.1.0")], payload=b"{}")
    (event,) = conn.receive_data(data)
    assert event == ConnectRefused("missing_auth_token", "CONNECT payload has no authToken")
    (ack,) = frames(conn.data_to_send())
    assert ack.flags == 0


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(app(1, operation=PUBLISH), id="application_message"),
        pytest.param(ping(), id="ping"),
        pytest.param(encode_rpc(MessageType.PING_RESPONSE), id="ping_response"),
        pytest.param(encode_rpc(MessageType.CONNECT_ACK, flags=1), id="connect_ack"),
    ],
)
def test_nothing_but_connect_first(first: bytes) -> None:
    event, sent = violation(ServerConnection(), first)
    assert event.reason == "connect_not_completed"
    assert_protocol_error(sent, CONNECT_NOT_COMPLETED_ERROR)


def test_connect_on_a_stream_is_invalid() -> None:
    data = encode_rpc(MessageType.CONNECT, stream_id=1, headers=[Header.from_string(":version", "0.1.0")],
                      payload=b'{"authToken": "t"}')
    event, sent = violation(ServerConnection(), data)
    assert event.reason == "invalid_stream_id"
    assert_protocol_error(sent)


def test_nothing_while_the_server_decides() -> None:
    for second, reason in ((ping(), "connect_not_completed"), (connect_request("t"), "duplicate_connect")):
        conn = ServerConnection()
        conn.receive_data(connect_request("t"))
        event, sent = violation(conn, second)
        assert event.reason == reason
        assert_protocol_error(sent, CONNECT_NOT_COMPLETED_ERROR)
        with pytest.raises(InvalidStateError):
            conn.accept()


def test_second_connect_after_ack_is_a_protocol_error() -> None:
    event, sent = violation(connected(), connect_request("tok"))
    assert event.reason == "duplicate_connect"
    assert_protocol_error(sent)


def test_accept_and_reject_only_while_awaiting_ack() -> None:
    conn = ServerConnection()
    with pytest.raises(InvalidStateError):
        conn.accept()
    with pytest.raises(InvalidStateError):
        conn.reject()
    conn = connected()
    with pytest.raises(InvalidStateError):
        conn.accept()


# --- streams -----------------------------------------------------------------------------------


def test_streams_open_in_sequence_and_carry_the_operation() -> None:
    conn = connected()
    (e1,) = conn.receive_data(app(1, operation=PUBLISH, payload=b'{"topic": "a"}'))
    assert isinstance(e1, StreamOpened)
    assert (e1.stream_id, e1.operation) == (1, PUBLISH)
    assert e1.message.json() == {"topic": "a"}
    (e2,) = conn.receive_data(app(2, operation="op2"))
    assert isinstance(e2, StreamOpened)
    (e3,) = conn.receive_data(app(1, payload=b'{"more": 1}'))
    assert isinstance(e3, StreamMessage)
    assert e3.stream_id == 1
    assert e3.message.json() == {"more": 1}
    assert conn.open_streams == frozenset({1, 2})
    assert conn.last_stream_id == 2
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("first_id", "ok"), [(1, True), (2, False), (0x7FFFFFFF, False)])
def test_the_first_stream_id_must_be_one(first_id: int, ok: bool) -> None:
    conn = connected()
    events = conn.receive_data(app(first_id, operation=PUBLISH))
    if ok:
        assert isinstance(events[0], StreamOpened)
    else:
        assert events == [ProtocolViolation("stream_id_not_sequential", events[0].detail)]  # type: ignore[union-attr]
        assert_protocol_error(frames(conn.data_to_send()))


def test_skipped_stream_id_is_a_protocol_error() -> None:
    conn = connected()
    conn.receive_data(app(1, operation=PUBLISH))
    event, sent = violation(conn, app(3, operation=PUBLISH))
    assert event.reason == "stream_id_not_sequential"
    assert_protocol_error(sent)


def test_reused_id_of_an_ended_stream_is_a_protocol_error() -> None:
    conn = connected()
    conn.receive_data(app(1, operation=PUBLISH))
    conn.send_response(1, PUBLISH_RESP, {}, terminate_stream=True)
    event, sent = violation(conn, app(1, operation=PUBLISH))
    assert event.reason == "unknown_stream"
    assert sent[0].message_type == MessageType.APPLICATION_MESSAGE  # the response, written first
    assert_protocol_error(sent[1:])


def test_terminate_on_an_ended_stream_is_a_simultaneous_close() -> None:
    # awsiotsdk's ClientOperation.close() sends an empty TERMINATE_STREAM message even when the
    # server's response already ended the stream: the C server ignores it.
    conn = connected()
    conn.receive_data(app(1, operation=PUBLISH))
    conn.send_response(1, PUBLISH_RESP, {}, terminate_stream=True)
    conn.data_to_send()
    close = encode_rpc(MessageType.APPLICATION_MESSAGE, flags=MessageFlag.TERMINATE_STREAM, stream_id=1)
    assert conn.receive_data(close) == []
    assert conn.state is ConnectionState.CONNECTED
    assert conn.data_to_send() == b""


def test_client_terminate_closes_the_stream() -> None:
    conn = connected()
    conn.receive_data(app(1, operation="aws.greengrass#SubscribeToTopic"))
    conn.send_response(1, "aws.greengrass#SubscribeToTopicResponse", {})
    conn.send_response(1, "aws.greengrass#SubscriptionResponseMessage", {"jsonMessage": {"message": {}}})
    close = encode_rpc(MessageType.APPLICATION_MESSAGE, flags=MessageFlag.TERMINATE_STREAM, stream_id=1)
    events = conn.receive_data(close)
    assert isinstance(events[0], StreamMessage)
    assert events[1:] == [StreamClosed(1)]
    assert not conn.is_stream_open(1)
    with pytest.raises(StreamClosedError) as info:
        conn.send_response(1, "aws.greengrass#SubscriptionResponseMessage", {})
    assert isinstance(info.value, ConnectionClosed)
    assert info.value.code == "STREAM_CLOSED"
    sent = frames(conn.data_to_send())
    assert [m.flags for m in sent] == [0, 0]
    assert conn.state is ConnectionState.CONNECTED


def test_a_stream_opened_and_terminated_by_its_first_message() -> None:
    conn = connected()
    events = conn.receive_data(app(1, operation=PUBLISH, flags=MessageFlag.TERMINATE_STREAM))
    assert [type(e) for e in events] == [StreamOpened, StreamClosed]
    assert conn.open_streams == frozenset()
    (e,) = conn.receive_data(app(2, operation=PUBLISH))
    assert isinstance(e, StreamOpened)


@pytest.mark.parametrize("operation", [None, ""])
def test_new_stream_needs_an_operation(operation: str | None) -> None:
    event, sent = violation(connected(), app(1, operation=operation))
    assert event.reason == "missing_operation"
    assert_protocol_error(sent)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(encode_rpc(MessageType.PING, stream_id=1), "invalid_stream_id", id="ping_on_stream"),
        pytest.param(encode_rpc(MessageType.CONNECT_ACK, stream_id=1), "invalid_stream_id",
                     id="ack_on_stream"),
        pytest.param(app(-1, operation=PUBLISH), "invalid_stream_id", id="negative_stream_id"),
        pytest.param(app(-(2**31), operation=PUBLISH), "invalid_stream_id", id="int32_min_stream_id"),
        pytest.param(app(1, operation=PUBLISH, message_type=-1), "invalid_stream_id", id="negative_type"),
        pytest.param(app(0), "invalid_message_type", id="application_on_stream_0"),
        pytest.param(app(0, message_type=MessageType.APPLICATION_ERROR), "invalid_message_type",
                     id="error_on_stream_0"),
        pytest.param(encode_rpc(8), "invalid_message_type", id="type_8"),
        pytest.param(encode_rpc(-1), "invalid_message_type", id="type_minus_1"),
        pytest.param(Message((Header.from_int32(":message-type", 2),)).encode(), "missing_rpc_headers",
                     id="missing_metadata"),
    ],
)
def test_invalid_ids_and_types(data: bytes, reason: str) -> None:
    event, sent = violation(connected(), data)
    assert event.reason == reason
    assert_protocol_error(sent)


def test_client_application_error_may_open_a_stream() -> None:
    # the C server allows any type <= APPLICATION_ERROR on a stream
    conn = connected()
    (e,) = conn.receive_data(app(1, operation=PUBLISH, message_type=MessageType.APPLICATION_ERROR))
    assert isinstance(e, StreamOpened)


# --- connection-level messages after the handshake ---------------------------------------------


def test_ping_is_answered_with_its_non_colon_headers_and_payload() -> None:
    conn = connected()
    data = ping(b"hello", [Header.from_string("x-keep", "1"), Header.from_string(":content-type", "t")])
    (event,) = conn.receive_data(data)
    assert isinstance(event, PingReceived)
    (resp,) = frames(conn.data_to_send())
    assert (resp.message_type, resp.flags, resp.stream_id, resp.payload) == (
        MessageType.PING_RESPONSE, 0, 0, b"hello",
    )
    assert [h for h in resp.headers if not h.name.startswith(":")] == [Header.from_string("x-keep", "1")]


def test_ping_response_from_the_client_is_ignored() -> None:
    conn = connected()
    assert conn.receive_data(encode_rpc(MessageType.PING_RESPONSE)) == []
    assert conn.data_to_send() == b""
    assert not conn.closed


def test_connect_ack_from_the_client_gets_an_internal_error() -> None:
    event, sent = violation(connected(), encode_rpc(MessageType.CONNECT_ACK, flags=1))
    assert event.reason == "unexpected_message_type"
    (err,) = sent
    assert err.message_type == MessageType.INTERNAL_ERROR
    assert "message" in json.loads(err.payload)


@pytest.mark.parametrize("mtype", [MessageType.PROTOCOL_ERROR, MessageType.INTERNAL_ERROR])
def test_error_from_the_client_closes_without_reply(mtype: MessageType) -> None:
    event, sent = violation(connected(), encode_rpc(mtype, payload=b'{"message": "you broke it"}'))
    assert event.reason == "peer_error"
    assert "you broke it" in event.detail
    assert sent == []


# --- framing errors and end of stream ------------------------------------------------------------


def test_framing_error_closes_silently_after_the_good_messages() -> None:
    conn = ServerConnection()
    bad = bytearray(ping())
    bad[-1] ^= 0xFF
    events = conn.receive_data(connect_request("t") + bytes(bad))
    assert isinstance(events[0], ConnectRequested)
    assert events[1] == ProtocolViolation("message_crc_mismatch", events[1].detail)  # type: ignore[union-attr]
    assert conn.closed
    assert conn.data_to_send() == b""
    with pytest.raises(InvalidStateError):
        conn.accept()


def test_oversized_frame_is_refused_by_the_configured_limit() -> None:
    conn = ServerConnection(max_message_size=1024)
    events = conn.receive_data(app(1, payload=b"x" * 2000)[:12])
    assert [e.reason for e in events if isinstance(e, ProtocolViolation)] == ["message_too_large"]
    with pytest.raises(ValueError, match="at least 16"):
        ServerConnection(max_message_size=8)


def test_server_cannot_send_above_the_limit() -> None:
    conn = ServerConnection(max_message_size=256)
    conn.receive_data(connect_request("t"))
    conn.accept()
    conn.receive_data(app(1, operation=PUBLISH))
    with pytest.raises(ProtocolError):
        conn.send_response(1, PUBLISH_RESP, {"x": "y" * 300})


def test_eof() -> None:
    conn = connected()
    conn.receive_data(ping()[:7])
    (event,) = conn.receive_eof()
    assert isinstance(event, ProtocolViolation)
    assert event.reason == "truncated"
    conn = connected()
    assert conn.receive_eof() == []
    assert conn.closed
    assert conn.close_reason == "eof"


def test_closed_connection_accepts_and_sends_nothing() -> None:
    conn = connected()
    conn.receive_data(app(1, operation=PUBLISH))
    conn.close()
    assert conn.receive_data(app(1)) == []
    assert conn.receive_eof() == []
    with pytest.raises(StreamClosedError):
        conn.send_response(1, PUBLISH_RESP, {})


def test_send_needs_an_open_stream_and_an_application_type() -> None:
    conn = ServerConnection()
    with pytest.raises(InvalidStateError):
        conn.send(1)
    conn = connected()
    with pytest.raises(StreamClosedError):
        conn.send(1)
    conn.receive_data(app(1, operation=PUBLISH))
    with pytest.raises(InvalidStateError):
        conn.send(1, MessageType.PING)


def test_send_error_ends_the_stream_with_a_modeled_error() -> None:
    conn = connected()
    conn.receive_data(app(1, operation=PUBLISH))
    conn.send_error(1, "aws.greengrass#UnauthorizedError", "denied")
    (err,) = frames(conn.data_to_send())
    assert (err.message_type, err.flags, err.stream_id) == (
        MessageType.APPLICATION_ERROR, MessageFlag.TERMINATE_STREAM, 1,
    )
    assert err.service_model_type == "aws.greengrass#UnauthorizedError"
    assert err.json() == {"message": "denied"}
    assert conn.open_streams == frozenset()


# --- a whole session as awsiotsdk drives it ----------------------------------------------------


def test_session_like_awsiotsdk() -> None:
    conn = ServerConnection()
    wire = bytearray()
    wire += connect_request("svcuid-1")
    wire += operation_request(1, PUBLISH, PUBLISH_REQ, {"topic": "t", "publishMessage": {}})
    # the SDK waits for the ack before activating a stream: deliver the CONNECT alone first
    (req,) = conn.receive_data(bytes(wire[:len(connect_request("svcuid-1"))]))
    assert isinstance(req, ConnectRequested)
    assert req.auth_token == "svcuid-1"
    conn.accept()
    events = conn.receive_data(bytes(wire[len(connect_request("svcuid-1")):]))
    assert [type(e) for e in events] == [StreamOpened]
    conn.send_response(1, PUBLISH_RESP, {}, terminate_stream=True)
    assert conn.receive_data(encode_rpc(0, flags=2, stream_id=1)) == []  # SDK close() after response
    sent = frames(conn.data_to_send())
    assert [(m.message_type, m.flags, m.stream_id) for m in sent] == [(5, 1, 0), (0, 2, 1)]
    assert sent[1].service_model_type == PUBLISH_RESP
    assert conn.state is ConnectionState.CONNECTED


# --- fuzz ----------------------------------------------------------------------------------------

frame_st = st.one_of(
    st.builds(
        lambda t, f, s, op, term: app(s, flags=f | (2 if term else 0), operation=op, message_type=t),
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, -1]),
        st.sampled_from([0, 1, 2, 3, -1]),
        st.one_of(st.integers(-2, 6), st.sampled_from([2**31 - 1, -(2**31)])),
        st.one_of(st.none(), st.just(""), st.just(PUBLISH)),
        st.booleans(),
    ),
    st.builds(connect_request, st.sampled_from(["tok", ""])),
    st.builds(ping, st.binary(max_size=8)),
    st.binary(max_size=40),
)


@FUZZ
@given(st.lists(frame_st, max_size=12), st.lists(st.sampled_from(["accept", "reject", "send", "none"]),
                                                 max_size=12))
def test_random_sessions_only_produce_events(frames_in: list[bytes], decisions: list[str]) -> None:
    conn = ServerConnection()
    seen_violation = False
    last = 0
    for i, data in enumerate(frames_in):  # bounded by the list
        events: list[Event] = conn.receive_data(data)
        for e in events:
            assert not seen_violation, "no events after the connection closed"
            if isinstance(e, ProtocolViolation | ConnectRefused):
                seen_violation = True
        assert conn.last_stream_id >= last
        last = conn.last_stream_id
        assert all(0 < s <= last for s in conn.open_streams)
        decision = decisions[i] if i < len(decisions) else "none"
        if conn.state is ConnectionState.AWAITING_ACK and decision in ("accept", "reject"):
            getattr(conn, decision)()
        elif decision == "send" and conn.open_streams:
            conn.send_response(min(conn.open_streams), PUBLISH_RESP, {}, terminate_stream=True)
        out = conn.data_to_send()
        for m in frames(out):  # everything the server writes is a valid RPC frame
            assert 0 <= m.message_type < 8
        if conn.closed:
            assert conn.receive_data(data) == []
