"""How replay asks one model for one prediction and reads the answer, through `sentinel.protocols`.

Encoding and decoding are the wire layer's (`sentinel.protocols.encode_request`,
`decode_response`): replay, canary, analysis and demo read a response the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sentinel import protocols
from sentinel.errors import DecodeError
from sentinel.protocols.base import DecodeHints
from sentinel.protocols.names import HTTP_PROTOCOLS, WireProtocol
from sentinel.replay.compare import Decoded

PROTOCOLS: tuple[str, ...] = HTTP_PROTOCOLS

__all__ = ["PROTOCOLS", "DecodeError", "Decoded", "WireFormat", "decoded_first"]


def decoded_first(resp: protocols.DecodedResponse, classes: tuple[str, ...] = ()) -> Decoded:
    """What a decoded response says about its first sample.

    With the model's classes known, an answer whose score vector has another width is refused
    (`DecodeError` kind `bad_shape`): an argmax over 7 scores compared with a 10-class reference
    would count chance agreements and call the rest mismatches of the model, not of the answer.
    Replay asks about one sample at a time, so an answer with another number of rows (a
    batch of 2 for 1 input: another request's results, or a batching bug) is refused too
    (`bad_shape`), rather than its first row compared as if it were this sample's.
    """
    rows = len(resp.labels) if resp.labels else (resp.outputs.shape[0] if resp.outputs.ndim >= 1 else 0)
    if rows != 1:
        raise DecodeError("bad_shape", f"the answer has {rows} rows for 1 input sample")
    if resp.labels:
        return Decoded(classes.index(resp.labels[0]))
    width = resp.outputs.shape[1] if resp.outputs.ndim == 2 else None
    if classes and width != len(classes):
        got = "no scores" if resp.outputs.size == 0 else f"{width} scores per sample"
        raise DecodeError("bad_shape", f"the answer has {got}; the model has {len(classes)} classes")
    probs = resp.probabilities_or_softmax()[0]
    logits = resp.logits[0] if resp.logits is not None else None
    return Decoded(int(np.argmax(probs)), probabilities=probs, logits=logits)


@dataclass(frozen=True)
class WireFormat:
    """The protocol, path and encoding options for one model."""

    protocol: WireProtocol
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
        x = np.asarray(x)
        if x.dtype.kind not in "biu":
            # floats go as FP32; integer images (uint8 RGB) keep their dtype, so a server or the
            # sidecar's input contract that expects UINT8 gets UINT8, not FP32 of the same values
            x = x.astype(np.float32)
        batch = x if self.protocol == "torchserve" else x[None]   # TorchServe takes a single instance as is
        body, headers = protocols.encode_request(self.protocol, batch, input_name=self.input_name,
                                                 binary=self.binary)
        return {k.title(): v for k, v in headers.items()}, body

    def decode(self, headers: dict[str, str], body: bytes) -> Decoded:
        """The first sample's outputs from a successful response (headers with lower-case names)."""
        resp = protocols.decode_response(self.protocol, body, headers, DecodeHints(classes=self.classes))
        return decoded_first(resp, self.classes)
