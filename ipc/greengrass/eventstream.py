"""The AWS event-stream message codec: what Greengrass IPC clients put on the socket.

One message on the wire::

    total_length  u32 BE   whole message, prelude and trailer included (>= 16)
    headers_len   u32 BE   bytes of the headers section
    prelude_crc   u32 BE   CRC32 of the 8 bytes above
    headers       headers_len bytes: repeated (name_len u8, name, type u8, value)
    payload       total_length - headers_len - 16 bytes, opaque
    message_crc   u32 BE   CRC32 of everything before it (prelude CRC included)

The CRC is the zlib/IEEE CRC32 (``zlib.crc32``), not CRC32C. Header value encodings follow
aws-c-event-stream (``source/event_stream.c``): bool true/false carry no value, byte/int16/int32/
int64/timestamp are big-endian signed, byte_array/string have a u16 length, uuid is 16 bytes.

Checks are ordered as the C channel handler orders them, so a hostile peer is stopped after 12
bytes: the total length against the configured maximum and the 16-byte minimum, then the prelude
CRC (which protects the lengths from bit flips), then the headers length; the message CRC once the
whole message is in; the headers last. A decoding error is final for the stream: there is no way
to find the next message boundary in a corrupted stream, so the decoder refuses further input and
the connection has to be closed.

Nothing here does I/O; the server, the tests and the fuzzers share it.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ipc.errors import ProtocolError

PRELUDE_LENGTH: Final = 12
TRAILER_LENGTH: Final = 4
MIN_MESSAGE_LENGTH: Final = PRELUDE_LENGTH + TRAILER_LENGTH
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
"""As Greengrass (``AWS_EVENT_STREAM_MAX_MESSAGE_SIZE`` in aws-c-event-stream)."""
MAX_HEADERS_SIZE: Final = 128 * 1024
"""``AWS_EVENT_STREAM_MAX_HEADERS_SIZE``."""
MAX_HEADER_NAME_LENGTH: Final = 127
"""``AWS_EVENT_STREAM_HEADER_NAME_LEN_MAX`` (INT8_MAX); the C reader rejects longer names."""
MAX_HEADER_VALUE_LENGTH: Final = 32767
"""INT16_MAX: the C reader rejects longer byte_array/string values although the field is u16."""

_U32 = struct.Struct(">I")
_PRELUDE = struct.Struct(">III")
_LENGTHS = struct.Struct(">II")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")


class HeaderType(IntEnum):
    """Wire codes of header value types (``enum aws_event_stream_header_value_type``)."""

    BOOL_TRUE = 0
    BOOL_FALSE = 1
    BYTE = 2
    INT16 = 3
    INT32 = 4
    INT64 = 5
    BYTE_ARRAY = 6
    STRING = 7
    TIMESTAMP = 8
    UUID = 9


HeaderValue = bool | int | bytes | str | uuid.UUID
"""bool for BOOL_*, int for BYTE/INT16/INT32/INT64/TIMESTAMP (milliseconds since the epoch, kept
as the raw int64 so it round-trips), bytes for BYTE_ARRAY, str for STRING, UUID for UUID."""

_INT_RANGES: dict[HeaderType, tuple[struct.Struct, int]] = {
    HeaderType.BYTE: (_I8, 7),
    HeaderType.INT16: (_I16, 15),
    HeaderType.INT32: (_I32, 31),
    HeaderType.INT64: (_I64, 63),
    HeaderType.TIMESTAMP: (_I64, 63),
}
_FIXED_DECODERS: dict[int, struct.Struct] = {
    HeaderType.BYTE: _I8,
    HeaderType.INT16: _I16,
    HeaderType.INT32: _I32,
    HeaderType.INT64: _I64,
    HeaderType.TIMESTAMP: _I64,
}


class EventStreamError(ProtocolError):
    """A message that cannot be encoded or decoded; ``reason`` is a stable machine-readable word.

    Decoding reasons: ``message_too_large``, ``message_too_small``, ``prelude_crc_mismatch``,
    ``headers_too_large``, ``headers_length_overflow``, ``message_crc_mismatch``,
    ``unknown_header_type``, ``header_overflow`` (a header runs past the headers section),
    ``header_name_too_long``, ``header_value_too_long``, ``header_not_utf8``, ``truncated``,
    ``trailing_data``, ``decoder_failed``. Encoding adds ``invalid_header``.

    ``offset`` is the stream position where the offending message starts. ``messages`` holds the
    complete messages decoded from the same ``feed`` call before the bad bytes, so a server can
    still act on what the peer sent correctly before closing the connection.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        offset: int | None = None,
        messages: list[Message] | None = None,
    ) -> None:
        super().__init__(message, {"reason": reason, "offset": offset})
        self.reason = reason
        self.offset = offset
        self.messages: list[Message] = messages if messages is not None else []


