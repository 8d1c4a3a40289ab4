"""Event-stream codec: published test vectors byte for byte, every error reason, and fuzzing.

Vectors are copied as literal bytes from two public sources (Apache-2.0):

* awslabs/aws-c-event-stream ``tests/message_serializer_test.c`` and
  ``tests/message_deserializer_test.c`` (the C reference implementation), and the negative
  cases that ``bin/event_stream_write_test_case.c`` derives from ``payload_one_str_header``;
* boto/botocore ``tests/unit/test_eventstream.py`` (positive and negative cases).
"""

from __future__ import annotations

import struct
import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc.errors import ProtocolError
from ipc.greengrass.eventstream import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_HEADERS_SIZE,
    EventStreamDecoder,
    EventStreamError,
    Header,
    HeaderType,
    Message,
    decode_headers,
    decode_message,
    encode_header,
    encode_message,
    encode_raw,
)

FUZZ = settings(derandomize=True, deadline=None, max_examples=300)

# --- aws-c-event-stream tests/message_serializer_test.c (also the deserializer test inputs) -----

C_NO_OP = bytes([0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00,
                 0x05, 0xC2, 0x48, 0xEB, 0x7D, 0x98, 0xC8, 0xFF])
C_APPLICATION_DATA_NO_HEADERS = bytes([
    0x00, 0x00, 0x00, 0x1D, 0x00, 0x00, 0x00, 0x00, 0xFD, 0x52, 0x8C, 0x5A, 0x7B,
    0x27, 0x66, 0x6F, 0x6F, 0x27, 0x3A, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7D, 0xC3, 0x65, 0x39,
    0x36,
])
C_ONE_COMPRESSED_HEADER_PAIR = (
    bytes([0x00, 0x00, 0x00, 0x3D, 0x00, 0x00, 0x00, 0x20, 0x07, 0xFD, 0x83, 0x96, 0x0C])
    + b"content-type"
    + bytes([0x07, 0x00, 0x10])
    + b"application/json"
    + bytes([0x7B, 0x27, 0x66, 0x6F, 0x6F, 0x27, 0x3A, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7D])
    + bytes([0x8D, 0x9C, 0x08, 0xB1])
)
C_INT32_HEADER = (
    bytes([0x00, 0x00, 0x00, 0x2B, 0x00, 0x00, 0x00, 0x0E, 0x34, 0x8B, 0xEC, 0x7B, 0x08])
    + b"event-id"
    + bytes([0x04, 0x00, 0x00, 0xA0, 0x0C])
    + bytes([0x7B, 0x27, 0x66, 0x6F, 0x6F, 0x27, 0x3A, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7D])
    + bytes([0xD3, 0x89, 0x02, 0x85])
)
FOO_BAR = b"{'foo':'bar'}"

C_SERIALIZER_CASES = [
    pytest.param(C_NO_OP, (), b"", 0x05C248EB, 0x7D98C8FF, id="no_op"),
    pytest.param(C_APPLICATION_DATA_NO_HEADERS, (), FOO_BAR, 0xFD528C5A, 0xC3653936, id="data_no_headers"),
    pytest.param(
        C_ONE_COMPRESSED_HEADER_PAIR,
        (Header.from_string("content-type", "application/json"),),
        FOO_BAR, 0x07FD8396, 0x8D9C08B1, id="one_string_header",
    ),
    pytest.param(
        C_INT32_HEADER, (Header.from_int32("event-id", 0x0000A00C),), FOO_BAR, 0x348BEC7B, 0xD3890285,
        id="int32_header",
    ),
]

# --- botocore tests/unit/test_eventstream.py ----------------------------------------------------

