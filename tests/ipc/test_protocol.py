"""Frame codec: round trips, arbitrary splits, malformed and oversized input, and a fuzz."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipc import protocol as P
from ipc.errors import FrameTooLarge, ProtocolError

SAMPLES: list[bytes] = [
    P.hello("tok", "me"),
    P.hello("tok", None),
    P.welcome("alice", {"max_frame": 10}),
    P.request(1, "config.get", {"key_path": ["a", "b"]}),
    P.response(1, {"x": [1, 2.5, None, True, b"\x00"]}),
    P.error(None, "UNAUTHENTICATED", "no", {}),
    P.error(7, "UNAUTHORIZED", "denied", {"resource": "a/b"}),
    P.stream_item(3, ["a", "b"]),
    P.stream_end(3),
    P.stream_end(3, ("TIMEOUT", "late", {})),
    P.cancel(3),
    P.publish(0, "a/b", b"\xc4\x01x"),
    P.publish(9, "a/b", b"y" * 70000),
    P.message(5, 0, P.message_tail(None, "alice", "a/b", b"\x01")),
    P.message(5, 1234, P.message_tail("r.x", None, "t", b"z" * 300)),
]


def decode_all(data: bytes, chunk: int) -> list[P.Frame]:
    dec = P.FrameDecoder()
    out: list[P.Frame] = []
    for i in range(0, len(data), chunk):
        out.extend(dec.feed(data[i:i + chunk]))
    assert dec.buffered == 0
    return out


def test_every_frame_type_round_trips_whole() -> None:
    frames = decode_all(b"".join(SAMPLES), 1 << 30)
    assert [f[0] for f in frames] == [1, 1, 2, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10, 10]
    assert frames[0] == [1, P.PROTOCOL_VERSION, "tok", "me"]
    assert frames[3] == [3, 1, "config.get", {"key_path": ["a", "b"]}]
    assert frames[9] == [7, 3, ["TIMEOUT", "late", {}]]
    assert frames[11] == [9, 0, "a/b", b"\xc4\x01x"]
    assert frames[12] == [9, 9, "a/b", b"y" * 70000]


def test_spliced_message_equals_plain_msgpack() -> None:
    tail = P.message_tail("r.1", "alice", "a/b", b"\x93\x01\x02\x03")
    for dropped in (0, 1, 127, 128, 70000):
        body = P.message(42, dropped, tail)[4:]
        assert msgpack.unpackb(body) == [10, 42, dropped, "r.1", "alice", "a/b", b"\x93\x01\x02\x03"]
        assert body == msgpack.packb([10, 42, dropped, "r.1", "alice", "a/b", b"\x93\x01\x02\x03"])


def test_publish_parts_equal_plain_msgpack() -> None:
    for size in (0, 255, 256, 65535, 65536):
        data = b"d" * size
        head, body = P.publish_parts(3, "t/x", data)
        assert (head + body)[4:] == msgpack.packb([9, 3, "t/x", data])


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 4096])
def test_any_split_yields_the_same_frames(chunk: int) -> None:
    data = b"".join(SAMPLES)
    assert decode_all(data, chunk) == decode_all(data, len(data))


def test_partial_frame_waits_for_the_rest() -> None:
    dec = P.FrameDecoder()
    frame = P.request(1, "x", {})
    assert dec.feed(frame[:3]) == []
    assert dec.feed(frame[3:-1]) == []
    assert dec.buffered == len(frame) - 1
    assert dec.feed(frame[-1:] + frame) == [[3, 1, "x", {}], [3, 1, "x", {}]]


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("body", [
    b"\xc1",                                  # never-used msgpack byte
    msgpack.packb({"not": "a list"}),
    msgpack.packb([]),
    msgpack.packb([99, 1]),                   # unknown type
    msgpack.packb([1, 1, "t"]),               # HELLO with wrong arity
    msgpack.packb(["1", 1, "t", None]),       # type not an int
    msgpack.packb([True, 1, "t", None]),      # bool is not a frame type
    msgpack.packb([[1], 1, "t", None]),       # unhashable type field
    msgpack.packb([3, 1, "x", {}]) + b"\x00",  # trailing bytes inside the frame
    b"\x92\xa2\xff\xfe",                      # invalid UTF-8 string
    msgpack.packb([3, 1]) [:-1],              # truncated array inside a complete frame
])
def test_malformed_bodies_raise_protocol_error(body: bytes) -> None:
    dec = P.FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(frame_of(body))
    with pytest.raises(ProtocolError):  # the stream is dead after an error
        dec.feed(P.cancel(1))


@pytest.mark.parametrize(("body", "says", "details"), [
    (b"\xc1", "is not valid msgpack: an invalid type byte", {}),
    (msgpack.packb({"not": "a list"}), "must be a msgpack array [type, fields...], not dict", {}),
    (msgpack.packb([]), "must be an integer, not an empty array", {}),
    (msgpack.packb(["HELLO", 1, "t", None]), "must be an integer, not str", {}),
    (msgpack.packb([99, 1]), "unknown frame type 99", {"frame_type": 99}),
    (msgpack.packb([3, 1, "x"]), "REQUEST frame (type 3) has 2 field(s), needs 3",
     {"frame_type": 3, "fields": 2, "expected": 3}),
    (msgpack.packb([8, 1]) + b"\x00", "does not end at its length prefix", {}),
])
def test_malformed_bodies_say_which_rule_they_broke(body: bytes, says: str, details: dict[str, int]) -> None:
    """A client author reading the ERROR learns what to fix (it said only 'not [type, *fields] with a
    known type and arity', a repr as frame_type, or 'FormatError: ' with nothing after it)."""
    with pytest.raises(ProtocolError) as info:
        P.FrameDecoder().feed(frame_of(body))
    assert says in info.value.message
    assert info.value.details == details


def test_empty_frame_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        P.FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    dec = P.FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(struct.pack(">I", 1025))  # refused before a single body byte is buffered
    assert info.value.code == "FRAME_TOO_LARGE"
    assert info.value.details == {"size": 1025, "limit": 1024}
    ok = P.FrameDecoder(max_frame=1024)
    assert ok.feed(frame_of(msgpack.packb([9, 0, "t", b"x" * 1000])))[0][0] == 9


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256), st.integers(min_value=1, max_value=300))
def test_fuzz_decoder_raises_only_protocol_errors(data: bytes, chunk: int) -> None:
    dec = P.FrameDecoder(max_frame=4096)
    try:
        for i in range(0, len(data), chunk):
            for f in dec.feed(data[i:i + chunk]):
                assert type(f) is list and P.ARITY[f[0]] == len(f)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
                    | st.binary(max_size=20) | st.floats(allow_nan=False),
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=5), c, max_size=5),
                    max_leaves=20),
       st.integers(min_value=1, max_value=50))