@dataclass(frozen=True, slots=True)
class Header:
    """One typed header; the ``from_*`` constructors pick the wire type for a Python value."""

    name: str
    value: HeaderValue
    type: HeaderType

    @classmethod
    def from_bool(cls, name: str, value: bool) -> Header:
        return cls(name, value, HeaderType.BOOL_TRUE if value else HeaderType.BOOL_FALSE)

    @classmethod
    def from_byte(cls, name: str, value: int) -> Header:
        return cls(name, value, HeaderType.BYTE)

    @classmethod
    def from_int16(cls, name: str, value: int) -> Header:
        return cls(name, value, HeaderType.INT16)

    @classmethod
    def from_int32(cls, name: str, value: int) -> Header:
        return cls(name, value, HeaderType.INT32)

    @classmethod
    def from_int64(cls, name: str, value: int) -> Header:
        return cls(name, value, HeaderType.INT64)

    @classmethod
    def from_byte_array(cls, name: str, value: bytes) -> Header:
        return cls(name, value, HeaderType.BYTE_ARRAY)

    @classmethod
    def from_string(cls, name: str, value: str) -> Header:
        return cls(name, value, HeaderType.STRING)

    @classmethod
    def from_timestamp(cls, name: str, millis: int) -> Header:
        return cls(name, millis, HeaderType.TIMESTAMP)

    @classmethod
    def from_uuid(cls, name: str, value: uuid.UUID) -> Header:
        return cls(name, value, HeaderType.UUID)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message. Headers keep wire order and duplicates, as aws-c-event-stream does."""

    headers: tuple[Header, ...] = ()
    payload: bytes = b""

    def get(self, name: str) -> Header | None:
        """The first header whose name matches case-insensitively (the RPC layer's rule)."""
        wanted = name.lower()
        for h in self.headers:
            if h.name.lower() == wanted:
                return h
        return None

    def encode(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
        return encode_message(self.headers, self.payload, max_message_size=max_message_size)


# --------------------------------------------------------------------------------------------
# Encoding


def _invalid(name: str, why: str) -> EventStreamError:
    return EventStreamError("invalid_header", f"header {name!r}: {why}")


def encode_header(header: Header) -> bytes:
    """One header's wire bytes; raises ``EventStreamError(invalid_header/...)`` for bad values."""
    name = header.name.encode("utf-8")
    if len(name) > MAX_HEADER_NAME_LENGTH:
        raise EventStreamError(
            "header_name_too_long",
            f"header name {header.name!r} is {len(name)} bytes, the limit is {MAX_HEADER_NAME_LENGTH}",
        )
    t = header.type
    v = header.value
    head = bytes((len(name),)) + name + bytes((int(t),))
    if t is HeaderType.BOOL_TRUE or t is HeaderType.BOOL_FALSE:
        if not isinstance(v, bool) or v is not (t is HeaderType.BOOL_TRUE):
            raise _invalid(header.name, f"type {t.name} needs value {t is HeaderType.BOOL_TRUE}")
        return head
    if t in _INT_RANGES:
        packer, bits = _INT_RANGES[t]
        if not isinstance(v, int) or isinstance(v, bool):
            raise _invalid(header.name, f"type {t.name} needs an int, got {type(v).__name__}")
        if not -(1 << bits) <= v < (1 << bits):
            raise _invalid(header.name, f"{v} does not fit {t.name}")
        return head + packer.pack(v)
    if t is HeaderType.BYTE_ARRAY or t is HeaderType.STRING:
        if t is HeaderType.STRING:
            if not isinstance(v, str):
                raise _invalid(header.name, f"type STRING needs a str, got {type(v).__name__}")
            raw = v.encode("utf-8")
        else:
            if not isinstance(v, bytes | bytearray | memoryview):
                raise _invalid(header.name, f"type BYTE_ARRAY needs bytes, got {type(v).__name__}")
            raw = bytes(v)
        if len(raw) > MAX_HEADER_VALUE_LENGTH:
            raise EventStreamError(
                "header_value_too_long",
                f"header {header.name!r} value is {len(raw)} bytes, the limit is {MAX_HEADER_VALUE_LENGTH}",
            )
        return head + _U16.pack(len(raw)) + raw
    if t is HeaderType.UUID:
        if not isinstance(v, uuid.UUID):
            raise _invalid(header.name, f"type UUID needs a uuid.UUID, got {type(v).__name__}")
        return head + v.bytes
    raise _invalid(header.name, f"unknown header type {t!r}")  # pragma: no cover - enum is closed


def encode_headers(headers: Iterable[Header]) -> bytes:
    return b"".join(encode_header(h) for h in headers)


def encode_raw(
    header_block: bytes, payload: bytes = b"", *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> bytes:
    """Frame an already encoded headers section; lets hot paths cache constant header bytes."""
    if len(header_block) > MAX_HEADERS_SIZE:
        raise EventStreamError(
            "headers_too_large", f"headers are {len(header_block)} bytes, the limit is {MAX_HEADERS_SIZE}"
        )
    total = MIN_MESSAGE_LENGTH + len(header_block) + len(payload)
    if total > max_message_size:
        raise EventStreamError(
            "message_too_large", f"message would be {total} bytes, the limit is {max_message_size}"
        )
    lengths = _LENGTHS.pack(total, len(header_block))
    prelude = lengths + _U32.pack(zlib.crc32(lengths))
    crc = zlib.crc32(payload, zlib.crc32(header_block, zlib.crc32(prelude)))
    return b"".join((prelude, header_block, payload, _U32.pack(crc)))


def encode_message(
    headers: Iterable[Header] = (),
    payload: bytes = b"",
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> bytes:
    return encode_raw(encode_headers(headers), payload, max_message_size=max_message_size)


# --------------------------------------------------------------------------------------------
# Decoding


def decode_headers(buf: bytes | memoryview, *, offset: int | None = None) -> tuple[Header, ...]:
    """Parse a complete headers section. Every failure is an ``EventStreamError``."""
    headers: list[Header] = []
    end = len(buf)
    pos = 0
    while pos < end:
        name_len = buf[pos]
        pos += 1
        if name_len > MAX_HEADER_NAME_LENGTH:
            raise EventStreamError(
                "header_name_too_long",
                f"header name length {name_len} at header byte {pos - 1} exceeds {MAX_HEADER_NAME_LENGTH}",
                offset=offset,
            )
        if pos + name_len + 1 > end:
            raise EventStreamError(
                "header_overflow", f"header at header byte {pos - 1} runs past the headers section",
                offset=offset,
            )
        try:
            name = bytes(buf[pos:pos + name_len]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventStreamError(
                "header_not_utf8", f"header name at header byte {pos - 1} is not UTF-8", offset=offset
            ) from exc
        pos += name_len
        code = buf[pos]
        pos += 1
        value: HeaderValue
        if code == HeaderType.BOOL_TRUE:
            value = True
        elif code == HeaderType.BOOL_FALSE:
            value = False
        elif code in _FIXED_DECODERS:
            unpacker = _FIXED_DECODERS[code]
            if pos + unpacker.size > end:
                raise EventStreamError(
                    "header_overflow", f"header {name!r} value runs past the headers section", offset=offset
                )
            (value,) = unpacker.unpack_from(buf, pos)
            pos += unpacker.size
        elif code in (HeaderType.BYTE_ARRAY, HeaderType.STRING):
            if pos + 2 > end:
                raise EventStreamError(
                    "header_overflow", f"header {name!r} length runs past the headers section", offset=offset
                )
            (vlen,) = _U16.unpack_from(buf, pos)
            pos += 2
            if vlen > MAX_HEADER_VALUE_LENGTH:
                raise EventStreamError(
                    "header_value_too_long",
                    f"header {name!r} value length {vlen} exceeds {MAX_HEADER_VALUE_LENGTH}",
                    offset=offset,
                )
            if pos + vlen > end:
                raise EventStreamError(
                    "header_overflow", f"header {name!r} value runs past the headers section", offset=offset
                )
            raw = bytes(buf[pos:pos + vlen])
            pos += vlen
            if code == HeaderType.STRING:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise EventStreamError(
                        "header_not_utf8", f"string header {name!r} is not UTF-8", offset=offset
                    ) from exc
            else:
                value = raw
        elif code == HeaderType.UUID:
            if pos + 16 > end:
                raise EventStreamError(
                    "header_overflow", f"header {name!r} value runs past the headers section", offset=offset
                )
            value = uuid.UUID(bytes=bytes(buf[pos:pos + 16]))
            pos += 16
        else:
            raise EventStreamError(
                "unknown_header_type", f"header {name!r} has unknown type {code}", offset=offset
            )
        headers.append(Header(name, value, HeaderType(code)))
    return tuple(headers)


class EventStreamDecoder:
    """Streaming decoder: ``feed`` any split of the byte stream, get the complete messages back.

    Memory is bounded by ``max_message_size`` plus one read: a length above the limit is refused
    after the 12-byte prelude, before anything is buffered for it.
    """

    __slots__ = ("_buf", "_consumed", "_failed", "max_message_size")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < MIN_MESSAGE_LENGTH:
            raise ValueError(f"max_message_size must be at least {MIN_MESSAGE_LENGTH}")
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        self._failed: EventStreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._failed is not None:
            raise EventStreamError(
                "decoder_failed",
                f"the stream is unusable after {self._failed.reason} at offset {self._failed.offset}",
                offset=self._failed.offset,
            )
        out: list[Message] = []
        if self._buf:
            self._buf += data
            src: bytes | bytearray | memoryview = self._buf
        else:
            src = data
        try:
            with memoryview(src) as view:
                used = self._drain(view, out)
        except EventStreamError as exc:
            exc.messages = out
            self._failed = exc
            self._buf = bytearray()
            raise
        self._consumed += used
        if src is self._buf:
            del self._buf[:used]
        elif used < len(data):
            self._buf = bytearray(data[used:])
        return out

    def eof(self) -> None:
        """The peer closed the stream: a partial message left over is an error."""
        if self._buf and self._failed is None:
            offset = self._consumed
            have = len(self._buf)
            self._buf = bytearray()
            self._failed = EventStreamError(
                "truncated", f"stream ended {have} bytes into a message", offset=offset
            )
            raise self._failed

    def _drain(self, view: memoryview, out: list[Message]) -> int:
        pos = 0
        end = len(view)
        limit = self.max_message_size
        while end - pos >= PRELUDE_LENGTH:
            offset = self._consumed + pos
            total, headers_len, prelude_crc = _PRELUDE.unpack_from(view, pos)
            if total > limit:
                raise EventStreamError(
                    "message_too_large", f"message length {total} exceeds the limit of {limit}", offset=offset
                )
            if total < MIN_MESSAGE_LENGTH:
                raise EventStreamError(
                    "message_too_small",
                    f"message length {total} is below the minimum of {MIN_MESSAGE_LENGTH}",
                    offset=offset,
                )
            computed = zlib.crc32(view[pos:pos + 8])
            if computed != prelude_crc:
                raise EventStreamError(
                    "prelude_crc_mismatch",
                    f"prelude CRC is 0x{prelude_crc:08x}, computed 0x{computed:08x}",
                    offset=offset,
                )
            if headers_len > MAX_HEADERS_SIZE:
                raise EventStreamError(
                    "headers_too_large",
                    f"headers length {headers_len} exceeds the limit of {MAX_HEADERS_SIZE}",
                    offset=offset,
                )
            if headers_len > total - MIN_MESSAGE_LENGTH:
                raise EventStreamError(
                    "headers_length_overflow",
                    f"headers length {headers_len} does not fit a message of {total} bytes",
                    offset=offset,
                )
            if end - pos < total:
                break
            trailer = pos + total - TRAILER_LENGTH
            (message_crc,) = _U32.unpack_from(view, trailer)
            computed = zlib.crc32(view[pos:trailer])
            if computed != message_crc:
                raise EventStreamError(
                    "message_crc_mismatch",
                    f"message CRC is 0x{message_crc:08x}, computed 0x{computed:08x}",
                    offset=offset,
                )
            headers_start = pos + PRELUDE_LENGTH
            payload_start = headers_start + headers_len
            headers = (
                decode_headers(view[headers_start:payload_start], offset=offset) if headers_len else ()
            )
            out.append(Message(headers, bytes(view[payload_start:trailer])))
            pos += total
        return pos


def decode_message(
    data: bytes | bytearray | memoryview, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Message:
    """Exactly one message: short input is ``truncated``, anything after it ``trailing_data``."""
    dec = EventStreamDecoder(max_message_size=max_message_size)
    messages = dec.feed(data)
    if not messages:
        dec.eof()
        raise EventStreamError("truncated", "no data", offset=0)
    if len(messages) > 1 or dec.buffered:
        (first_length,) = _U32.unpack_from(data, 0)
        raise EventStreamError("trailing_data", "data continues after the first message", offset=first_length)
    return messages[0]