B_EMPTY_MESSAGE = b"\x00\x00\x00\x10\x00\x00\x00\x00\x05\xc2H\xeb}\x98\xc8\xff"
B_INT8_HEADER = b"\x00\x00\x00\x17\x00\x00\x00\x07)\x86\x01X\x04byte\x02\xff\xc2\xf8i\xdc"
B_INT16_HEADER = b"\x00\x00\x00\x19\x00\x00\x00\tq\x0e\x92>\x05short\x03\xff\xff\xb2|\xb6\xcc"
B_INT32_HEADER = (
    b"\x00\x00\x00\x1d\x00\x00\x00\r\x83\xe3\xf0\xe7\x07integer\x04\xff\xff\xff\xff\x8b\x8e\x12\xeb"
)
B_INT64_HEADER = (
    b"\x00\x00\x00\x1e\x00\x00\x00\x0e]J\xdb\x8d\x04long\x05\xff\xff\xff\xff\xff\xff\xff\xffK\xc22\xda"
)
B_PAYLOAD_NO_HEADERS = b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ{'foo':'bar'}\xc3e96"
B_PAYLOAD_ONE_STR_HEADER = (
    b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96\x0ccontent-type\x07\x00\x10"
    b"application/json{'foo':'bar'}\x8d\x9c\x08\xb1"
)
B_ALL_HEADERS_TYPES = (
    b"\x00\x00\x00\x62\x00\x00\x00\x52\x03\xb5\xcb\x9c"
    b"\x010\x00\x011\x01\x012\x02\x02\x013\x03\x00\x03"
    b"\x014\x04\x00\x00\x00\x04\x015\x05\x00\x00\x00\x00\x00\x00\x00\x05"
    b"\x016\x06\x00\x05bytes\x017\x07\x00\x04utf8"
    b"\x018\x08\x00\x00\x00\x00\x00\x00\x00\x08\x019\x090123456789abcdef"
    b"\x63\x35\x36\x71"
)
B_ERROR_EVENT_MESSAGE = (
    b"\x00\x00\x00\x52\x00\x00\x00\x42\xbf\x23\x63\x7e"
    b"\x0d:message-type\x07\x00\x05error"
    b"\x0b:error-code\x07\x00\x04code"
    b"\x0e:error-message\x07\x00\x07message"
    b"\x6b\x6c\xea\x3d"
)

BOTOCORE_POSITIVE = [
    pytest.param(B_EMPTY_MESSAGE, (), b"", id="empty_message"),
    pytest.param(B_INT8_HEADER, (Header.from_byte("byte", -1),), b"", id="int8_header"),
    pytest.param(B_INT16_HEADER, (Header.from_int16("short", -1),), b"", id="int16_header"),
    pytest.param(B_INT32_HEADER, (Header.from_int32("integer", -1),), b"", id="int32_header"),
    pytest.param(B_INT64_HEADER, (Header.from_int64("long", -1),), b"", id="int64_header"),
    pytest.param(B_PAYLOAD_NO_HEADERS, (), FOO_BAR, id="payload_no_headers"),
    pytest.param(
        B_PAYLOAD_ONE_STR_HEADER, (Header.from_string("content-type", "application/json"),), FOO_BAR,
        id="payload_one_str_header",
    ),
    pytest.param(
        B_ALL_HEADERS_TYPES,
        (
            Header.from_bool("0", True),
            Header.from_bool("1", False),
            Header.from_byte("2", 2),
            Header.from_int16("3", 3),
            Header.from_int32("4", 4),
            Header.from_int64("5", 5),
            Header.from_byte_array("6", b"bytes"),
            Header.from_string("7", "utf8"),
            Header.from_timestamp("8", 8),
            Header.from_uuid("9", uuid.UUID(bytes=b"0123456789abcdef")),
        ),
        b"",
        id="all_headers_types",
    ),
    pytest.param(
        B_ERROR_EVENT_MESSAGE,
        (
            Header.from_string(":message-type", "error"),
            Header.from_string(":error-code", "code"),
            Header.from_string(":error-message", "message"),
        ),
        b"",
        id="error_event_message",
    ),
]
POSITIVE_BYTES = [
    B_EMPTY_MESSAGE, B_INT8_HEADER, B_INT16_HEADER, B_INT32_HEADER, B_INT64_HEADER, B_PAYLOAD_NO_HEADERS,
    B_PAYLOAD_ONE_STR_HEADER, B_ALL_HEADERS_TYPES, B_ERROR_EVENT_MESSAGE,
]

