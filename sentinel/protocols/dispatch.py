"""Codecs by protocol name: the one place that maps a name to its decoder and encoder module.

A codec is a module with
    decode_request(body, headers, hints)  -> DecodedRequest
    decode_response(body, headers, hints) -> DecodedResponse
Modules are imported on first use, so naming a protocol costs nothing until a body is decoded
(the proxy process imports routes only). Another codec joins by one line in CODECS, or by
`register(name, module_path)` before first use.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol, TypeVar, cast

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import NO_HINTS, DecodedRequest, DecodedResponse, DecodeHints, Headers
from sentinel.protocols.encoding import decoded
from sentinel.protocols.names import AUTO, GRPC

CODECS: dict[str, str] = {
    "v2": "sentinel.protocols.oip_v2",
    "v1": "sentinel.protocols.kserve_v1",
    "torchserve": "sentinel.protocols.torchserve",
    GRPC: "sentinel.protocols.oip_grpc",   # OIP v2 gRPC ModelInferRequest/ModelInferResponse bytes
}
_loaded: dict[str, ModuleType] = {}
_T = TypeVar("_T")


class Codec(Protocol):
    """What a codec module provides (a structural type; codecs are plain modules)."""

    def decode_request(self, body: bytes, headers: Headers, hints: DecodeHints) -> DecodedRequest: ...

    def decode_response(self, body: bytes, headers: Headers, hints: DecodeHints) -> DecodedResponse: ...

    def encode_request(self, *args: Any, **kwargs: Any) -> tuple[bytes, dict[str, str]]: ...

    def encode_response(self, *args: Any, **kwargs: Any) -> tuple[bytes, dict[str, str]]: ...


def register(name: str, module_path: str) -> None:
    """Add (or replace) the codec module for a protocol name."""
    CODECS[name] = module_path
    _loaded.pop(name, None)


def codec(name: str) -> Codec:
    """The codec module of a protocol name; DecodeError("unsupported") for an unknown or missing one."""
    mod = _loaded.get(name)
    if mod is not None:
        return cast(Codec, mod)
    path = CODECS.get(name)
    if path is None:
        raise DecodeError("unsupported", f"unknown protocol {name!r} (known: {', '.join(CODECS)})"[:300])
    try:
        mod = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        raise DecodeError("unsupported", f"protocol {name!r} needs {path}, which cannot be imported: {exc}") from None
    _loaded[name] = mod
    return cast(Codec, mod)


# A v2 tensor object starts with one of its own keys; a v1 `inputs` list of `{"b64": ...}` or of
# named instances does not.
_V2_TENSORS = re.compile(rb'"(?:inputs|outputs)"\s*:\s*\[\s*\{\s*"(?:name|shape|datatype|parameters|data)"')
_V1_KEYS = re.compile(rb'"(?:instances|predictions|inputs|outputs)"\s*:')


def sniff(body: bytes, headers: Headers) -> str:
    """The protocol of a body whose protocol nobody told us (KServe logger CloudEvents).

    v2: an object whose "inputs"/"outputs" is a list of tensor objects (a first key of
    name, shape, datatype, parameters or data; binary tensors may
    follow the JSON header); v1: an object with "instances"/"predictions" (or columnar
    "inputs"/"outputs"); anything else (an image, a JSON list, raw bytes): TorchServe.
    Looks at the first 64 KiB only.
    """
    head = bytes(body[:65536]).removeprefix(b"\xef\xbb\xbf").lstrip()   # a BOM: the codec refuses it, naming it
    if head.startswith(b"{"):
        if _V2_TENSORS.search(head):
            return "v2"
        if _V1_KEYS.search(head):
            return "v1"
    return "torchserve"


_GZIP_MAGIC = b"\x1f\x8b\x08"


def _relayed(body: bytes, headers: Headers) -> tuple[bytes, Headers]:
    """A body relayed without its Content-Encoding (the KServe logger forwards only Content-Type):
    gzip bytes are inflated when they inflate, else left as they are (they may be a raw tensor)."""
    if "content-encoding" in headers or not body.startswith(_GZIP_MAGIC):
        return body, headers
    try:
        return decoded(body, {**headers, "content-encoding": "gzip"})
    except DecodeError as exc:
        if exc.kind == "too_large":
            raise
        return body, headers


def decode_request(protocol: str, body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """Decode an inference request body of the given protocol ("auto": sniffed); content codings undone
    (for "auto", relayed bodies, also a gzip body whose Content-Encoding was lost on the way)."""
    body, headers = decoded(body, headers)
    if protocol == AUTO:
        body, headers = _relayed(body, headers)
        protocol = sniff(body, headers)
    return _checked(codec(protocol).decode_request, body, headers, hints)


def decode_response(protocol: str, body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """Decode an inference response body of the given protocol ("auto": sniffed); content codings undone
    (for "auto" also a gzip body whose Content-Encoding was lost on the way)."""
    body, headers = decoded(body, headers)
    if protocol == AUTO:
        body, headers = _relayed(body, headers)
        protocol = sniff(body, headers)
    return _checked(codec(protocol).decode_response, body, headers, hints)


def _checked(fn: Callable[[bytes, Headers, DecodeHints], _T], body: bytes, headers: Headers,
             hints: DecodeHints) -> _T:
    """Run a decoder; anything but a DecodeError escaping it is a decoder bug, reported as one kind."""
    try:
        return fn(body, headers, hints)
    except DecodeError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise DecodeError("too_large", f"decoding exhausted a resource: {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed payload must never take the worker down
        raise DecodeError("unexpected", f"unexpected {type(exc).__name__} while decoding: {exc}"[:300]) from None


def encode_request(protocol: str, x: np.ndarray, *, input_name: str = "input", binary: bool = False,
                   raw: bool = False) -> tuple[bytes, dict[str, str]]:
    """Body and headers asking `protocol` for predictions on batch `x` (the inverse of decode_request).

    binary: OIP v2 binary tensor extension (request and outputs); raw: TorchServe raw tensor bytes.
    Other codecs are asked through their own `encode_request(x, input_name=..., binary=...)`.
    """
    if protocol == "v2":
        return codec("v2").encode_request([(input_name, x)], binary=binary)
    if protocol == "v1":
        return codec("v1").encode_request(x)
    if protocol == "torchserve":
        return codec("torchserve").encode_request(x, raw=raw)
    return codec(protocol).encode_request(x, input_name=input_name, binary=binary)


def encode_response(protocol: str, outputs: Sequence[tuple[str, np.ndarray]], *, binary: bool = False,
                    model_name: str = "") -> tuple[bytes, dict[str, str]]:
    """Body and headers of a response carrying named N × classes outputs (the inverse of decode_response).

    v2 carries every output; v1 and TorchServe carry the first (probabilities, as the servers do).
    """
    if protocol == "v2":
        return codec("v2").encode_response(outputs, binary=binary, model_name=model_name)
    if protocol == "v1":
        return codec("v1").encode_response(outputs[0][1])
    if protocol == "torchserve":
        return codec("torchserve").encode_response(outputs[0][1])
    return codec(protocol).encode_response(outputs, binary=binary, model_name=model_name)
