"""Payload codec: JSON-able values, bytes, numpy arrays without JSON, and lazy numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ipc import codec
from ipc.errors import InvalidArguments

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", [None, True, 0, -1, 2**63, 1.5, "x", "é", b"", b"\x00\xff" * 100,
                                   [1, "a", None], {"a": {"b": [1, 2]}}, {"k": b"bytes"}])
def test_values_round_trip(value: object) -> None:
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize(("dtype", "shape"), [("float32", (3, 4)), ("int16", (5,)), ("uint8", ()),
                                              (">f8", (2, 2, 2)), ("complex64", (2,)), ("bool", (0, 3))])
def test_numpy_round_trip_keeps_dtype_shape_and_values(dtype: str, shape: tuple[int, ...]) -> None:
    arr = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    back = codec.decode(codec.encode({"a": arr}))["a"]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_numpy_is_not_json_and_non_contiguous_arrays_work() -> None:
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)[:, ::3]
    data = codec.encode(arr)
    assert len(data) < arr.nbytes + 64  # raw bytes plus a small header, not decimal text
    assert np.array_equal(codec.decode(data), arr)


def test_numpy_scalars_become_plain_numbers() -> None:
    assert codec.decode(codec.encode({"x": np.float32(1.5), "n": np.int64(3)})) == {"x": 1.5, "n": 3}


def test_unencodable_payload_names_the_type() -> None:
    with pytest.raises(InvalidArguments, match="object"):
        codec.encode(object())
    with pytest.raises(InvalidArguments, match="dtype object"):
        codec.encode(np.array([object()]))


def test_bad_data_raises_invalid_arguments() -> None:
    with pytest.raises(InvalidArguments):
        codec.decode(b"\xc1")


def test_encoded_bytes_shortcut_matches_decode() -> None:
    for size in (0, 1, 255, 256, 65535, 65536):
        b = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert codec.encoded_bytes(codec.encode(b)) == b
    assert codec.encoded_bytes(codec.encode("text")) is None


def test_server_side_modules_do_not_import_numpy() -> None:
    code = ("import sys, ipc, ipc.server, ipc.core, ipc.codec; "
            "ipc.codec.decode(ipc.codec.encode({'a': b'x'})); print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "False"


def test_bytes_fast_path_agrees_with_msgpack_and_refuses_bad_lengths() -> None:
    for size in (0, 1, 255, 256, 65535, 65536, 70000):
        b = bytes(range(256)) * (size // 256) + bytes(size % 256)
        data = codec.encode(b)
        assert codec.decode(data) == b and codec.decode(memoryview(data)) == b
        assert type(codec.decode(memoryview(data))) is bytes
    for bad in (b"\xc4\x05ab", b"\xc4\x01ab", b"\xc5\x01\x00a", b"\xc4"):  # short, trailing, short, headless
        with pytest.raises(InvalidArguments):
            codec.decode(bad)
