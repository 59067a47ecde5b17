"""KServe v1 (TF-Serving style): `{"instances": [...]}` in, `{"predictions": [...]}` out."""

from __future__ import annotations

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
    combine_outputs,
    input_batch,
    load_json_object,
    numeric_array,
    score_matrix,
)
from sentinel.protocols.images import b64_bytes, image_batch, looks_like_image

SCORE_KEYS = ("probabilities", "scores", "logits")


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of nested lists (None when ragged or not numbers-like)."""
    try:
        return tuple(np.shape(value))
    except (ValueError, TypeError):
        return None


def _is_tensor(value: Any) -> bool:
    """Numbers, lists of them, or an encoded image `{"b64": ...}`: what a model input can be."""
    if isinstance(value, dict):
        return "b64" in value
    return isinstance(value, (list, int, float)) and not isinstance(value, bool)


def _pick_key(first: dict[str, Any], hints: DecodeHints, columnar: bool, what: str) -> str:
    """Which named input of a row (or columnar) instance is the model's: the only one, the one
    with the model's input shape, or the only one that holds numbers or an image."""
    keys = list(first)
    if len(keys) == 1:
        return keys[0]
    candidates = [k for k in keys if _is_tensor(first[k])]
    shapes = {s for s in (hints.raw_shape, hints.input_shape) if s}
    for k in candidates:
        shape = _shape(first[k])
        if shape is not None and (shape[1:] if columnar else shape) in shapes:
            return k
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(repr(k)[:40] for k in keys[:6])
    raise DecodeError("unsupported", f"{what} name several inputs ({names}) and none has the model's input "
                                     "shape; sentinel cannot tell which one the model reads")


def _rows(doc: dict[str, Any], hints: DecodeHints) -> list[Any]:
    """The instances of a v1 request: row format `instances` (plain or `{"name": value}` objects), or
    columnar `inputs` (a list, or `{"name": batch}`)."""
    rows = doc.get("instances", doc.get("inputs"))
    if isinstance(rows, dict) and "b64" in rows and "instances" not in doc:
        rows = [rows]   # columnar `{"inputs": {"b64": ...}}`: one image, TF Serving's batch-less string input
    if isinstance(rows, dict) and "b64" not in rows and "instances" not in doc:   # columnar, named
        if not rows:
            raise DecodeError("missing_field", "'inputs' is an empty object")
        rows = rows[_pick_key(rows, hints, True, "'inputs'")]
        if not isinstance(rows, list):
            raise DecodeError("bad_shape", "the columnar input is not a list (a batch)")
    if not isinstance(rows, list) or not rows:
        raise DecodeError("missing_field", "no non-empty 'instances' list in body")
    if isinstance(rows[0], dict) and "b64" not in rows[0]:   # row format, named inputs
        keys = set(rows[0])
        if not all(isinstance(r, dict) and set(r) == keys for r in rows):
            raise DecodeError("bad_shape", "instances are objects naming different inputs")
        if not keys:
            raise DecodeError("missing_field", "instances are empty objects")
        key = _pick_key(rows[0], hints, False, "instances")
        rows = [r[key] for r in rows]
    return rows


def _one_image(row: Any) -> Any:
    """An instance that is one `{"b64": ...}` image nested in lists (`[{"b64": ...}]`, an N×1 string
    input) is that image; several images in one instance are unsupported; anything else is as it is."""
    if not isinstance(row, list):
        return row
    leaves: list[Any] = []
    stack = [row]
    while stack and len(leaves) < 2:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            leaves.append(item)
    if not leaves or not isinstance(leaves[0], dict) or "b64" not in leaves[0]:
        return row
    if len(leaves) > 1 or stack:
        raise DecodeError("unsupported", "an instance holds several b64 images; sentinel reads one image per instance")
    return leaves[0]


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """The batch under `instances` (or `inputs`); `{"b64": ...}` items are decoded images."""
    doc = load_json_object(body)
    rows = [_one_image(r) for r in _rows(doc, hints)]
    if all(isinstance(r, dict) and "b64" in r for r in rows):
        try:
            blobs = [b64_bytes(r["b64"]) for r in rows]
        except (binascii.Error, TypeError, ValueError) as exc:
            raise DecodeError("bad_image", f"instances carry invalid base64: {exc}") from None
        if not all(looks_like_image(b) for b in blobs):   # audio, text, serialized tensors...
            raise DecodeError("unsupported", "b64 instances that are not encoded images")
        return image_batch(blobs, hints)
    arr = numeric_array(rows, "instances")
    return input_batch(arr, hints)


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """The scores under `predictions` (or TF Serving's `outputs`); `{"probabilities"|"scores"|"logits": [...]}`
    items keep each kind. Prediction objects or columnar `{"name": batch}` outputs under other names
    are read like several OIP outputs: the one with the model's class count, else named like scores."""
    doc = load_json_object(body)
    preds = doc.get("predictions", doc.get("outputs"))
    if isinstance(preds, dict) and preds:   # columnar, named: {"outputs": {"scores": [[...]], "classes": [...]}}
        preds = _columnar_rows(preds)
    if not isinstance(preds, list) or not preds:
        raise DecodeError("missing_field", "no non-empty 'predictions' list in body")
    if all(isinstance(p, dict) for p in preds):
        found = {key: numeric_array([p[key] for p in preds], f"predictions' {key}")
                 for key in SCORE_KEYS if all(key in p for p in preds)}
        if not found:
            return _other_named(preds, hints)
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


def _columnar_rows(cols: dict[str, Any]) -> list[dict[str, Any]]:
    """Columnar named outputs (each a batch) as one object per row, like row-format predictions."""
    batches = list(cols.values())
    if not all(isinstance(b, list) for b in batches) or len({len(b) for b in batches}) != 1:
        raise DecodeError("bad_shape", "columnar outputs are not batches of one size")
    return [dict(zip(cols, row, strict=True)) for row in zip(*batches, strict=True)]


def _other_named(preds: list[dict[str, Any]], hints: DecodeHints) -> DecodedResponse:
    """Prediction objects whose score vectors have other names (a Keras layer name, `output_0`...):
    every name every row has with a vector per row; one value per row (a class id) is not scores."""
    named: list[tuple[str, np.ndarray]] = []
    for key in preds[0]:
        if not all(key in p for p in preds):
            continue
        try:
            arr = numeric_array([p[key] for p in preds], f"predictions' {key}")
        except DecodeError:
            continue
        if arr.ndim >= 2:
            named.append((str(key), arr))
    if not named:
        raise DecodeError("unsupported", "prediction objects carry no score vectors "
                                         "(probabilities, scores, logits or another per-class list)")
    return combine_outputs(named, hints)


def encode_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """`{"instances": x}` (x batch-first)."""
    body = json.dumps({"instances": np.asarray(x).tolist()}, separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}


def encode_response(scores: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """`{"predictions": scores}` (N × classes)."""
    body = json.dumps({"predictions": np.asarray(scores).tolist()}, separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}
