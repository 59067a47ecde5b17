"""Open Inference Protocol tensor datatypes: JSON data and little-endian binary to arrays."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentinel.protocols.base import DecodeError

# OIP v2 datatype → little-endian numpy dtype (BYTES handled separately).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_ELEMENTS = 1 << 28   # refuse shapes that would allocate absurd arrays


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    """A validated shape tuple; raises DecodeError for negative, non-integer or huge shapes."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                        for d in shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: negative dimension in shape {list(shape)}")
    n = 1
    for d in shape:
        n *= d
    if n > MAX_ELEMENTS:
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} has {n} elements, "
                                       f"more than the limit {MAX_ELEMENTS}")
    return tuple(shape)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_json(data: Any, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    """A tensor from OIP v2 JSON `data` (flat or nested, row-major)."""
    if datatype == "BYTES":
        flat = _flatten(data)
        items = [s.encode() if isinstance(s, str) else s for s in flat]
        if not all(isinstance(s, (bytes, bytearray)) for s in items):
            raise DecodeError("bad_datatype", f"tensor {name!r}: BYTES data must be strings")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    else:
        dt = DTYPES.get(datatype)
        if dt is None:
            raise DecodeError("bad_datatype", f"tensor {name!r}: unknown datatype {datatype!r}")
        try:
            arr = np.asarray(data, dtype=dt).reshape(-1)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DecodeError("bad_datatype", f"tensor {name!r}: data is not {datatype}: {exc}") from None
    if arr.size != numel(shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} needs {numel(shape)} "
                                       f"elements, data has {arr.size}")
    return arr.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def from_binary(buf: memoryview | bytes, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    """A tensor from its binary-extension bytes (little-endian, row-major)."""
    if datatype == "BYTES":
        return _bytes_elements(bytes(buf), shape, name)
    dt = DTYPES.get(datatype)
    if dt is None:
        raise DecodeError("bad_datatype", f"tensor {name!r}: unknown datatype {datatype!r}")
    want = numel(shape) * dt.itemsize
    if len(buf) != want:
        raise DecodeError("truncated" if len(buf) < want else "bad_shape",
                          f"tensor {name!r}: shape {list(shape)} of {datatype} needs {want} bytes, got {len(buf)}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _bytes_elements(buf: bytes, shape: tuple[int, ...], name: str) -> np.ndarray:
    """BYTES elements: each a 4-byte little-endian length followed by that many bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise DecodeError("truncated", f"tensor {name!r}: BYTES element length cut short at byte {pos}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise DecodeError("truncated", f"tensor {name!r}: BYTES element claims {n} bytes, "
                                           f"{len(buf) - pos} remain")
        items.append(buf[pos:pos + n])
        pos += n
    if len(items) != numel(shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} needs {numel(shape)} "
                                       f"BYTES elements, got {len(items)}")
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def to_binary(arr: np.ndarray) -> tuple[str, bytes]:
    """The datatype name and binary-extension bytes of an array (the inverse of from_binary)."""
    if arr.dtype == object:
        parts = []
        for item in arr.reshape(-1):
            b = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(b)) + b)
        return "BYTES", b"".join(parts)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    name = DATATYPE_OF.get(np.dtype(dt))
    if name is None:
        raise ValueError(f"no OIP v2 datatype for numpy dtype {arr.dtype}")
    return name, np.ascontiguousarray(arr, dtype=dt).tobytes()
