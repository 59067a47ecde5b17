"""Values and errors shared by the wire-format decoders."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

InputForm = Literal["raw", "network"]
OutputKind = Literal["logits", "probabilities"]
Headers = Mapping[str, str]   # lower-case names

DecodeErrorKind = Literal[
    "malformed_json", "missing_field", "bad_shape", "bad_datatype", "truncated",
    "bad_header", "unsupported", "bad_image",
]


class DecodeError(ValueError):
    """A payload that cannot be turned into arrays; `kind` is a short label for metrics."""

    def __init__(self, kind: DecodeErrorKind, message: str):
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class DecodedRequest:
    """The input batch of one inference request (batch-first)."""

    inputs: np.ndarray
    form: InputForm


@dataclass(frozen=True)
class DecodedResponse:
    """The output batch of one inference response (N × classes)."""

    outputs: np.ndarray
    kind: OutputKind


def input_form(arr: np.ndarray) -> InputForm:
    """`network` for float N×C×H×W tensors (already preprocessed), else `raw`."""
    return "network" if arr.ndim == 4 and arr.dtype.kind == "f" else "raw"


def as_output_batch(arr: np.ndarray, name: str = "") -> DecodedResponse:
    """Shape scores as N × classes and tell logits from probabilities."""
    if arr.dtype.kind not in "fiu":
        raise DecodeError("bad_datatype", f"output {name or '(unnamed)'} is {arr.dtype}, not numeric scores")
    if arr.ndim == 0 or arr.size == 0:
        raise DecodeError("bad_shape", f"output shape {list(arr.shape)} holds no scores")
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim > 2:
        # e.g. N×C×1×1 from a conv head: squeeze trailing singleton axes only
        squeezed = arr.reshape(arr.shape[0], -1)
        if squeezed.shape[1] != arr.shape[1]:
            raise DecodeError("bad_shape", f"output shape {list(arr.shape)} is not N × classes")
        arr = squeezed
    if arr.shape[1] < 2:
        raise DecodeError("bad_shape", f"output shape {list(arr.shape)} has fewer than 2 classes "
                                       "(class labels rather than scores?)")
    out = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(out)):
        raise DecodeError("bad_shape", "output contains NaN or infinite scores")
    lname = name.lower()
    if "prob" in lname or "softmax" in lname:
        kind: OutputKind = "probabilities"
    elif "logit" in lname:
        kind = "logits"
    else:
        # Probabilities are non-negative and sum to one per row; logits almost never are.
        sums = out.sum(axis=1)
        kind = "probabilities" if (out.min() >= 0 and out.max() <= 1 and np.allclose(sums, 1.0, atol=1e-3)) \
            else "logits"
    return DecodedResponse(out, kind)


def load_json_object(body: bytes | memoryview) -> dict[str, Any]:
    """Parse a JSON object body, or raise DecodeError("malformed_json") saying what it was instead."""
    try:
        doc = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("malformed_json", f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("malformed_json", f"body is a JSON {type(doc).__name__}, expected an object")
    return doc