# botocore's negative cases, with the reason our C-ordered checks give. botocore checks lengths
# before the prelude CRC, aws-c-event-stream checks the prelude CRC first (except the maximum
# total length, which its channel handler checks first): we follow the C order.
B_CORRUPTED_HEADER_LENGTH = (
    b"\x00\x00\x00=\xff\x00\x01\x02\x07\xfd\x83\x96\x0ccontent-type\x07\x00"
    b"\x10application/json{'foo':'bar'}\x8d\x9c\x08\xb1"
)
B_CORRUPTED_HEADERS = (
    b"\x00\x00\x00=\x00\x00\x00 \x07\xfd\x83\x96\x0ccontent+type\x07\x00\x10"
    b"application/json{'foo':'bar'}\x8d\x9c\x08\xb1"
)
B_CORRUPTED_LENGTH = b"\x01\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ{'foo':'bar'}\xc3e96"
B_CORRUPTED_PAYLOAD = b"\x00\x00\x00\x1d\x00\x00\x00\x00\xfdR\x8cZ{'foo':'bar'\x8d\xc3e96"
B_DUPLICATE_HEADER = (
    b"\x00\x00\x00\x24\x00\x00\x00\x14\x4b\xb9\x82\xd0"
    b"\x04test\x04asdf\x04test\x04asdf\xf3\xf4\x75\x63"
)

NEGATIVE = [
    pytest.param(B_CORRUPTED_LENGTH, "message_too_large", id="botocore_corrupted_length"),
    pytest.param(B_CORRUPTED_PAYLOAD, "message_crc_mismatch", id="botocore_corrupted_payload"),
    pytest.param(B_CORRUPTED_HEADERS, "message_crc_mismatch", id="botocore_corrupted_headers"),
    pytest.param(B_CORRUPTED_HEADER_LENGTH, "prelude_crc_mismatch", id="botocore_corrupted_header_length"),
]


def reseal(buf: bytes | bytearray) -> bytes:
    """Recompute both CRCs so a deliberately broken message gets past the checksums."""
    b = bytearray(buf)
    b[8:12] = struct.pack(">I", zlib.crc32(bytes(b[0:8])))
    b[-4:] = struct.pack(">I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def raw_message(header_block: bytes, payload: bytes = b"", *, total: int | None = None,
                headers_len: int | None = None) -> bytes:
    """A message with arbitrary (possibly lying) lengths and correct CRCs."""
    t = total if total is not None else 16 + len(header_block) + len(payload)
    h = headers_len if headers_len is not None else len(header_block)
    return reseal(struct.pack(">III", t, h, 0) + header_block + payload + b"\0\0\0\0")


def decode_reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(EventStreamError) as info:
        dec = EventStreamDecoder(**kwargs)
        dec.feed(data)
        dec.eof()
    return info.value.reason


# --- published vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("wire", "headers", "payload", "prelude_crc", "message_crc"), C_SERIALIZER_CASES)
def test_c_vectors_encode_and_decode_byte_for_byte(
    wire: bytes, headers: tuple[Header, ...], payload: bytes, prelude_crc: int, message_crc: int
) -> None:
    assert encode_message(headers, payload) == wire
    assert struct.unpack(">I", wire[8:12])[0] == prelude_crc
    assert struct.unpack(">I", wire[-4:])[0] == message_crc
    assert decode_message(wire) == Message(headers, payload)


@pytest.mark.parametrize(("wire", "headers", "payload"), BOTOCORE_POSITIVE)
def test_botocore_positive_vectors(wire: bytes, headers: tuple[Header, ...], payload: bytes) -> None:
    assert decode_message(wire) == Message(headers, payload)
    assert encode_message(headers, payload) == wire


def test_all_positive_vectors_in_one_buffer_and_byte_by_byte() -> None:
    stream = b"".join(POSITIVE_BYTES)
    expected = [decode_message(w) for w in POSITIVE_BYTES]
    assert EventStreamDecoder().feed(stream) == expected
    dec = EventStreamDecoder()
    got: list[Message] = []
    for i in range(len(stream)):
        got.extend(dec.feed(stream[i:i + 1]))
    assert got == expected
    assert dec.buffered == 0


