"""Request encoders and response decoders for the protocols replay speaks (pure: no I/O).

- OIP v2 (KServe v2, Triton): JSON, or the binary tensor extension
  (`Inference-Header-Content-Length`; little-endian row-major tensors after the JSON).
- KServe v1: `{"instances": [...]}` → `{"predictions": [...]}`.
- TorchServe: `POST /predictions/{name}` with the instance as JSON.
Outputs are recognised by name (probabilities/probs/softmax, logits); a lone unnamed
output is taken as probabilities when its rows are a distribution, else as logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Protocol = Literal["v2", "v1", "torchserve"]
PROTOCOLS: tuple[str, ...] = ("v2", "v1", "torchserve")

_PROB_NAMES = ("probabilities", "probs", "probability", "softmax", "scores", "output_probabilities")
_LOGIT_NAMES = ("logits", "logit", "output_logits")
_V2_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4"}


class DecodeError(ValueError):
    """A response body that does not carry the outputs we expect."""


@dataclass(frozen=True)
class Decoded:
    """What a response said about one sample."""

    top1: int
    probabilities: np.ndarray | None = None   # classes, float64
    logits: np.ndarray | None = None          # classes, float64


@dataclass(frozen=True)
class WireFormat:
    """How to ask one model for one prediction, and how to read the answer."""

    protocol: Protocol
    model: str
    binary: bool = False          # v2 binary tensor extension (request and response)
    input_name: str = "input"
    classes: tuple[str, ...] = ()  # to map TorchServe's {class: prob} answers

    @property
    def path(self) -> str:
        if self.protocol == "v2":
            return f"/v2/models/{self.model}/infer"
        if self.protocol == "v1":
            return f"/v1/models/{self.model}:predict"
        return f"/predictions/{self.model}"

    def encode(self, x: np.ndarray) -> tuple[dict[str, str], bytes]:
        """Headers and body asking for a prediction on one sample (sent as a batch of 1)."""
        x = np.asarray(x, dtype=np.float32)
        if self.protocol == "v2":
            shape = [1, *x.shape]
            if self.binary:
                data = x.astype("<f4").tobytes()
                head = json.dumps({
                    "inputs": [{"name": self.input_name, "shape": shape, "datatype": "FP32",
                                "parameters": {"binary_data_size": len(data)}}],
                    "parameters": {"binary_data_output": True},
                }, separators=(",", ":")).encode()
                return ({"Content-Type": "application/octet-stream",
                         "Inference-Header-Content-Length": str(len(head))}, head + data)
            body = {"inputs": [{"name": self.input_name, "shape": shape, "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            return {"Content-Type": "application/json"}, json.dumps(body, separators=(",", ":")).encode()
        if self.protocol == "v1":
            body = {"instances": [x.tolist()]}
            return {"Content-Type": "application/json"}, json.dumps(body, separators=(",", ":")).encode()
        return {"Content-Type": "application/json"}, json.dumps(x.tolist(), separators=(",", ":")).encode()

    def decode(self, headers: dict[str, str], body: bytes) -> Decoded:
        """The first sample's outputs from a successful response (headers with lower-case names)."""
        try:
            if self.protocol == "v2":
                return _decode_v2(headers, body)
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"response is not valid JSON: {exc}") from None
        if self.protocol == "v1":
            if not isinstance(data, dict) or "predictions" not in data:
                raise DecodeError('v1 response has no "predictions"')
            preds = data["predictions"]
            if not isinstance(preds, list) or not preds:
                raise DecodeError('v1 "predictions" is not a non-empty list')
            return _from_value(preds[0], self.classes)
        if isinstance(data, list) and data and isinstance(data[0], (list, dict)):
            data = data[0]   # a batch answer
        return _from_value(data, self.classes)


def _vector(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.size == 0:
        raise DecodeError(f"expected a vector of class scores, got shape {list(a.shape)}")
    return a


def _is_distribution(a: np.ndarray) -> bool:
    return bool(np.all(a >= -1e-6) and math.isclose(float(a.sum()), 1.0, abs_tol=1e-3))


def _from_scores(a: np.ndarray, kind: str | None) -> Decoded:
    if kind == "probabilities" or (kind is None and _is_distribution(a)):
        return Decoded(int(a.argmax()), probabilities=a)
    return Decoded(int(a.argmax()), logits=a, probabilities=_softmax(a))


def _from_value(v: Any, classes: tuple[str, ...]) -> Decoded:
    """A v1 prediction or TorchServe answer: a score vector, {probabilities|logits: [...]}, {class: p}, or a class."""
    if isinstance(v, dict):
        keys = {k.lower(): k for k in v}
        probs = next((v[keys[n]] for n in _PROB_NAMES if n in keys), None)
        logits = next((v[keys[n]] for n in _LOGIT_NAMES if n in keys), None)
        if probs is not None or logits is not None:
            p = _vector(probs) if probs is not None else None
            lg = _vector(logits) if logits is not None else None
            if p is None:
                p = _softmax(lg)  # type: ignore[arg-type]
            return Decoded(int(p.argmax()), probabilities=p, logits=lg)
        # TorchServe's image classifier answers its top-k as {class_name: probability}.
        try:
            scored = {str(k): float(x) for k, x in v.items()}
        except (TypeError, ValueError):
            raise DecodeError(f"cannot read class scores from keys {sorted(v)[:5]}") from None
        best = max(scored, key=scored.__getitem__)
        index = {c: i for i, c in enumerate(classes)}
        if best not in index:
            raise DecodeError(f"class {best!r} in the response is not among the model's classes")
        return Decoded(index[best])
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return Decoded(int(v))
    return _from_scores(_vector(v), None)


def _decode_v2(headers: dict[str, str], body: bytes) -> Decoded:
    json_len = headers.get("inference-header-content-length")
    n = int(json_len) if json_len is not None else len(body)
    doc = json.loads(body[:n])
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise DecodeError('v2 response has no "outputs"')
    offset = n
    arrays: dict[str, np.ndarray] = {}
    for out in outputs:
        params = out.get("parameters") or {}
        shape = out.get("shape") or []
        if "binary_data_size" in params:
            size = int(params["binary_data_size"])
            dtype = _V2_DTYPES.get(out.get("datatype", ""), None)
            if dtype is None:
                raise DecodeError(f"unsupported binary datatype {out.get('datatype')!r} of output {out.get('name')!r}")
            arr = np.frombuffer(body[offset:offset + size], dtype=dtype)
            offset += size
        else:
            arr = np.asarray(out.get("data"), dtype=np.float64)
        try:
            arr = arr.astype(np.float64).reshape(shape) if shape else arr.astype(np.float64)
        except ValueError:
            raise DecodeError(f"output {out.get('name')!r}: {arr.size} values do not fit shape {shape}") from None
        arrays[str(out.get("name", "")).lower()] = arr
    probs = next((arrays[k] for k in _PROB_NAMES if k in arrays), None)
    logits = next((arrays[k] for k in _LOGIT_NAMES if k in arrays), None)
    if probs is None and logits is None:
        if len(arrays) != 1:
            raise DecodeError(f"cannot tell which of the outputs {sorted(arrays)} holds the class scores")
        return _from_scores(_vector(next(iter(arrays.values()))[:1]), None)
    p = _vector(probs[:1]) if probs is not None else None
    lg = _vector(logits[:1]) if logits is not None else None
    if p is None:
        p = _softmax(lg)  # type: ignore[arg-type]
    return Decoded(int(p.argmax()), probabilities=p, logits=lg)


def _softmax(a: np.ndarray) -> np.ndarray:
    z = np.exp(a - a.max())
    return z / z.sum()
