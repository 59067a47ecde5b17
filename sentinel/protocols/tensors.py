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
# BF16 (bfloat16: the upper half of an FP32) has no numpy dtype: decoded exactly to float32.
BF16 = "BF16"
DATATYPES: tuple[str, ...] = (*DTYPES, BF16, "BYTES")
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
_FLOAT32 = np.dtype("<f4")


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
    """The numpy dtype an OIP datatype decodes to (BF16: float32), or DecodeError("bad_datatype")."""
    dt = DTYPES.get(datatype)
    if dt is None and datatype == BF16:
        return _FLOAT32
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
    """A tensor from OIP v2 JSON `data` (flat or nested, row-major); counts checked before allocation.

    Nested data must be rectangular (ragged rows are refused naming the shape). Values must be
    what the datatype holds: no null, fraction, string or out-of-range value in an integer or
    BOOL tensor; a value that cannot be represented is an error, never a silently different
    tensor. In a float tensor null is NaN (KServe's client writes NaN and ±Infinity as null,
    and its server reads null back as NaN).
    """
    if datatype != "BYTES" and type(data) is list and len(data) == numel(shape) and data \
            and type(data[0]) is not list:
        # The usual flat list of numbers: infer its type in one conversion; a 1-D non-object
        # result proves no element was a list, i.e. that flatten() would have returned `data`.
        try:
            inferred = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            inferred = None
        if inferred is not None and inferred.ndim == 1 and inferred.dtype.kind != "O":
            return _cast(inferred, data, datatype, name).reshape(shape)
    flat = flatten(data, name, shape)
    if len(flat) != numel(shape):
        raise DecodeError("bad_shape", f"tensor {name!r}: shape {list(shape)} needs {numel(shape)} "
                                       f"elements, data has {len(flat)}")
    if datatype == "BYTES":
        try:
            items = [s.encode() if isinstance(s, str) else s for s in flat]
        except UnicodeEncodeError:   # a lone surrogate escape ("\ud800"): no UTF-8 bytes, servers refuse the JSON
            raise DecodeError("malformed_json", f"tensor {name!r}: BYTES data holds a lone UTF-16 surrogate "
                                                "escape (\\ud800-\\udfff), which is no UTF-8 text; KServe and "
                                                "Triton refuse such JSON") from None
        if not all(isinstance(s, bytes) for s in items):
            raise DecodeError("bad_datatype", f"tensor {name!r}: BYTES data must be strings")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    numpy_dtype(datatype, name)   # an unknown datatype is named before the values are judged
    try:
        inferred = np.asarray(flat)
    except (ValueError, TypeError, OverflowError):
        inferred = np.empty(len(flat), dtype=object)
        inferred[:] = flat
    return _cast(inferred, flat, datatype, name).reshape(shape)


def _cast(inferred: np.ndarray, flat: list[Any], datatype: str, name: str) -> np.ndarray:
    """JSON values (`flat`, and numpy's own reading of them, `inferred`) as `datatype`, or DecodeError."""
    dt = numpy_dtype(datatype, name)

    def bad(why: str) -> DecodeError:
        return DecodeError("bad_datatype", f"tensor {name!r}: {datatype} data {why}"[:300])

    kind = inferred.dtype.kind
    if kind == "O" or (kind == "f" and dt.kind != "f"):
        # null, objects, integers beyond 64 bits (numpy reads those as float64), or numbers written
        # as floats for an integer or BOOL tensor: judged one by one (rare)
        return _convert(_checked_values(flat, dt, bad), dt, datatype, bad)
    if kind == "U":
        if dt.kind != "f":
            raise bad("holds strings")
        return _convert(flat, dt, datatype, bad)
    if kind == "b":
        return inferred.astype(dt)
    if kind not in "iuf":
        raise bad(f"is not numbers ({inferred.dtype})")
    if dt.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):   # 1e300 as FP16 is inf, as numpy says
            arr = inferred.astype(dt)
        return _round_bf16(arr) if datatype == BF16 else arr
    if inferred.size == 0:
        return inferred.astype(dt)
    lo, hi = int(inferred.min()), int(inferred.max())
    if dt.kind == "b":
        if lo < 0 or hi > 1:
            raise bad("holds numbers other than 0 and 1")
        return inferred.astype(dt)
    info = np.iinfo(dt)
    if lo < info.min or hi > info.max:
        raise bad(f"holds values from {lo} to {hi}, beyond the range of {datatype}")
    return inferred.astype(dt)


