"""TorchServe inference API: `POST /predictions/{name}`, an image, JSON or raw tensor bytes in, JSON out."""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import (
    MAX_ELEMENTS,
    NO_HINTS,
    DecodedRequest,
    DecodedResponse,
    DecodeHints,
    Headers,
    as_output_batch,
    first_instance_shape,
    input_form,
    numeric_array,
    parse_json,
)
from sentinel.protocols.images import decode_images, looks_like_image
from sentinel.protocols.tensors import numel

OCTET_STREAM = "application/octet-stream"
RAW_DTYPES = ("float32", "float16", "uint8", "int64")


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """An image file body; raw tensor bytes (octet-stream, shaped by the hints); or JSON: a (batch of)
    tensors, or `{"data"|"instances"|"input"|"inputs": ...}`."""
    if looks_like_image(body):
        return DecodedRequest(decode_images([body], hints.image_pixel_limit), "raw")
    if headers.get("content-type", "").split(";", 1)[0].strip().lower() == OCTET_STREAM:
        return DecodedRequest(*_raw_tensor(body, hints))
    doc: Any = parse_json(body, "body (neither an image nor raw tensor bytes)")
    if isinstance(doc, dict):
        for key in ("data", "instances", "input", "inputs"):
            if key in doc:
                doc = doc[key]
                break
        else:
            raise DecodeError("missing_field", "JSON object has no data, instances or input field")
    arr = numeric_array(doc, "input")
    arr = first_instance_shape(arr, hints.raw_shape)
    return DecodedRequest(arr, input_form(arr))


def _raw_tensor(body: bytes, hints: DecodeHints) -> tuple[np.ndarray, Literal["raw", "network"]]:
    """A flat little-endian array of the hints' raw dtype, shaped N × raw_shape."""
    if hints.raw_shape is None:
        raise DecodeError("unsupported", "raw application/octet-stream tensor, but the model's raw input "
                                         "shape is not configured (model.yaml raw_input or the config's "
                                         "models[].raw_input)")
    if hints.raw_dtype not in RAW_DTYPES:
        raise DecodeError("bad_datatype", f"raw input dtype {hints.raw_dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    dt = np.dtype(hints.raw_dtype).newbyteorder("<")
    per = numel(hints.raw_shape) * dt.itemsize
    if per == 0 or len(body) == 0 or len(body) % per:
        raise DecodeError("bad_shape", f"raw tensor of {len(body)} bytes is not a whole number of "
                                       f"{hints.raw_dtype} instances of shape {list(hints.raw_shape)} ({per} bytes each)")
    if len(body) // dt.itemsize > MAX_ELEMENTS:
        raise DecodeError("too_large", f"raw tensor holds more than {MAX_ELEMENTS} elements")
    arr = np.frombuffer(body, dtype=dt).reshape((-1, *hints.raw_shape))
    return arr, "raw"


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """Scores as a list (one request) or a list of lists (a batch).

    The stock image classifier answers its top-k as `{class: probability}`: with the hints'
    classes given (replay), that answer is read as the top-1 class name (`labels`, outputs N × 0);
    without (analysis) it is refused, since it is not a score vector.
    """
    doc: Any = parse_json(body)
    if isinstance(doc, list) and doc and all(isinstance(d, dict) for d in doc):
        rows = doc
    elif isinstance(doc, dict):
        rows = [doc]
    else:
        return as_output_batch(numeric_array(doc, "response scores"))
    classes = hints.classes
    if not classes:
        raise DecodeError("unsupported", "response is a {class: score} mapping (top-k), not a score vector")
    labels = []
    for row in rows:
        try:
            scored = {str(k): float(v) for k, v in row.items()}
        except (TypeError, ValueError):
            raise DecodeError("bad_datatype", f"cannot read class scores from keys {sorted(map(str, row))[:5]}") from None
        if not scored:
            raise DecodeError("missing_field", "empty {class: score} mapping")
        best = max(scored, key=scored.__getitem__)
        if best not in classes:
            raise DecodeError("unsupported", f"class {best[:80]!r} in the response is not among the model's classes")
        labels.append(best)
    return DecodedResponse(np.zeros((len(rows), 0)), "probabilities", labels=tuple(labels))


def encode_request(x: np.ndarray, *, raw: bool = False) -> tuple[bytes, dict[str, str]]:
    """JSON instance(s), or (raw=True) the array's little-endian bytes as application/octet-stream."""
    x = np.asarray(x)
    if raw:
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes(), {"content-type": OCTET_STREAM}
    return json.dumps(x.tolist(), separators=(",", ":")).encode(), {"content-type": "application/json"}


def encode_response(scores: np.ndarray, *, single: bool = False) -> tuple[bytes, dict[str, str]]:
    """Scores as JSON: one row for a single instance, else a list of rows."""
    s = np.asarray(scores)
    body = json.dumps((s[0] if single else s).tolist(), separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}