def test_partial_message_waits_for_the_rest() -> None:
    dec = EventStreamDecoder()
    assert dec.feed(B_EMPTY_MESSAGE[:15]) == []
    assert dec.buffered == 15
    assert dec.feed(B_EMPTY_MESSAGE[15:]) == [Message()]
    assert dec.buffered == 0


@pytest.mark.parametrize(("wire", "reason"), NEGATIVE)
def test_botocore_negative_vectors(wire: bytes, reason: str) -> None:
    assert decode_reason(wire) == reason


def test_duplicate_headers_are_kept_as_the_c_library_does() -> None:
    # botocore raises DuplicateHeader here; aws-c-event-stream keeps both (an array list), and so do
    # we. The RPC layer decides which one counts (see parse_rpc).
    m = decode_message(B_DUPLICATE_HEADER)
    assert [h.name for h in m.headers] == ["test", "test"]
    assert m.headers[0] == Header.from_int32("test", struct.unpack(">i", b"asdf")[0])
    assert m.encode() == B_DUPLICATE_HEADER


def _c_write_test_case_negatives() -> list[tuple[str, bytes, str]]:
    # bin/event_stream_write_test_case.c derives these from payload_one_str_header; the C tool
    # records "Prelude checksum mismatch" / "Message checksum mismatch" as the expected errors.
    original = B_PAYLOAD_ONE_STR_HEADER
    total, headers_len = struct.unpack(">II", original[:8])
    corrupted_length = struct.pack(">I", total + 1) + original[4:]
    corrupted_header_len = original[:4] + struct.pack(">I", headers_len + 1) + original[8:]
    corrupted_headers = bytearray(original)
    corrupted_headers[headers_len + 12 + 1] = ord("a")
    payload_only = bytearray(B_PAYLOAD_NO_HEADERS)
    payload_only[12] = ord("[")
    return [
        ("corrupted_length", corrupted_length, "prelude_crc_mismatch"),
        ("corrupted_header_len", corrupted_header_len, "prelude_crc_mismatch"),
        ("corrupted_headers", bytes(corrupted_headers), "message_crc_mismatch"),
        ("corrupted_payload", bytes(payload_only), "message_crc_mismatch"),
    ]


@pytest.mark.parametrize(("name", "wire", "reason"), _c_write_test_case_negatives())
def test_c_write_test_case_negatives(name: str, wire: bytes, reason: str) -> None:
    assert decode_reason(wire) == reason, name


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc_is_zlib_crc32_not_crc32c() -> None:
    assert _crc32c(b"123456789") == 0xE3069283  # the published CRC32C check value
    assert zlib.crc32(C_NO_OP[:8]) == 0x05C248EB == struct.unpack(">I", C_NO_OP[8:12])[0]
    assert _crc32c(C_NO_OP[:8]) != 0x05C248EB
    assert struct.unpack(">I", C_NO_OP[-4:])[0] == zlib.crc32(C_NO_OP[:-4])


# --- every decode error --------------------------------------------------------------------------


