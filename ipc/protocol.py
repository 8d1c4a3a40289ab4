"""The native wire protocol, version 1: pure frame encoding and a streaming decoder.

A frame is a 4-byte big-endian body length followed by a msgpack array ``[type, *fields]``
(docs/ipc-protocol.md lists the fields of every type). Nothing here does I/O, so the same code
serves the server, the SDK and the fuzz tests.

Speed notes. Frames are lists, not objects, because the hot paths (PUBLISH in, MESSAGE out) run a
few hundred thousand times a second. A MESSAGE is built from a per-message *tail* (reply_to,
sender, topic, data) packed once per publish and a per-subscriber *head* spliced in front — msgpack
arrays are just a count followed by the elements, so concatenation is a valid encoding.

Batches (additive to version 1, each side opts in, see docs/ipc-protocol.md): MESSAGES carries
several deliveries of one subscription in one frame and PUBLISH_MANY several publishes to one
topic, so the per-frame costs (prefix, dispatch, a Python call per frame on both sides) are paid
once per batch. MESSAGES is the same spliced tails laid end to end in a flat array, so the server
builds it without re-encoding anything.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import msgpack

from ipc.errors import FrameTooLarge, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")


class FrameType(IntEnum):
    HELLO = 1        # [1, version, token, client_name|nil]
    WELCOME = 2      # [2, version, principal_name, limits{}]
    REQUEST = 3      # [3, id, op, args{}]
    RESPONSE = 4     # [4, id, result]
    ERROR = 5        # [5, id|nil, code, message, details{}]
    STREAM_ITEM = 6  # [6, id, item]
    STREAM_END = 7   # [7, id, nil | [code, message, details{}]]
    CANCEL = 8       # [8, id]
    PUBLISH = 9      # [9, id (0 = unconfirmed), topic, data(bin)]
    MESSAGE = 10     # [10, sub_id, dropped, reply_to|nil, sender|nil, topic, data(bin)]
    CREDIT = 11      # [11, sub_id, n]: the client may take n more MESSAGEs on that subscription
    MESSAGES = 12    # [12, sub_id, dropped, [reply_to, sender, topic, data, reply_to, ...]]
    PUBLISH_MANY = 13  # [13, topic, [data, data, ...]]: unconfirmed publishes to one topic


HELLO, WELCOME, REQUEST, RESPONSE, ERROR = 1, 2, 3, 4, 5
STREAM_ITEM, STREAM_END, CANCEL, PUBLISH, MESSAGE, CREDIT = 6, 7, 8, 9, 10, 11
MESSAGES, PUBLISH_MANY = 12, 13

ARITY: dict[int, int] = {1: 4, 2: 4, 3: 4, 4: 3, 5: 5, 6: 3, 7: 3, 8: 2, 9: 4, 10: 7, 11: 3, 12: 4, 13: 3}

FEATURE_BATCH = "batch"
"""WELCOME ``limits["features"]`` entry: the server accepts PUBLISH_MANY and sends MESSAGES to
subscriptions opened with ``"batch": true``. Peers without it keep speaking plain version 1."""
FEATURES: tuple[str, ...] = (FEATURE_BATCH,)
MESSAGES_FIELDS = 4
"""Each delivery in a MESSAGES frame is ``reply_to, sender, topic, data`` (flat, no inner array)."""

Frame = list[Any]
"""A decoded frame: ``[type, *fields]`` with the type's arity already checked."""

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_pack_hdr = HEADER.pack
_unpack_hdr_from = HEADER.unpack_from


def encode_value(value: Any) -> bytes:
    """One msgpack value (for callers that splice frames from cached pieces)."""
    return _pack(value)


def encode_frame(body: list[Any]) -> bytes:
    b = _pack(body)
    return _pack_hdr(len(b)) + b


def hello(token: str, name: str | None, version: int = PROTOCOL_VERSION) -> bytes:
    return encode_frame([HELLO, version, token, name])


