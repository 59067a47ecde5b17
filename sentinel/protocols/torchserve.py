"""TorchServe inference API: `POST /predictions/{name}`, raw image bytes or JSON in, JSON out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from sentinel.protocols.base import (
    DecodedRequest,
    DecodedResponse,
    DecodeError,
    Headers,
    as_output_batch,
    input_form,
)
from sentinel.protocols.images import decode_images, looks_like_image


def decode_request(body: bytes, headers: Headers) -> DecodedRequest:
    """An image file body, or JSON: a (batch of) tensors, or `{"data"|"instances"|"input": ...}`."""
    if looks_like_image(body):
        return DecodedRequest(decode_images([body]), "raw")
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("malformed_json", f"body is neither an image nor JSON: {exc}") from None
    if isinstance(doc, dict):
        for key in ("data", "instances", "input", "inputs"):
            if key in doc:
                doc = doc[key]
                break
        else:
            raise DecodeError("missing_field", "JSON object has no data, instances or input field")
    try:
        arr = np.asarray(doc)
    except ValueError as exc:
        raise DecodeError("bad_shape", f"input is not a rectangular array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf" or arr.ndim == 0:
        raise DecodeError("bad_datatype", "input is not a numeric array")
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return DecodedRequest(arr, input_form(arr))


def decode_response(body: bytes, headers: Headers) -> DecodedResponse:
    """Scores as a list (one request) or a list of lists (a batch)."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("malformed_json", f"body is not JSON: {exc}") from None
    if isinstance(doc, dict):
        # the stock image_classifier handler answers with top-k {class: probability}; not a full vector
        raise DecodeError("unsupported", "response is a {class: score} mapping (top-k), not a score vector")
    try:
        arr = np.asarray(doc)
    except ValueError as exc:
        raise DecodeError("bad_shape", f"response is not a rectangular array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DecodeError("bad_datatype", "response is not numeric scores")
    return as_output_batch(arr)