def test_fuzz_valid_framed_msgpack_never_breaks_the_decoder(value: object, chunk: int) -> None:
    """Well-framed but arbitrary msgpack bodies: a frame or a ProtocolError, nothing else."""
    body = msgpack.packb(value)
    data = frame_of(body) * 2
    dec = P.FrameDecoder()
    try:
        got = [f for i in range(0, len(data), chunk) for f in dec.feed(data[i:i + chunk])]
    except ProtocolError:
        return
    assert len(got) == 2 and got[0] == got[1]


def test_spliced_messages_batch_equals_plain_msgpack() -> None:
    tails = [P.message_tail(None, "alice", "a/b", b"\x01"), P.message_tail("r.1", None, "c", b"z" * 300)]
    items: list[object] = [None, "alice", "a/b", b"\x01", "r.1", None, "c", b"z" * 300]
    for count in (1, 2, 3, 4, 5, 17, 4000, 17000):  # fixarray, array 16 and array 32 item counts
        body = P.messages(9, 70000, (tails * count)[:count])[4:]
        plain = [12, 9, 70000, (items * count)[:4 * count]]
        assert body == msgpack.packb(plain)
        assert P.FrameDecoder().feed(P.messages(9, 70000, (tails * count)[:count])) == [plain]


def test_publish_many_equals_plain_msgpack() -> None:
    for sizes in ([0], [1, 255, 256], [65535, 65536, 3] * 6):
        data = [b"d" * s for s in sizes]
        frame = P.publish_many("t/x", data)
        assert frame[4:] == msgpack.packb([13, "t/x", data])
        assert P.FrameDecoder().feed(frame) == [[13, "t/x", data]]


def test_batch_frames_survive_any_split() -> None:
    data = P.messages(1, 0, [P.message_tail(None, "a", "t", b"x" * n) for n in (1, 300, 70000)]) \
        + P.publish_many("t", [b"y" * n for n in (0, 70000)]) + P.cancel(1)
    whole = decode_all(data, len(data))
    assert [f[0] for f in whole] == [P.MESSAGES, P.PUBLISH_MANY, P.CANCEL]
    for chunk in (1, 3, 1000):
        assert decode_all(data, chunk) == whole
