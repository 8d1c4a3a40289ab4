"""Payload encoding: bytes, JSON-able values and numpy arrays, all as msgpack.

The bus carries payloads as already-encoded bytes (the *data*), so the daemon relays them without
decoding: only publishers encode and only subscribers decode. numpy arrays travel as a msgpack
extension (type 1) holding ``[dtype.str, shape, raw bytes]`` and come back through
``np.frombuffer`` — no JSON, no per-element work. numpy is imported only when an array is actually
decoded (and never by the encoder: an object can only be an ndarray if numpy is already loaded), so
the daemon stays small.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import msgpack

from ipc.errors import InvalidArguments

NUMPY_EXT = 1


def _default(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise InvalidArguments("numpy arrays of dtype object cannot be sent",
                                       {"dtype": str(obj.dtype)})
            # tobytes() is C-ordered whatever the layout; shape from the original (ascontiguousarray
            # would turn a 0-d array into 1-d)
            return msgpack.ExtType(
                NUMPY_EXT,
                msgpack.packb([obj.dtype.str, list(obj.shape), obj.tobytes()], use_bin_type=True),
            )
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, int):  # msgpack hands over only the integers it cannot hold
        raise InvalidArguments(f"integer {obj} is out of range: payload integers are 64-bit "
                               "(-2**63 to 2**64-1); send a larger one as a string",
                               {"type": "int", "value": str(obj)[:40]})
    raise InvalidArguments(f"payload of type {type(obj).__name__} cannot be encoded",
                           {"type": type(obj).__name__})


def _ext_hook(code: int, data: bytes) -> Any:
    if code == NUMPY_EXT:
        np = importlib.import_module("numpy")
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(tuple(shape))
    return msgpack.ExtType(code, data)


_packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)


def encode(value: Any) -> bytes:
    """Encode a payload to the bus's data form."""
    if type(value) is bytes:
        return _packer.pack(value)
    try:
        return _packer.pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArguments(f"payload cannot be encoded: {exc}", {"type": type(value).__name__}) from exc


def decode(data: bytes | memoryview) -> Any:
    """Decode bus data back to a value; arrays decoded from a frame are read-only views."""
    if type(data) is bytes and data:
        # bytes payloads (bin 8/16 spanning exactly the data) skip the msgpack call and its options;
        # this is the per-message cost of every subscriber that sends raw bytes
        marker = data[0]
        n = len(data)
        if marker == 0xC4:
            if n >= 2 and data[1] + 2 == n:
                return data[2:]
        elif marker == 0xC5 and n >= 3 and (data[1] << 8 | data[2]) + 3 == n:
            return data[3:]
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidArguments(f"payload cannot be decoded: {exc}") from exc


def encoded_bytes(data: bytes) -> bytes | None:
    """The raw bytes if ``data`` encodes a bytes payload (bin 8/16/32), without a full decode."""
    if not data:
        return None
    marker = data[0]
    if marker == 0xC4:
        start = 2
    elif marker == 0xC5:
        start = 3
    elif marker == 0xC6:
        start = 5
    else:
        return None
    return data[start:]