def welcome(principal: str, limits: dict[str, Any], version: int = PROTOCOL_VERSION) -> bytes:
    return encode_frame([WELCOME, version, principal, limits])


def request(req_id: int, op: str, args: dict[str, Any]) -> bytes:
    return encode_frame([REQUEST, req_id, op, args])


def response(req_id: int, result: Any) -> bytes:
    return encode_frame([RESPONSE, req_id, result])


def error(req_id: int | None, code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return encode_frame([ERROR, req_id, code, message, details or {}])


def stream_item(stream_id: int, item: Any) -> bytes:
    return encode_frame([STREAM_ITEM, stream_id, item])


def stream_end(stream_id: int, err: tuple[str, str, dict[str, Any]] | None = None) -> bytes:
    return encode_frame([STREAM_END, stream_id, list(err) if err else None])


def cancel(stream_id: int) -> bytes:
    return encode_frame([CANCEL, stream_id])


def credit(sub_id: int, n: int) -> bytes:
    return encode_frame([CREDIT, sub_id, n])


def bin_header(n: int) -> bytes:
    """The msgpack bin 8/16/32 header for ``n`` bytes (the bytes themselves follow)."""
    if n < 256:
        return b"\xc4" + bytes((n,))
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def publish_parts(req_id: int, topic: str, data: bytes) -> tuple[bytes, bytes]:
    """PUBLISH as (length prefix + head, data) so a large payload is not copied to build the frame."""
    head = b"\x94\x09" + _pack(req_id) + _pack(topic) + bin_header(len(data))
    return _pack_hdr(len(head) + len(data)) + head, data


def publish(req_id: int, topic: str, data: bytes) -> bytes:
    a, b = publish_parts(req_id, topic, data)
    return a + b


def message_tail_prefix(reply_to: str | None, sender: str | None, topic: str) -> bytes:
    """The subscriber-independent fields before the data; the server caches it per (sender, topic)."""
    return _pack(reply_to) + _pack(sender) + _pack(topic)


def message_tail(reply_to: str | None, sender: str | None, topic: str, data: bytes) -> bytes:
    """The subscriber-independent part of a MESSAGE, packed once per publish."""
    return message_tail_prefix(reply_to, sender, topic) + bin_header(len(data)) + data


def message_head(sub_id: int) -> bytes:
    """``[10, sub_id`` — cached per subscription; the dropped count follows."""
    return b"\x97\x0a" + _pack(sub_id)


def message(sub_id: int, dropped: int, tail: bytes, head: bytes | None = None) -> bytes:
    h = (head or message_head(sub_id)) + (_pack(dropped) if dropped else b"\x00")
    return _pack_hdr(len(h) + len(tail)) + h + tail


def array_header(n: int) -> bytes:
    """The msgpack array header for ``n`` elements (fixarray, array 16 or array 32)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def messages_head(sub_id: int, dropped: int, count: int, size: int) -> bytes:
    """Length prefix and ``[12, sub_id, dropped, [`` for ``count`` deliveries whose tails total ``size``.

    The tails (``message_tail`` of each delivery) follow as they are: a MESSAGES frame is the
    head and then the spliced tails, nothing is re-encoded.
    """
    h = b"\x94\x0c" + _pack(sub_id) + _pack(dropped) + array_header(MESSAGES_FIELDS * count)
    return _pack_hdr(len(h) + size) + h


def messages(sub_id: int, dropped: int, tails: list[bytes]) -> bytes:
    """A whole MESSAGES frame; ``dropped`` is the gap before the first delivery (the rest have none)."""
    body = b"".join(tails)
    return messages_head(sub_id, dropped, len(tails), len(body)) + body


def publish_many_head(topic: str, count: int, size: int) -> bytes:
    """Length prefix and ``[13, topic, [`` for ``count`` data items (each a msgpack bin) of ``size`` bytes."""
    h = b"\x93\x0d" + _pack(topic) + array_header(count)
    return _pack_hdr(len(h) + size) + h


def publish_many(topic: str, data: list[bytes]) -> bytes:
    body = b"".join(bin_header(len(d)) + d for d in data)
    return publish_many_head(topic, len(data), len(body)) + body


def _bad_frame(body: Any, misaligned: bool) -> ProtocolError:
    """Say which rule the body broke, so that the author of a client in another language can tell."""
    if misaligned:
        return ProtocolError("frame body does not end at its length prefix (one msgpack value per frame)")
    if type(body) is not list:
        return ProtocolError(f"frame body must be a msgpack array [type, fields...], not {type(body).__name__}")
    if not body or type(body[0]) is not int:
        got = type(body[0]).__name__ if body else "an empty array"
        return ProtocolError(f"frame type (the body's first element) must be an integer, not {got}")
    t = body[0]
    if t not in ARITY:
        return ProtocolError(f"unknown frame type {t}", {"frame_type": t})
    name = FrameType(t).name
    return ProtocolError(f"{name} frame (type {t}) has {len(body) - 1} field(s), needs {ARITY[t] - 1}",
                         {"frame_type": t, "fields": len(body) - 1, "expected": ARITY[t] - 1})


class FrameDecoder:
    """Turns a byte stream into frames; tolerant of any split, strict about content.

    Raises only :class:`ProtocolError` (or its subclass :class:`FrameTooLarge`); after an error the
    stream is unusable and the connection must be closed — there is no resynchronisation.

    Speed: a first pass over the length prefixes finds the complete frames (and refuses oversized
    ones from the header alone); those bytes then go through one streaming msgpack Unpacker that
    skips each prefix and unpacks each body, checking that it ends exactly where its prefix said.
    That avoids per-frame slicing and keyword parsing, roughly halving the cost per small frame.
    """

    __slots__ = ("_buf", "_failed", "_unpacker", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failed = False
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True, max_buffer_size=0)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed:
            raise ProtocolError("decoder already failed; the connection must be closed")
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        n = len(view)
        # pass 1: frame boundaries
        ends: list[int] = []
        off = 0
        unpack_from = _unpack_hdr_from
        max_frame = self.max_frame
        while n - off >= 4:
            size = unpack_from(view, off)[0]
            if size > max_frame:
                self._fail()
                raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_frame}",
                                    {"size": size, "limit": max_frame})
            if size == 0:
                self._fail()
                raise ProtocolError("empty frame")
            end = off + 4 + size
            if end > n:
                break
            ends.append(end)
            off = end
        if not ends:
            if not buf:
                buf += view
            return []
        # pass 2: bodies
        up = self._unpacker
        if off == n:
            up.feed(view)
            rest: bytes | bytearray = b""
        else:
            with memoryview(view) as mv:
                up.feed(mv[:off])
            rest = view[off:]
        frames: list[Frame] = []
        arity = ARITY
        read_bytes = up.read_bytes
        unpack = up.unpack
        tell = up.tell
        base = tell()
        try:
            for end in ends:
                read_bytes(4)
                body = unpack()
                if tell() - base != end or type(body) is not list or not body \
                        or type(body[0]) is not int or arity.get(body[0]) != len(body):
                    raise _bad_frame(body, tell() - base != end)  # noqa: TRY301 - one except maps all
                frames.append(body)
        except ProtocolError:
            self._fail()
            raise
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            self._fail()
            why = str(exc) or "an invalid type byte"  # msgpack's FormatError has no text of its own
            raise ProtocolError(f"frame body is not valid msgpack: {why} ({type(exc).__name__})") from exc
        if buf:
            del buf[:off]
        elif rest:
            buf += rest
        return frames

    def _fail(self) -> None:
        self._failed = True
        self._buf.clear()
        self._unpacker = msgpack.Unpacker(raw=False)
