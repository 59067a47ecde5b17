"""The wire layer's public surface is small and pinned; the package loads lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sentinel.protocols as protocols
from sentinel.errors import InfrastructureError, SentinelError

pytestmark = pytest.mark.unit

pytestmark = pytest.mark.unit


def test_public_api_is_pinned():
    assert sorted(protocols.__all__) == sorted([
        "AUTO", "CANARY_HEADER", "GRPC", "HTTP_PROTOCOLS", "DecodeError", "DecodeHints", "DecodedRequest",
        "DecodedResponse", "Headers", "Route", "WireProtocol", "codec", "decode_request", "decode_response",
        "encode_request", "encode_response", "match", "register", "sniff"])
    for name in protocols.__all__:
        assert getattr(protocols, name) is not None


def test_decode_error_is_in_the_project_error_tree():
    assert issubclass(protocols.DecodeError, InfrastructureError)
    assert issubclass(protocols.DecodeError, SentinelError)


def test_unknown_protocol_is_a_decode_error():
    with pytest.raises(protocols.DecodeError) as info:
        protocols.decode_request("carrier-pigeon", b"", {})
    assert info.value.kind == "unsupported" and "carrier-pigeon" in str(info.value)


def test_register_adds_a_codec_by_module_path():
    protocols.register("v2-alias", "sentinel.protocols.oip_v2")
    try:
        assert protocols.codec("v2-alias") is protocols.codec("v2")
    finally:
        from sentinel.protocols import dispatch

        dispatch.CODECS.pop("v2-alias")


def test_routing_imports_no_decoder_and_no_numpy():
    """The proxy imports routes (and names); neither may pull in a decoder or numpy."""
    code = ("import sys, sentinel.protocols.routes, sentinel.protocols.names, sentinel.protocols\n"
            "bad = [m for m in sys.modules if m == 'numpy' or m.startswith('sentinel.protocols.')\n"
            "       and m not in ('sentinel.protocols.routes', 'sentinel.protocols.names')]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_proxy_process_modules_load_no_decoder():
    """The daemon's proxy, sidecar and ingest modules route and join; decoding happens in the worker.

    Ingest inflates gzip/deflate CloudEvent envelopes with `encoding` (zlib only, no numpy)."""
    code = ("import sys, sentinel.proxy.server, sentinel.proxy.sidecar, sentinel.proxy.ingest\n"
            "bad = [m for m in sys.modules if m == 'numpy' or m.startswith('sentinel.protocols.')\n"
            "       and m not in ('sentinel.protocols.routes', 'sentinel.protocols.names',\n"
            "                     'sentinel.protocols.encoding')]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