def test_oversized_total_is_refused_from_the_prelude_alone() -> None:
    prelude = struct.pack(">II", DEFAULT_MAX_MESSAGE_SIZE + 1, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    dec = EventStreamDecoder()
    with pytest.raises(EventStreamError) as info:
        dec.feed(prelude)
    assert info.value.reason == "message_too_large"
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == "PROTOCOL_ERROR"
    assert info.value.details["reason"] == "message_too_large"


def test_max_message_size_is_configurable_and_inclusive() -> None:
    m = encode_message(payload=b"x" * 100)
    assert EventStreamDecoder(max_message_size=116).feed(m) == [Message((), b"x" * 100)]
    assert decode_reason(m, max_message_size=115) == "message_too_large"
    with pytest.raises(ValueError, match="at least 16"):
        EventStreamDecoder(max_message_size=15)


def test_default_limit_is_sixteen_mebibytes() -> None:
    assert DEFAULT_MAX_MESSAGE_SIZE == 16 * 1024 * 1024
    big = encode_message(payload=b"\0" * (DEFAULT_MAX_MESSAGE_SIZE - 16))
    assert len(decode_message(big).payload) == DEFAULT_MAX_MESSAGE_SIZE - 16
    with pytest.raises(EventStreamError) as info:
        encode_message(payload=b"\0" * (DEFAULT_MAX_MESSAGE_SIZE - 15))
    assert info.value.reason == "message_too_large"


def test_total_below_sixteen_is_refused() -> None:
    prelude = struct.pack(">II", 15, 0)
    assert decode_reason(prelude + struct.pack(">I", zlib.crc32(prelude)) + b"\0" * 4) == "message_too_small"


def test_headers_length_beyond_the_message() -> None:
    assert decode_reason(raw_message(b"\x01a\x00", headers_len=4)) == "headers_length_overflow"


def test_headers_length_above_128k_is_refused_from_the_prelude_alone() -> None:
    prelude = struct.pack(">II", MAX_HEADERS_SIZE + 1000, MAX_HEADERS_SIZE + 1)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    assert decode_reason(prelude) == "headers_too_large"


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        pytest.param(b"\x01a\x0a", "unknown_header_type", id="type_10"),
        pytest.param(b"\x01a\xff", "unknown_header_type", id="type_255"),
        pytest.param(b"\x05ab", "header_overflow", id="name_runs_out"),
        pytest.param(b"\x01a", "header_overflow", id="type_byte_missing"),
        pytest.param(b"\x01a\x04\x00\x00", "header_overflow", id="int32_short"),
        pytest.param(b"\x01a\x05" + b"\0" * 7, "header_overflow", id="int64_short"),
        pytest.param(b"\x01a\x07\x00", "header_overflow", id="string_length_short"),
        pytest.param(b"\x01a\x07\x00\x05abc", "header_overflow", id="string_value_short"),
        pytest.param(b"\x01a\x09" + b"\0" * 15, "header_overflow", id="uuid_short"),
        pytest.param(b"\x80" + b"n" * 128 + b"\x00", "header_name_too_long", id="name_128"),
        pytest.param(b"\x01a\x06\x80\x00" + b"\0" * 0x8000, "header_value_too_long", id="bytes_32768"),
        pytest.param(b"\x02\xff\xfe\x00", "header_not_utf8", id="name_not_utf8"),
        pytest.param(b"\x01a\x07\x00\x01\xff", "header_not_utf8", id="string_not_utf8"),
    ],
)
def test_header_errors(block: bytes, reason: str) -> None:
    assert decode_reason(raw_message(block)) == reason


def test_header_limits_accept_their_maximum() -> None:
    name = "n" * 127
    value = "v" * 32767
    m = decode_message(encode_message([Header.from_string(name, value)]))
    assert m.headers == (Header.from_string(name, value),)


def test_truncated_stream_at_eof() -> None:
    dec = EventStreamDecoder()
    assert dec.feed(B_PAYLOAD_ONE_STR_HEADER[:-1]) == []
    with pytest.raises(EventStreamError) as info:
        dec.eof()
    assert info.value.reason == "truncated"
    assert info.value.offset == 0
    with pytest.raises(EventStreamError) as info:
        decode_message(B_PAYLOAD_ONE_STR_HEADER[:5])
    assert info.value.reason == "truncated"
    with pytest.raises(EventStreamError) as info:
        decode_message(b"")
    assert info.value.reason == "truncated"


def test_clean_eof_between_messages_is_fine() -> None:
    dec = EventStreamDecoder()
    dec.feed(B_EMPTY_MESSAGE)
    dec.eof()


def test_decode_message_refuses_trailing_data() -> None:
    with pytest.raises(EventStreamError) as info:
        decode_message(B_EMPTY_MESSAGE + b"\0")
    assert info.value.reason == "trailing_data"
    assert info.value.offset == 16


