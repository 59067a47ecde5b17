"""Pure decoders for the inference wire formats: bytes and headers in, arrays out.

    decode_request(protocol, body, headers)  -> DecodedRequest(inputs, form)
    decode_response(protocol, body, headers) -> DecodedResponse(outputs, kind)
    routes.match(path)                       -> Route(model, version, protocol) | None

Every failure is a `DecodeError` whose `kind` labels it for metrics. Nothing here does
I/O or imports torch; Pillow is imported only when an encoded image must be decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from sentinel.protocols import kserve_v1, oip_grpc, oip_v2, torchserve
from sentinel.protocols.base import DecodedRequest, DecodedResponse, DecodeError, Headers
from sentinel.protocols.routes import Route, match

WireProtocol = Literal["v2", "v1", "torchserve"]

_REQUEST: dict[str, Callable[[bytes, Headers], DecodedRequest]] = {
    "v2": oip_v2.decode_request, "v1": kserve_v1.decode_request, "torchserve": torchserve.decode_request,
    "oip_v2_grpc": oip_grpc.decode_request,
}
_RESPONSE: dict[str, Callable[[bytes, Headers], DecodedResponse]] = {
    "v2": oip_v2.decode_response, "v1": kserve_v1.decode_response, "torchserve": torchserve.decode_response,
    "oip_v2_grpc": oip_grpc.decode_response,
}


def decode_request(protocol: WireProtocol, body: bytes, headers: Headers) -> DecodedRequest:
    """Decode an inference request body of the given protocol."""
    try:
        fn = _REQUEST[protocol]
    except KeyError:
        raise DecodeError("unsupported", f"unknown protocol {protocol!r}") from None
    return fn(body, headers)


def decode_response(protocol: WireProtocol, body: bytes, headers: Headers) -> DecodedResponse:
    """Decode an inference response body of the given protocol."""
    try:
        fn = _RESPONSE[protocol]
    except KeyError:
        raise DecodeError("unsupported", f"unknown protocol {protocol!r}") from None
    return fn(body, headers)


__all__ = ["DecodeError", "DecodedRequest", "DecodedResponse", "Route", "WireProtocol",
           "decode_request", "decode_response", "match"]
