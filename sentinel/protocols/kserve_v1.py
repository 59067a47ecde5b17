"""KServe v1 (TF-Serving style): `{"instances": [...]}` in, `{"predictions": [...]}` out."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import (
    NO_HINTS,
    DecodedRequest,
    DecodedResponse,
    DecodeHints,
    Headers,
    as_output_batch,
    input_form,
    load_json_object,
    numeric_array,
    score_matrix,
)
from sentinel.protocols.images import decode_images

SCORE_KEYS = ("probabilities", "scores", "logits")


def _unwrap(item: Any) -> Any:
    """A row-format instance `{"name": value}` → value; `{"b64": s}` stays as is."""
    if isinstance(item, dict) and "b64" not in item and len(item) >= 1:
        return next(iter(item.values()))
    return item


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
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
        return DecodedRequest(decode_images(blobs, hints.image_pixel_limit), "raw")
    arr = numeric_array(rows, "instances")
    return DecodedRequest(arr, input_form(arr))


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """The scores under `predictions`; `{"probabilities"|"scores"|"logits": [...]}` items keep each kind."""
    doc = load_json_object(body)
    preds = doc.get("predictions", doc.get("outputs"))
    if not isinstance(preds, list) or not preds:
        raise DecodeError("missing_field", "no non-empty 'predictions' list in body")
    if all(isinstance(p, dict) for p in preds):
        found = {key: numeric_array([p[key] for p in preds], f"predictions' {key}")
                 for key in SCORE_KEYS if all(key in p for p in preds)}
        if not found:
            raise DecodeError("unsupported", "prediction objects carry no probabilities, scores or logits")
        first_key, first = next(iter(found.items()))
        primary = as_output_batch(first, first_key)
        logits = score_matrix(found["logits"], "logits") if "logits" in found else primary.logits
        probs = (score_matrix(found["probabilities"], "probabilities") if "probabilities" in found
                 else primary.probabilities)
        return DecodedResponse(primary.outputs, primary.kind, logits=logits, probabilities=probs)
    arr = numeric_array(preds, "predictions")
    if arr.ndim == 1:
        raise DecodeError("unsupported", "predictions are one value per instance (class labels), not scores")
    return as_output_batch(arr)


def encode_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """`{"instances": x}` (x batch-first)."""
    body = json.dumps({"instances": np.asarray(x).tolist()}, separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}


def encode_response(scores: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """`{"predictions": scores}` (N × classes)."""
    body = json.dumps({"predictions": np.asarray(scores).tolist()}, separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}
