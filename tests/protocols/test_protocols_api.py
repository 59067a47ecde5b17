"""The decoders' public surface is small and pinned."""

from __future__ import annotations

import pytest

import sentinel.protocols as protocols

pytestmark = pytest.mark.unit


def test_public_api_is_pinned():
    assert sorted(protocols.__all__) == sorted([
        "DecodeError", "DecodedRequest", "DecodedResponse", "Route", "WireProtocol",
        "decode_request", "decode_response", "match"])


def test_unknown_protocol_is_a_decode_error():
    import pytest

    with pytest.raises(protocols.DecodeError) as info:
        protocols.decode_request("grpc", b"", {})  # type: ignore[arg-type]
    assert info.value.kind == "unsupported" and "grpc" in str(info.value)