def test_error_keeps_preceding_messages_and_offset_and_poisons_the_decoder() -> None:
    dec = EventStreamDecoder()
    assert dec.feed(B_EMPTY_MESSAGE[:3]) == []
    with pytest.raises(EventStreamError) as info:
        dec.feed(B_EMPTY_MESSAGE[3:] + B_PAYLOAD_NO_HEADERS + B_CORRUPTED_PAYLOAD)
    err = info.value
    assert err.reason == "message_crc_mismatch"
    assert err.offset == len(B_EMPTY_MESSAGE) + len(B_PAYLOAD_NO_HEADERS)
    assert err.messages == [Message(), Message((), FOO_BAR)]
    assert dec.failed
    with pytest.raises(EventStreamError) as again:
        dec.feed(B_EMPTY_MESSAGE)
    assert again.value.reason == "decoder_failed"


def test_offsets_count_across_feeds() -> None:
    dec = EventStreamDecoder()
    dec.feed(B_EMPTY_MESSAGE * 3)
    with pytest.raises(EventStreamError) as info:
        dec.feed(B_CORRUPTED_LENGTH)
    assert info.value.offset == 48


def test_feed_accepts_bytearray_and_memoryview() -> None:
    dec = EventStreamDecoder()
    assert dec.feed(bytearray(B_INT8_HEADER[:10])) == []
    assert dec.feed(memoryview(B_INT8_HEADER[10:] + B_EMPTY_MESSAGE)) == [
        Message((Header.from_byte("byte", -1),)),
        Message(),
    ]


# --- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param(Header("b", False, HeaderType.BOOL_TRUE), "invalid_header", id="bool_type_mismatch"),
        pytest.param(Header("b", 1, HeaderType.BOOL_TRUE), "invalid_header", id="bool_not_bool"),
        pytest.param(Header.from_byte("b", 128), "invalid_header", id="byte_range"),
        pytest.param(Header.from_byte("b", -129), "invalid_header", id="byte_range_low"),
        pytest.param(Header.from_int16("i", 1 << 15), "invalid_header", id="int16_range"),
        pytest.param(Header.from_int32("i", 1 << 31), "invalid_header", id="int32_range"),
        pytest.param(Header.from_int64("i", 1 << 63), "invalid_header", id="int64_range"),
        pytest.param(Header("i", True, HeaderType.INT32), "invalid_header", id="int_not_bool"),
        pytest.param(Header("s", b"x", HeaderType.STRING), "invalid_header", id="string_needs_str"),
        pytest.param(Header("s", "x", HeaderType.BYTE_ARRAY), "invalid_header", id="bytes_needs_bytes"),
        pytest.param(Header("u", "x", HeaderType.UUID), "invalid_header", id="uuid_needs_uuid"),
        pytest.param(Header.from_string("n" * 128, "x"), "header_name_too_long", id="name_128"),
        pytest.param(Header.from_string("é" * 64, "x"), "header_name_too_long", id="name_utf8_bytes"),
        pytest.param(Header.from_string("s", "x" * 32768), "header_value_too_long", id="string_32768"),
        pytest.param(Header.from_byte_array("s", b"x" * 32768), "header_value_too_long", id="bytes_32768"),
    ],
)
def test_encoding_refuses_what_the_c_reader_would_refuse(header: Header, reason: str) -> None:
    with pytest.raises(EventStreamError) as info:
        encode_header(header)
    assert info.value.reason == reason


def test_encoding_refuses_oversized_headers_section() -> None:
    with pytest.raises(EventStreamError) as info:
        encode_raw(b"\0" * (MAX_HEADERS_SIZE + 1))
    assert info.value.reason == "headers_too_large"


def test_message_get_is_case_insensitive_and_first_match() -> None:
    m = Message((Header.from_string("Content-Type", "a"), Header.from_string("content-type", "b")))
    assert m.get("CONTENT-TYPE") == Header.from_string("Content-Type", "a")
    assert m.get("missing") is None


def test_decode_headers_directly() -> None:
    expected = (Header.from_bool("a", True), Header.from_byte("b", 127))
    assert decode_headers(b"\x01a\x00\x01b\x02\x7f") == expected


# --- properties --------------------------------------------------------------------------------

