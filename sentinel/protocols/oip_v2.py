"""Open Inference Protocol v2 (KServe v2, Triton) over HTTP: JSON and the binary tensor extension."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

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
    fitted,
    input_batch,
    json_object_prefix,
    load_json_object,
)
from sentinel.protocols.images import b64_images, image_batch, looks_like_image

HEADER_LENGTH = "inference-header-content-length"
_JSON_WS = b" \t\r\n"   # RFC 8259 whitespace
Key = Literal["inputs", "outputs"]


def split_body(body: bytes, headers: Headers) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensors after it.

    With `Inference-Header-Content-Length` the split is where it says; without it (a body
    relayed by the KServe logger) the JSON object is found by parsing its prefix.
    """
    head, rest, _ = _split(body, headers)
    return head, rest


def _split(body: bytes, headers: Headers) -> tuple[bytes, memoryview, dict[str, Any] | None]:
    """split_body, plus the header's object when finding the split already parsed it (else None)."""
    hlen_s = headers.get(HEADER_LENGTH)
    if hlen_s is not None:
        try:
            hlen = int(hlen_s)
        except ValueError:
            raise DecodeError("bad_header", f"{HEADER_LENGTH} is not an integer: {hlen_s[:40]!r}") from None
        if not 0 < hlen <= len(body):
            raise DecodeError("bad_header", f"{HEADER_LENGTH} is {hlen} but the body has {len(body)} bytes")
        return body[:hlen], memoryview(body)[hlen:], None
    hlen, doc = json_object_prefix(body)
    return body[:hlen], memoryview(body)[hlen:], doc


def shared_memory_error(name: str, region: Any) -> DecodeError:
    """The error for a tensor whose data lives in a shared-memory region instead of the message."""
    return DecodeError("unsupported", f"tensor {name!r}: its data is in shared-memory region {str(region)[:80]!r} "
                                      "(Triton's shared-memory extension); sentinel sees only the bytes on the wire")


def parse_message(body: bytes, headers: Headers, key: Key) -> list[tuple[str, np.ndarray]]:
    """Every tensor under `key` of a request or response, as (name, array), in order.

    A tensor in shared memory (`shared_memory_region`, no data in the message) is an
    "unsupported" DecodeError for a request; a response's are left out (its other outputs
    may still be read), and the error is raised only when no output is left.
    """
    head, rest, doc = _split(body, headers)
    if doc is None:
        doc = load_json_object(head)
    items = doc.get(key)
    if not isinstance(items, list) or not items:
        raise DecodeError("missing_field", f"no {key!r} list in body")
    out: list[tuple[str, np.ndarray]] = []
    shared: DecodeError | None = None
    pos = 0
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise DecodeError("missing_field", f"{key}[{i}] is not an object")
        name = str(t.get("name", f"{key}[{i}]"))[:200]
        datatype = t.get("datatype")
        if not isinstance(datatype, str):
            raise DecodeError("missing_field", f"tensor {name!r}: no datatype")
        shape = tensors.check_shape(t.get("shape"), name)
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if isinstance(params, dict) and "shared_memory_region" in params and size is None and "data" not in t:
            shared = shared_memory_error(name, params["shared_memory_region"])
            if key == "inputs":
                raise shared
            continue
        if size is not None and "data" in t:
            # Servers disagree on such a tensor: Triton reads the binary data, KServe the JSON `data`
            # (and leaves the binary bytes unread, so the tensors after it shift): refused, not guessed
            raise DecodeError("bad_header", f"tensor {name!r} has both JSON data and parameters.binary_data_size "
                                            f"({str(size)[:20]}); model servers differ on which one they read")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
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
    if pos != len(rest) and not (pos == 0 and not bytes(rest).strip(_JSON_WS)):
        # (no binary tensors and only whitespace after the object: a JSON body, which may end in any amount;
        # the one place trailing whitespace is judged, with or without the header length)
        raise DecodeError("bad_shape", f"{len(rest) - pos} bytes of binary data left after the last tensor")
    if not out and shared is not None:
        raise shared
    return out


