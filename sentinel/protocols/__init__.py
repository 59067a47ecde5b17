"""The one wire layer: encoders and decoders for every inference protocol sentinel speaks.

    decode_request(protocol, body, headers, hints)   -> DecodedRequest(inputs, form)
    decode_response(protocol, body, headers, hints)  -> DecodedResponse(outputs, kind, logits, probabilities)
    encode_request(protocol, x, input_name=, binary=, raw=)  -> (body, headers)
    encode_response(protocol, [(name, scores)], binary=)     -> (body, headers)
    sniff(body, headers)                             -> protocol name ("v2", "v1", "torchserve")
    codec(name) / register(name, module_path)        the codec modules by protocol name
    routes.match(path)                               -> Route(model, version, protocol) | None

Protocols: "v2" (OIP v2 JSON and binary extension, `oip_v2`), "v1" (KServe v1, `kserve_v1`),
"torchserve" (`torchserve`), "oip_v2_grpc" (OIP v2 gRPC messages), "auto" (sniffed per
body). One dtype table (`tensors.DTYPES`), one error type (`sentinel.errors.DecodeError`,
whose `kind` labels it for metrics), one logits/probabilities rule and one softmax
(`sentinel.scores`). Every decoder is pure (bytes and headers in, arrays out) and bounded:
JSON depth, tensor elements and image pixels are checked before anything is allocated.

This package imports its submodules lazily: `sentinel.protocols.routes` and
`sentinel.protocols.names` load neither numpy nor a decoder, so the proxy process stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sentinel.errors import DecodeError
from sentinel.protocols.names import AUTO, CANARY_HEADER, GRPC, HTTP_PROTOCOLS, WireProtocol

if TYPE_CHECKING:
    from sentinel.protocols.base import DecodedRequest, DecodedResponse, DecodeHints, Headers
    from sentinel.protocols.dispatch import (
        codec,
        decode_request,
        decode_response,
        encode_request,
        encode_response,
        register,
        sniff,
    )
    from sentinel.protocols.routes import Route, match

_LAZY = {
    "DecodedRequest": "sentinel.protocols.base", "DecodedResponse": "sentinel.protocols.base",
    "DecodeHints": "sentinel.protocols.base", "Headers": "sentinel.protocols.base",
    "codec": "sentinel.protocols.dispatch", "register": "sentinel.protocols.dispatch",
    "sniff": "sentinel.protocols.dispatch",
    "decode_request": "sentinel.protocols.dispatch", "decode_response": "sentinel.protocols.dispatch",
    "encode_request": "sentinel.protocols.dispatch", "encode_response": "sentinel.protocols.dispatch",
    "Route": "sentinel.protocols.routes", "match": "sentinel.protocols.routes",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        try:   # a submodule: sentinel.protocols.oip_v2 and friends
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


__all__ = ["AUTO", "CANARY_HEADER", "GRPC", "HTTP_PROTOCOLS", "DecodeError", "DecodeHints", "DecodedRequest",
           "DecodedResponse", "Headers", "Route", "WireProtocol", "codec", "decode_request", "decode_response",
           "encode_request", "encode_response", "match", "register", "sniff"]