names = st.text(min_size=0, max_size=20).filter(lambda s: len(s.encode()) <= 127)
headers_st = st.one_of(
    st.builds(Header.from_bool, names, st.booleans()),
    st.builds(Header.from_byte, names, st.integers(-128, 127)),
    st.builds(Header.from_int16, names, st.integers(-(2**15), 2**15 - 1)),
    st.builds(Header.from_int32, names, st.integers(-(2**31), 2**31 - 1)),
    st.builds(Header.from_int64, names, st.integers(-(2**63), 2**63 - 1)),
    st.builds(Header.from_timestamp, names, st.integers(-(2**63), 2**63 - 1)),
    st.builds(Header.from_byte_array, names, st.binary(max_size=64)),
    st.builds(Header.from_string, names, st.text(max_size=64)),
    st.builds(Header.from_uuid, names, st.uuids()),
)
messages_st = st.builds(Message, st.lists(headers_st, max_size=8).map(tuple), st.binary(max_size=256))


@FUZZ
@given(st.lists(messages_st, min_size=1, max_size=5), st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_roundtrip_under_any_split(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(m.encode() for m in msgs)
    dec = EventStreamDecoder()
    got: list[Message] = []
    pos = 0
    i = 0
    while pos < len(stream):  # bounded: every step consumes at least one byte
        step = cuts[i % len(cuts)]
        got.extend(dec.feed(stream[pos:pos + step]))
        pos += step
        i += 1
    dec.eof()
    assert got == msgs
    assert [m.encode() for m in got] == [m.encode() for m in msgs]


def _feed_only_eventstream_errors(data: bytes, chunk: int) -> list[Message]:
    dec = EventStreamDecoder(max_message_size=4096)
    got: list[Message] = []
    try:
        for i in range(0, len(data), chunk):  # bounded by len(data)
            got.extend(dec.feed(data[i:i + chunk]))
        dec.eof()
    except EventStreamError as exc:
        assert exc.reason
        got.extend(exc.messages)
    # every decoded message accounts for at least 16 input bytes: no invented output
    assert len(got) * 16 <= len(data)
    return got


@FUZZ
@given(st.binary(max_size=2048), st.integers(1, 512))
def test_random_bytes_raise_only_eventstream_errors(data: bytes, chunk: int) -> None:
    _feed_only_eventstream_errors(data, chunk)


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 10_000),
              st.integers(0, 255)),
    min_size=1, max_size=6,
)


def _mutate(buf: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(buf)
    for op, where, value in ops:
        if not b:
            break
        i = where % len(b)
        if op == "flip":
            b[i] ^= 1 << (value % 8)
        elif op == "set":
            b[i] = value
        elif op == "insert":
            b.insert(i, value)
        elif op == "delete":
            del b[i]
        else:
            del b[i:]
    return bytes(b)


@FUZZ
@given(st.lists(messages_st, min_size=1, max_size=3), mutations, st.booleans(), st.integers(1, 300))
def test_mutated_valid_messages_raise_only_eventstream_errors(
    msgs: list[Message], ops: list[tuple[str, int, int]], resealed: bool, chunk: int
) -> None:
    stream = b"".join(m.encode() for m in msgs)
    mutated = _mutate(stream, ops)
    if resealed and len(mutated) >= 16:
        # make it one message with valid CRCs so the mutation reaches the header checks
        b = bytearray(mutated)
        b[0:4] = struct.pack(">I", len(b))
        mutated = reseal(b)
    _feed_only_eventstream_errors(mutated, chunk)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 700), st.integers(0, 700))
def test_resealed_garbage_headers_raise_only_eventstream_errors(
    block: bytes, claimed: int, extra: int
) -> None:
    """Valid CRCs around arbitrary header bytes and lengths: the header parser's worst case."""
    hl = min(claimed, len(block) + extra)
    msg = raw_message(block + b"\0" * extra, headers_len=hl)
    try:
        got = EventStreamDecoder().feed(msg)
    except EventStreamError as exc:
        assert exc.reason
    else:
        assert len(got) == 1
        assert got[0].encode() == msg  # whatever parses re-encodes to the same bytes
