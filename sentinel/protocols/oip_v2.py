"""Open Inference Protocol v2 (KServe v2, Triton): JSON and the binary tensor extension."""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np

from sentinel.protocols import tensors
from sentinel.protocols.base import (
    DecodedRequest,
    DecodedResponse,
    DecodeError,
    Headers,
    as_output_batch,
    input_form,
    load_json_object,
)
from sentinel.protocols.images import decode_images, looks_like_image

HEADER_LENGTH = "inference-header-content-length"


def parse_message(body: bytes, headers: Headers, key: Literal["inputs", "outputs"]) -> list[tuple[str, np.ndarray]]:
    """Every tensor under `key` of a request or response, as (name, array), in order."""
    hlen_s = headers.get(HEADER_LENGTH)
    if hlen_s is not None:
        try:
            hlen = int(hlen_s)
        except ValueError:
            raise DecodeError("bad_header", f"{HEADER_LENGTH} is not an integer: {hlen_s!r}") from None
        if not 0 < hlen <= len(body):
            raise DecodeError("bad_header", f"{HEADER_LENGTH} is {hlen} but the body has {len(body)} bytes")
        head, rest = body[:hlen], memoryview(body)[hlen:]
    else:
        head, rest = body, memoryview(b"")
    doc = load_json_object(head)
    items = doc.get(key)
    if not isinstance(items, list) or not items:
        raise DecodeError("missing_field", f"no {key!r} list in body")
    out: list[tuple[str, np.ndarray]] = []
    pos = 0
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise DecodeError("missing_field", f"{key}[{i}] is not an object")
        name = str(t.get("name", f"{key}[{i}]"))
        datatype = t.get("datatype")
        if not isinstance(datatype, str):
            raise DecodeError("missing_field", f"tensor {name!r}: no datatype")
        shape = tensors.check_shape(t.get("shape"), name)
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise DecodeError("bad_header", f"tensor {name!r}: binary_data_size must be a non-negative integer")
            if pos + size > len(rest):
                raise DecodeError("truncated", f"tensor {name!r}: binary_data_size {size} but only "
                                               f"{len(rest) - pos} bytes remain")
            arr = tensors.from_binary(rest[pos:pos + size], shape, datatype, name)
            pos += size
        elif "data" in t:
            arr = tensors.from_json(t["data"], shape, datatype, name)
        else:
            raise DecodeError("missing_field", f"tensor {name!r}: neither data nor binary_data_size")
        out.append((name, arr))
    if pos != len(rest):
        raise DecodeError("bad_shape", f"{len(rest) - pos} bytes of binary data left after the last tensor")
    return out


def decode_request(body: bytes, headers: Headers) -> DecodedRequest:
    """The input batch: the first input tensor (encoded images are decoded)."""
    name, arr = parse_message(body, headers, "inputs")[0]
    if arr.dtype == object:
        items = list(arr.reshape(-1))
        if not items or not all(looks_like_image(b) for b in items):
            raise DecodeError("unsupported", f"input {name!r}: BYTES that are not encoded images")
        return DecodedRequest(decode_images(items), "raw")
    if arr.ndim == 0:
        raise DecodeError("bad_shape", f"input {name!r} is a scalar, expected a batch")
    return DecodedRequest(arr, input_form(arr))


def decode_response(body: bytes, headers: Headers) -> DecodedResponse:
    """The output batch: the first numeric output with a class axis."""
    outs = parse_message(body, headers, "outputs")
    last: DecodeError | None = None
    for name, arr in outs:
        try:
            return as_output_batch(arr, name)
        except DecodeError as exc:
            last = exc
    assert last is not None
    raise last


def encode(tensors_: list[tuple[str, np.ndarray]], key: Literal["inputs", "outputs"] = "inputs",
           binary: bool = True, extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a v2 message (used by tests, the benchmark and replays)."""
    doc: dict[str, Any] = dict(extra or {})
    entries = []
    blobs = []
    for name, arr in tensors_:
        datatype, raw = tensors.to_binary(arr)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [b.decode("utf-8") if isinstance(b, bytes) else b for b in arr.reshape(-1)]
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    doc[key] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"content-type": "application/json"}
    if binary:
        headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + b"".join(blobs), headers