def request_from_tensors(named: Sequence[tuple[str, np.ndarray]], hints: DecodeHints) -> DecodedRequest:
    """The input batch: the model's input tensor (encoded images are decoded within the hints' pixel bound).

    With several inputs, the first whose per-instance shape is the model's input shape (the
    hints' raw or network shape); without such a match, the first input.
    """
    name, arr = pick_input(named, hints)
    if arr.size == 0:
        raise DecodeError("bad_shape", f"input {name!r} of shape {list(arr.shape)} holds no values")
    if arr.dtype == object:
        items = list(arr.reshape(-1))
        if items and not all(looks_like_image(b) for b in items):
            items = b64_images(items) or []   # base64 text of images, as KServe's image examples send
        if not items:
            raise DecodeError("unsupported", f"input {name!r}: BYTES that are not encoded images "
                                             "(nor base64 text of images)")
        return image_batch(items, hints)
    if arr.ndim == 0:
        raise DecodeError("bad_shape", f"input {name!r} is a scalar, expected a batch")
    return input_batch(arr, hints)


def pick_input(named: Sequence[tuple[str, np.ndarray]], hints: DecodeHints) -> tuple[str, np.ndarray]:
    """The (name, tensor) that is the model's input: the first with the model's per-instance shape
    (where the hints know it), else the first BYTES input of encoded images, else the first."""
    if len(named) == 1:
        return named[0]
    shapes = {s for s in (hints.raw_shape, hints.input_shape) if s}
    for name, arr in named:
        if shapes and tuple(arr.shape[1:]) in shapes:
            return name, arr
    for name, arr in named:   # the model's input in another layout (N×1×8×8 for N×8×8)
        try:
            if shapes and arr.dtype != object and arr.size and fitted(arr, hints) is not None:
                return name, arr
        except DecodeError:
            continue
    for name, arr in named:
        if arr.dtype == object and arr.size and isinstance(first := arr.reshape(-1)[0], bytes) \
                and (looks_like_image(first) or b64_images([first])):
            return name, arr
    return named[0]


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """The input batch of a v2 infer request."""
    return request_from_tensors(parse_message(body, headers, "inputs"), hints)


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """The output batch: the first numeric output with a class axis (logits and probabilities both kept)."""
    return combine_outputs(parse_message(body, headers, "outputs"), hints)


def encode(named: Sequence[tuple[str, np.ndarray]], key: Key = "inputs", binary: bool = True,
           extra: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a v2 message: JSON `data`, or the binary extension after the JSON header."""
    doc: dict[str, Any] = dict(extra or {})
    entries = []
    blobs = []
    for name, arr in named:
        arr = np.asarray(arr)
        if binary:
            datatype, raw = tensors.to_binary(arr)
            entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}
            blobs.append(raw)
        else:
            datatype, data = tensors.to_json(arr)
            entry = {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}
        entries.append(entry)
    doc[key] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    if binary:
        return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head, {"content-type": "application/json"}


def encode_request(inputs: Sequence[tuple[str, np.ndarray]], *, binary: bool = False,
                   binary_outputs: bool | None = None) -> tuple[bytes, dict[str, str]]:
    """An infer request; `binary_outputs` asks the server for binary outputs (default: same as `binary`)."""
    want = binary if binary_outputs is None else binary_outputs
    extra = {"parameters": {"binary_data_output": True}} if want else None
    return encode(inputs, "inputs", binary, extra)


def encode_response(outputs: Sequence[tuple[str, np.ndarray]], *, binary: bool = False, model_name: str = "",
                    request_id: str = "") -> tuple[bytes, dict[str, str]]:
    """An infer response."""
    extra: dict[str, Any] = {"model_name": model_name}
    if request_id:
        extra["id"] = request_id
    return encode(outputs, "outputs", binary, extra)