def _checked_values(flat: list[Any], dt: np.dtype, bad: Any) -> list[Any]:
    """JSON values one by one: no container; for integer and BOOL tensors whole numbers only (no null)."""
    if dt.kind == "f":
        # null reads as NaN, as KServe reads it: its client (orjson) writes NaN and ±Infinity as null
        for v in flat:
            if v is not None and not isinstance(v, (int, float, str)):
                raise bad(f"holds a JSON {type(v).__name__}")
        return flat
    out: list[Any] = []
    for v in flat:
        if v is None:
            raise bad("holds null")
        if isinstance(v, float):
            if not v.is_integer():
                raise bad(f"holds {v!r}, not an integer")
            v = int(v)
        elif not isinstance(v, int):
            raise bad(f"holds a JSON {'string' if isinstance(v, str) else type(v).__name__}")
        if dt.kind == "b" and v not in (0, 1):
            raise bad(f"holds {v!r}, not true/false")
        out.append(v)
    return out


def _convert(flat: list[Any], dt: np.dtype, datatype: str, bad: Any) -> np.ndarray:
    try:   # numpy refuses objects and non-numeric strings, and integers out of range
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(flat, dtype=dt)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad(f"is not {datatype}: {exc}") from None
    return _round_bf16(arr) if datatype == BF16 else arr


def _round_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), NaN kept: what a BF16 tensor holds."""
    u = np.ascontiguousarray(arr, dtype=_FLOAT32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    out = np.where(np.isnan(arr), arr, rounded.view(_FLOAT32))
    return out.astype(_FLOAT32, copy=False)


def flatten(data: Any, name: str = "", shape: Sequence[int] | None = None) -> list[Any]:
    """Row-major leaves of nested lists, iteratively (no recursion on outsider-controlled depth).

    Nested lists must be rectangular: lists at one depth all the same length, every leaf at
    the same depth; else DecodeError("bad_shape") naming the tensor and its shape.
    """
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data   # already flat (the usual case): no copy
    out: list[Any] = []
    lengths = [len(data)]   # the length of the lists at each depth
    leaf_depth = 0
    stack = [iter(data)]

    def ragged(why: str) -> DecodeError:
        where = f" for shape {list(shape)}" if shape is not None else ""
        return DecodeError("bad_shape", f"tensor {name!r}: nested data is ragged{where}: {why}")

    while stack:
        depth = len(stack)
        for item in stack[-1]:
            if isinstance(item, list):
                if leaf_depth and depth >= leaf_depth:
                    raise ragged(f"a list where numbers were at depth {leaf_depth}")
                if depth < len(lengths):
                    if lengths[depth] != len(item):
                        raise ragged(f"rows of {lengths[depth]} and {len(item)} at depth {depth + 1}")
                else:
                    lengths.append(len(item))
                stack.append(iter(item))
                break
            if not leaf_depth:
                leaf_depth = depth
            elif depth != leaf_depth:
                raise ragged(f"numbers at depths {leaf_depth} and {depth}")
            out.append(item)
        else:
            stack.pop()
    return out


def from_binary(buf: memoryview | bytes, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    """A tensor from its binary-extension bytes (little-endian, row-major)."""
    if datatype == "BYTES":
        return _bytes_elements(bytes(buf), shape, name)
    dt = np.dtype("<u2") if datatype == BF16 else numpy_dtype(datatype, name)
    want = numel(shape) * dt.itemsize
    if len(buf) != want:
        raise DecodeError("truncated" if len(buf) < want else "bad_shape",
                          f"tensor {name!r}: shape {list(shape)} of {datatype} needs {want} bytes, got {len(buf)}")
    arr = np.frombuffer(buf, dtype=dt)
    if datatype == BF16:   # the upper 16 bits of an FP32: widened exactly
        arr = (arr.astype(np.uint32) << np.uint32(16)).view(_FLOAT32)
    return arr.reshape(shape)


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
