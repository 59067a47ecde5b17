"""Open Inference Protocol tensor datatypes: the one dtype table, JSON and little-endian binary codecs."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import MAX_ELEMENTS

# OIP v2 datatype → little-endian numpy dtype (BYTES handled separately, as object arrays).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES: tuple[str, ...] = (*DTYPES, "BYTES")
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (object → BYTES); ValueError when there is none."""
    dt = np.dtype(dtype)
    if dt.kind == "O":
        return "BYTES"
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    name = DATATYPE_OF.get(dt)
    if name is None:
        raise ValueError(f"no OIP v2 datatype for numpy dtype {dtype}")
    return name


def numpy_dtype(datatype: str, name: str = "") -> np.dtype:
    """The numpy dtype of an OIP datatype name, or DecodeError("bad_datatype")."""
    dt = DTYPES.get(datatype)
    if dt is None:
        raise DecodeError("bad_datatype", f"tensor {name!r}: unknown datatype {datatype!r}")
    return dt


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    """A validated shape tuple; DecodeError for negative, non-integer or oversized shapes.

    Every dimension and the product are bounded before anything is allocated (a shape with
    a 0 and a huge dimension is refused too: numpy cannot represent it).
    """
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                        for d in shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape must be a list of integers, got {shape!r}"[:300])
    if len(shape) > 32:
        raise DecodeError("bad_shape", f"tensor {name!r}: {len(shape)} dimensions, more than 32")
    if any(d < 0 for d in shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: negative dimension in shape {list(shape)}")
    if any(d > MAX_ELEMENTS for d in shape):
        raise DecodeError("too_large", f"tensor {name!r}: a dimension of shape {list(shape)} exceeds "
                                       f"the element limit {MAX_ELEMENTS}")
    n = numel(shape)
    if n > MAX_ELEMENTS:
        raise DecodeError("too_large", f"tensor {name!r}: shape {list(shape)} has {n} elements, "
                                       f"more than the limit {MAX_ELEMENTS}")
    return tuple(shape)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_json(data: Any, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    """A tensor from OIP v2 JSON `data` (flat or nested, row-major); counts checked before allocation."""
    if datatype != "BYTES" and type(data) is list and len(data) == numel(shape) and data \
            and type(data[0]) is not list:
        # The usual flat list of numbers: convert it as is; a 1-D result proves no element was a
        # list, i.e. that flatten() would have returned `data` itself. Anything else: the full path.
        dt = DTYPES.get(datatype)
        if dt is not None:
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    arr = np.asarray(data, dtype=dt)
            except (ValueError, TypeError, OverflowError):
                arr = None
            if arr is not None and arr.ndim == 1:
                return arr.reshape(shape)
    flat = flatten(data)
    if len(flat) != numel(shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} needs {numel(shape)} "
                                       f"elements, data has {len(flat)}")
    if datatype == "BYTES":
        items = [s.encode() if isinstance(s, str) else s for s in flat]
        if not all(isinstance(s, bytes) for s in items):
            raise DecodeError("bad_datatype", f"tensor {name!r}: BYTES data must be strings")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = numpy_dtype(datatype, name)
    try:   # numpy refuses objects, None for integers and non-numeric strings
        with np.errstate(over="ignore", invalid="ignore"):   # 1e300 as FP16 is inf, as numpy says
            arr = np.asarray(flat, dtype=dt)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError("bad_datatype", f"tensor {name!r}: data is not {datatype}: {exc}"[:300]) from None
    return arr.reshape(shape)


def flatten(data: Any) -> list[Any]:
    """Row-major leaves of nested lists, iteratively (no recursion on outsider-controlled depth)."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data   # already flat (the usual case): no copy
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
    dt = numpy_dtype(datatype, name)
    want = numel(shape) * dt.itemsize
    if len(buf) != want:
        raise DecodeError("truncated" if len(buf) < want else "bad_shape",
                          f"tensor {name!r}: shape {list(shape)} of {datatype} needs {want} bytes, got {len(buf)}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _bytes_elements(buf: bytes, shape: tuple[int, ...], name: str) -> np.ndarray:
    """BYTES elements: each a 4-byte little-endian length followed by that many bytes."""
    items: list[bytes] = []
    pos = 0
    want = numel(shape)
    while pos < len(buf):
        if len(items) >= want:
            break
        if pos + 4 > len(buf):
            raise DecodeError("truncated", f"tensor {name!r}: BYTES element length cut short at byte {pos}")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise DecodeError("truncated", f"tensor {name!r}: BYTES element claims {n} bytes, "
                                           f"{len(buf) - pos} remain")
        items.append(buf[pos:pos + n])
        pos += n
    if len(items) != want or pos != len(buf):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} needs {want} BYTES elements, "
                                       f"the data holds {len(items)}{' and more bytes' if pos != len(buf) else ''}")
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def to_binary(arr: np.ndarray) -> tuple[str, bytes]:
    """The datatype name and binary-extension bytes of an array (the inverse of from_binary)."""
    name = datatype_of(arr.dtype)
    if name == "BYTES":
        parts = []
        for item in arr.reshape(-1):
            b = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(b)) + b)
        return "BYTES", b"".join(parts)
    return name, np.ascontiguousarray(arr, dtype=DTYPES[name]).tobytes()


def to_json(arr: np.ndarray) -> tuple[str, list[Any]]:
    """The datatype name and flat JSON `data` of an array (the inverse of from_json); BYTES must be UTF-8."""
    name = datatype_of(arr.dtype)
    if name == "BYTES":
        return name, [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
    return name, arr.reshape(-1).tolist()
