"""KServe v1 (TF-Serving style): `{"instances": [...]}` in, `{"predictions": [...]}` out."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from sentinel.protocols.base import (
    DecodedRequest,
    DecodedResponse,
    DecodeError,
    Headers,
    as_output_batch,
    input_form,
    load_json_object,
)
from sentinel.protocols.images import decode_images


def _numeric(rows: list[Any], what: str) -> np.ndarray:
    try:
        arr = np.asarray(rows)
    except ValueError as exc:  # ragged nesting
        raise DecodeError("bad_shape", f"{what} are not a rectangular array: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DecodeError("bad_datatype", f"{what} are not numbers (dtype {arr.dtype})")
    return arr


def _unwrap(item: Any) -> Any:
    """A row-format instance `{"name": value}` → value; `{"b64": s}` stays as is."""
    if isinstance(item, dict) and "b64" not in item and len(item) >= 1:
        return next(iter(item.values()))
    return item


def decode_request(body: bytes, headers: Headers) -> DecodedRequest:
    """The batch under `instances` (or `inputs`); `{"b64": ...}` items are decoded images."""
    doc = load_json_object(body)
    rows = doc.get("instances", doc.get("inputs"))
    if not isinstance(rows, list) or not rows:
        raise DecodeError("missing_field", "no non-empty 'instances' list in body")
    rows = [_unwrap(r) for r in rows]
    if all(isinstance(r, dict) and "b64" in r for r in rows):
        try:
            blobs = [base64.b64decode(r["b64"], validate=True) for r in rows]
        except (binascii.Error, TypeError, ValueError) as exc:
            raise DecodeError("bad_image", f"instances carry invalid base64: {exc}") from None
        return DecodedRequest(decode_images(blobs), "raw")
    arr = _numeric(rows, "instances")
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return DecodedRequest(arr, input_form(arr))


def decode_response(body: bytes, headers: Headers) -> DecodedResponse:
    """The scores under `predictions` (also `{"probabilities"|"scores"|"logits": [...]}` items)."""
    doc = load_json_object(body)
    preds = doc.get("predictions", doc.get("outputs"))
    if not isinstance(preds, list) or not preds:
        raise DecodeError("missing_field", "no non-empty 'predictions' list in body")
    name = ""
    if all(isinstance(p, dict) for p in preds):
        for key in ("probabilities", "scores", "logits"):
            if all(key in p for p in preds):
                preds, name = [p[key] for p in preds], key
                break
        else:
            raise DecodeError("unsupported", "prediction objects carry no probabilities, scores or logits")
    arr = _numeric(preds, "predictions")
    if arr.ndim == 1:
        raise DecodeError("unsupported", "predictions are one value per instance (class labels), not scores")
    return as_output_batch(arr, name)
