"""Open Inference Protocol v2 over gRPC: `ModelInferRequest`/`ModelInferResponse` bytes ↔ arrays.

The messages of `inference.GRPCInferenceService` (KServe `grpc_predict_v2.proto`, Triton
`grpc_service.proto`) are read and written here by hand, from the protobuf wire format
(varints, length-delimited fields), so the analysis worker needs neither grpcio nor
generated code. Field numbers:

    ModelInferRequest   1 model_name  2 model_version  3 id  4 parameters (map)
                        5 inputs (InferInputTensor)  6 outputs (requested)  7 raw_input_contents
    ModelInferResponse  1 model_name  2 model_version  3 id  4 parameters (map)
                        5 outputs (InferOutputTensor)  6 raw_output_contents
    Infer{Input,Output}Tensor  1 name  2 datatype  3 shape (int64, packed)  4 parameters  5 contents
    InferTensorContents  1 bool  2 int32  3 int64  4 uint32  5 uint64  6 fp32  7 fp64  8 bytes
    InferParameter       1 bool  2 int64  3 string  4 double  5 uint64 (oneof)
    ModelStreamInferResponse  1 error_message  2 infer_response (Triton's stream)

When `raw_*_contents` is present it holds one entry per tensor, in order, as little-endian
row-major bytes (BYTES elements with a 4-byte length prefix), and typed `contents` are
not used. Unknown fields are skipped, as protobuf requires, and so is a known field sent
with a wire type other than its own (protobuf keeps it as an unknown field: the server never
reads it); a message field sent twice is merged (its repeated fields concatenated), as
protobuf parsers do.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols import tensors
from sentinel.protocols.base import (
    NO_HINTS,
    DecodedRequest,
    DecodedResponse,
    DecodeHints,
    Headers,
    combine_outputs,
)
from sentinel.protocols.varint import VarintError, read_varint

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# datatype → (InferTensorContents field, element dtype of that field on the wire)
_CONTENTS: dict[str, tuple[int, str]] = {
    "BOOL": (1, "varint"),
    "INT8": (2, "varint"), "INT16": (2, "varint"), "INT32": (2, "varint"), "INT64": (3, "varint"),
    "UINT8": (4, "varint"), "UINT16": (4, "varint"), "UINT32": (4, "varint"), "UINT64": (5, "varint"),
    "FP32": (6, "<f4"), "FP64": (7, "<f8"), "BYTES": (8, "bytes"),
}


# --- protobuf wire format --------------------------------------------------------------
def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    try:
        return read_varint(buf, pos)
    except VarintError as exc:
        raise DecodeError("truncated" if exc.truncated else "unsupported", str(exc)) from None


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of every top-level field; LENGTH values are memoryviews."""
    mv = memoryview(buf)
    pos, n = 0, len(mv)
    while pos < n:
        key, pos = _varint(mv, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise DecodeError("unsupported", f"field number 0 at byte {pos}")
        val: int | memoryview
        if wt == VARINT:
            val, pos = _varint(mv, pos)
        elif wt == LENGTH:
            size, pos = _varint(mv, pos)
            if pos + size > n:
                raise DecodeError("truncated", f"field {num} claims {size} bytes, {n - pos} remain")
            val, pos = mv[pos:pos + size], pos + size
        elif wt == FIXED64:
            if pos + 8 > n:
                raise DecodeError("truncated", f"field {num}: fixed64 cut short")
            val, pos = mv[pos:pos + 8], pos + 8
        elif wt == FIXED32:
            if pos + 4 > n:
                raise DecodeError("truncated", f"field {num}: fixed32 cut short")
            val, pos = mv[pos:pos + 4], pos + 4
        else:
            raise DecodeError("unsupported", f"field {num}: wire type {wt} (groups) is not used by this protocol")
        yield num, wt, val


def _text(val: Any, what: str) -> str:
    if not isinstance(val, memoryview):
        raise DecodeError("missing_field", f"{what} is not a string field")
    try:
        return bytes(val).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("bad_header", f"{what} is not UTF-8") from None


def _varints(buf: memoryview) -> np.ndarray:
    """A packed run of varints as uint64 (vectorised: no Python loop per element)."""
    a = np.frombuffer(buf, dtype=np.uint8)
    if a.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if a[-1] & 0x80:
        raise DecodeError("truncated", "packed varints end inside a value")
    ends = np.flatnonzero(a < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise DecodeError("unsupported", "varint longer than 10 bytes")
    pos_in_value = np.arange(a.size) - np.repeat(starts, lengths)
    parts = (a & 0x7F).astype(np.uint64) << (7 * pos_in_value).astype(np.uint64)
    return np.add.reduceat(parts, starts)


_U64 = (1 << 64) - 1
# The wire type of one element of a repeated scalar field of each kind (a packed run is LENGTH).
_ELEMENT_WIRE_TYPE = {"varint": VARINT, "<f4": FIXED32, "<f8": FIXED64}


def _repeated_scalar(pieces: list[tuple[int, Any]], kind: str) -> np.ndarray:
    """Values of a repeated scalar field given as packed runs and/or single elements.

    A piece of another wire type (an fp32 element sent as a varint or fixed64) is not this
    field's to protobuf, which keeps it as an unknown field: it is skipped here too, never
    read as values (nor as a length: `bytes(int)` would allocate that many bytes)."""
    own = _ELEMENT_WIRE_TYPE[kind]
    pieces = [(wt, v) for wt, v in pieces if wt in (own, LENGTH)]
    if kind == "varint":
        # one element: its low 64 bits (a 10-byte varint holds 70), as protobuf keeps
        chunks = [_varints(v) if wt == LENGTH else np.array([v & _U64], dtype=np.uint64) for wt, v in pieces]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)
    dt = np.dtype(kind)
    raw = b"".join(bytes(v) for _, v in pieces)
    if len(raw) % dt.itemsize:
        raise DecodeError("truncated", f"{len(raw)} bytes of {dt} values")
    return np.frombuffer(raw, dtype=dt)


def _write_varint(out: bytearray, v: int) -> None:
    v &= (1 << 64) - 1   # negative int64 as two's complement, as protobuf does
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _key(out: bytearray, num: int, wt: int) -> None:
    _write_varint(out, (num << 3) | wt)


def _bytes_field(out: bytearray, num: int, data: bytes) -> None:
    _key(out, num, LENGTH)
    _write_varint(out, len(data))
    out += data


def _str_field(out: bytearray, num: int, s: str) -> None:
    if s:
        _bytes_field(out, num, s.encode())


# --- messages ------------------------------------------------------------------------
@dataclass(frozen=True)
class InferMessage:
    """A decoded ModelInferRequest or ModelInferResponse: header fields and tensors in order."""

    model_name: str
    model_version: str = ""
    id: str = ""
    tensors: tuple[tuple[str, np.ndarray], ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    requested_outputs: tuple[str, ...] = ()


def _parameter(buf: memoryview) -> tuple[str, Any]:
    key: str = ""
    value: bool | int | float | str | None = None
    for num, wt, val in fields(buf):
        if num == 1 and wt == LENGTH:
            key = _text(val, "parameter key")
        elif num == 2 and wt == LENGTH:
            for pnum, pwt, pval in fields(val):
                if pnum == 1 and pwt == VARINT:
                    value = bool(pval)
                elif pnum == 2 and pwt == VARINT:
                    value = pval - (1 << 64) if pval >= 1 << 63 else pval
                elif pnum == 3 and pwt == LENGTH:
                    value = _text(pval, f"parameter {key!r}")
                elif pnum == 4 and pwt == FIXED64:
                    value = struct.unpack("<d", pval)[0]
                elif pnum == 5 and pwt == VARINT:
                    value = pval
    return key, value


@dataclass
class _Tensor:
    name: str = ""
    datatype: str = ""
    shape: list[int] = field(default_factory=list)
    contents: memoryview | bytes | None = None
    shared_region: str | None = None   # the tensor's data is in this shared-memory region


def _tensor(buf: memoryview, index: int, what: str) -> _Tensor:
    t = _Tensor(name=f"{what}[{index}]")
    shape_pieces: list[tuple[int, Any]] = []
    contents: list[memoryview] = []
    for num, wt, val in fields(buf):
        if num == 1 and wt == LENGTH:
            t.name = _text(val, f"{what}[{index}].name")
        elif num == 2 and wt == LENGTH:
            t.datatype = _text(val, f"{what}[{index}].datatype")
        elif num == 3 and wt in (VARINT, LENGTH):
            shape_pieces.append((wt, val))
        elif num == 4 and wt == LENGTH:
            key, value = _parameter(val)
            if key == "shared_memory_region":
                t.shared_region = str(value)
        elif num == 5 and wt == LENGTH:
            contents.append(val)
    if contents:
        # `contents` sent more than once is one message to protobuf (merged: its repeated fields
        # concatenated, which is what parsing the encodings one after the other gives); joined once
        t.contents = contents[0] if len(contents) == 1 else b"".join(contents)
    dims = _repeated_scalar(shape_pieces, "varint").astype(np.int64)   # int64: wraps negatives back
    t.shape = [int(d) for d in dims]
    return t


def _from_contents(t: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
    spec = _CONTENTS.get(t.datatype)
    if spec is None:
        if t.datatype in tensors.DATATYPES:
            raise DecodeError("unsupported", f"tensor {t.name!r}: {t.datatype} travels only in raw contents")
        raise DecodeError("bad_datatype", f"tensor {t.name!r}: unknown datatype {t.datatype!r}")
    want, kind = spec
    pieces: list[tuple[int, Any]] = []
    items: list[bytes] = []
    for num, wt, val in fields(t.contents if t.contents is not None else b""):
        if num != want:
            continue
        if kind == "bytes":
            if wt == LENGTH:   # another wire type is an unknown field to protobuf (bytes(int) would allocate int bytes)
                items.append(bytes(val))
        else:
            pieces.append((wt, val))
    if kind == "bytes":
        if len(items) != tensors.numel(shape):
            raise DecodeError("bad_shape", f"tensor {t.name!r}: shape {list(shape)} needs "
                                           f"{tensors.numel(shape)} elements, contents have {len(items)}")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    values = _repeated_scalar(pieces, kind)
    if kind == "varint":
        dt = tensors.DTYPES[t.datatype]
        # Each varint as protobuf reads it into the field's own type: int_contents (int32) and
        # uint_contents (uint32) keep the low 32 bits (a negative int32 may be sent in 5 bytes or
        # 10), bool_contents is true for any non-zero value; int64/uint64 keep all 64 bits
        if want == 1:
            values = values != 0
        elif want == 2:
            values = (values & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32).astype(np.int64)
        elif want == 4:
            values = values & np.uint64(0xFFFFFFFF)
        elif dt.kind == "i":
            values = values.astype(np.int64)   # the sign of int64 on the wire
        if values.size and dt.kind != "b":
            # INT8/INT16 travel as int32, UINT8/UINT16 as uint32: a value the datatype cannot
            # hold is refused, never wrapped into a different tensor (servers differ there)
            lo, hi = int(values.min()), int(values.max())
            info = np.iinfo(dt)
            if lo < info.min or hi > info.max:
                raise DecodeError("bad_datatype", f"tensor {t.name!r}: {t.datatype} contents hold values "
                                                  f"from {lo} to {hi}, beyond its range")
        values = values.astype(dt)
    if values.size != tensors.numel(shape):
        raise DecodeError("bad_shape", f"tensor {t.name!r}: shape {list(shape)} needs {tensors.numel(shape)} "
                                       f"elements, contents have {values.size}")
    return values.reshape(shape)


def parse(body: bytes | memoryview, kind: str = "request") -> InferMessage:
    """A ModelInferRequest (`kind="request"`) or ModelInferResponse (`"response"`) from its bytes."""
    is_req = kind == "request"
    tensor_field, raw_field = (5, 7) if is_req else (5, 6)
    what = "inputs" if is_req else "outputs"
    name = version = rid = ""
    params: dict[str, Any] = {}
    specs: list[_Tensor] = []
    raws: list[memoryview] = []
    requested: list[str] = []
    for num, wt, val in fields(body):
        if wt != LENGTH:
            continue
        if num == 1:
            name = _text(val, "model_name")
        elif num == 2:
            version = _text(val, "model_version")
        elif num == 3:
            rid = _text(val, "id")
        elif num == 4:
            k, v = _parameter(val)
            params[k] = v
        elif num == tensor_field:
            specs.append(_tensor(val, len(specs), what))
        elif num == raw_field:
            raws.append(val)
        elif is_req and num == 6:
            for onum, owt, oval in fields(val):
                if onum == 1 and owt == LENGTH:
                    requested.append(_text(oval, "outputs[].name"))
    in_shm = [t.shared_region is not None and t.contents is None for t in specs]
    if raws and len(raws) != len(specs) - sum(in_shm):
        typed = [t.name for t in specs if t.contents is not None]
        if typed:   # the spec: with raw contents, no tensor may carry typed `contents` (Triton refuses too)
            raise DecodeError("bad_shape", f"{len(raws)} raw contents for {len(specs)} {what}, with "
                                           f"typed contents in {', '.join(map(repr, typed[:4]))}: a message "
                                           "sends every tensor raw or none (OIP gRPC raw_*_contents)")
        raise DecodeError("bad_shape", f"{len(raws)} raw contents for {len(specs)} {what}")
    out: list[tuple[str, np.ndarray]] = []
    shared: DecodeError | None = None
    raw_index = 0
    for i, t in enumerate(specs):
        if not t.datatype:
            raise DecodeError("missing_field", f"tensor {t.name!r}: no datatype")
        if in_shm[i]:
            # like the HTTP decoder: a request's input in shared memory is refused; a response's
            # output in shared memory is left out, its other outputs may still be read
            from sentinel.protocols.oip_v2 import shared_memory_error

            shared = shared_memory_error(t.name, t.shared_region)
            if is_req:
                raise shared
            continue
        shape = tensors.check_shape(t.shape, t.name)
        if raws:
            arr = tensors.from_binary(raws[raw_index], shape, t.datatype, t.name)
            raw_index += 1
        else:
            arr = _from_contents(t, shape)
        out.append((t.name, arr))
    if not out and shared is not None:
        raise shared
    return InferMessage(name, version, rid, tuple(out), params, tuple(requested))


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """The input batch of a ModelInferRequest: its first input tensor (encoded images decoded)."""
    from sentinel.protocols.oip_v2 import request_from_tensors

    msg = parse(body, "request")
    if not msg.tensors:
        raise DecodeError("missing_field", "ModelInferRequest has no inputs")
    return request_from_tensors(msg.tensors, hints)


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """The output batch of a ModelInferResponse: the first numeric output with a class axis
    (a logits and a probabilities output both kept)."""
    msg = parse(body, "response")
    if not msg.tensors:
        raise DecodeError("missing_field", "ModelInferResponse has no outputs")
    return combine_outputs(list(msg.tensors), hints)


def _param_entry(key: str, value: Any) -> bytes:
    p = bytearray()
    if isinstance(value, bool):
        _key(p, 1, VARINT)
        _write_varint(p, int(value))
    elif isinstance(value, int):
        _key(p, 2, VARINT)
        _write_varint(p, value)
    elif isinstance(value, float):
        _key(p, 4, FIXED64)
        p += struct.pack("<d", value)
    else:
        _str_field(p, 3, str(value))
    e = bytearray()
    _str_field(e, 1, key)
    _bytes_field(e, 2, bytes(p))
    return bytes(e)


def _typed_contents(arr: np.ndarray, datatype: str) -> bytes:
    spec = _CONTENTS.get(datatype)
    if spec is None:
        raise ValueError(f"{datatype} has no typed contents field; send it raw")
    num, kind = spec
    c = bytearray()
    flat = arr.reshape(-1)
    if kind == "bytes":
        for item in flat:
            _bytes_field(c, num, item.encode() if isinstance(item, str) else bytes(item))
    elif kind == "varint":
        packed = bytearray()
        for v in flat.tolist():
            _write_varint(packed, int(v))
        _bytes_field(c, num, bytes(packed))
    else:
        _bytes_field(c, num, np.ascontiguousarray(flat, dtype=kind).tobytes())
    return bytes(c)


def encode(tensors_: Sequence[tuple[str, np.ndarray]], kind: str = "request", *, model_name: str = "",
           model_version: str = "", id: str = "", raw: bool = True, parameters: dict[str, Any] | None = None,
           requested_outputs: Sequence[str] = ()) -> bytes:
    """The bytes of a ModelInferRequest or ModelInferResponse (tests, replay, the benchmark).

    `raw=True` puts tensors in `raw_*_contents` (what `tritonclient.grpc` sends), else in typed
    `contents` (FP16 and BF16 have none and are always sent raw).
    """
    is_req = kind == "request"
    tensor_field, raw_field = (5, 7) if is_req else (5, 6)
    out = bytearray()
    _str_field(out, 1, model_name)
    _str_field(out, 2, model_version)
    _str_field(out, 3, id)
    for k, v in (parameters or {}).items():
        _bytes_field(out, 4, _param_entry(k, v))
    blobs: list[bytes] = []
    use_raw = raw or any(tensors.to_binary(np.asarray(a))[0] not in _CONTENTS for _, a in tensors_)
    for name, arr in tensors_:
        arr = np.asarray(arr)
        datatype, data = tensors.to_binary(arr)
        t = bytearray()
        _str_field(t, 1, name)
        _str_field(t, 2, datatype)
        if arr.ndim:
            packed = bytearray()
            for d in arr.shape:
                _write_varint(packed, d)
            _bytes_field(t, 3, bytes(packed))
        if use_raw:
            blobs.append(data)
        else:
            _bytes_field(t, 5, _typed_contents(arr, datatype))
        _bytes_field(out, tensor_field, bytes(t))
    if is_req:
        for name in requested_outputs:
            o = bytearray()
            _str_field(o, 1, name)
            _bytes_field(out, 6, bytes(o))
    for data in blobs:
        _bytes_field(out, raw_field, data)
    return bytes(out)


def stream_response(body: bytes | memoryview) -> tuple[str, memoryview | None]:
    """(error_message, ModelInferResponse bytes or None) of one ModelStreamInferResponse."""
    err, resp = "", None
    for num, wt, val in fields(body):
        if num == 1 and wt == LENGTH:
            err = _text(val, "error_message")
        elif num == 2 and wt == LENGTH:
            resp = val
    return err, resp


def encode_request(x: np.ndarray, *, input_name: str = "input", binary: bool = True, model_name: str = "",
                   request_id: str = "") -> tuple[bytes, dict[str, str]]:
    """A ModelInferRequest for batch `x` (the codec API of `sentinel.protocols.encode_request`).

    binary=True sends the tensor in `raw_input_contents` (as `tritonclient.grpc` does), False
    in typed `contents`. gRPC messages carry no headers: the second value is empty.
    """
    return encode([(input_name, np.asarray(x))], model_name=model_name, id=request_id, raw=binary), {}


def encode_response(outputs: Sequence[tuple[str, np.ndarray]], *, binary: bool = True, model_name: str = "",
                    request_id: str = "") -> tuple[bytes, dict[str, str]]:
    """A ModelInferResponse carrying named outputs (the inverse of decode_response)."""
    return encode(outputs, "response", model_name=model_name, id=request_id, raw=binary), {}
