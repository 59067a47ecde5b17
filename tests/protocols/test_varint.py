"""The one protobuf varint reader that the gRPC decoder, the proxy's peek and the ONNX walk share."""

from __future__ import annotations

import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import oip_grpc
from sentinel.protocols.varint import VarintError, read_varint
from sentinel.proxy.grpc_proxy import peek_model_name

pytestmark = pytest.mark.unit


def _enc(v: int) -> bytes:
    out = bytearray()
    oip_grpc._write_varint(out, v)
    return bytes(out)


@pytest.mark.parametrize("v", [0, 1, 127, 128, 300, 2**32 - 1, 2**63, 2**64 - 1])
def test_values_round_trip_and_the_offset_is_after_the_varint(v):
    raw = b"\x07" + _enc(v) + b"\x01"
    assert read_varint(raw, 1) == (v, 1 + len(_enc(v)))
    assert read_varint(memoryview(raw), 1) == (v, 1 + len(_enc(v)))


def test_cut_short_and_overlong_are_told_apart():
    with pytest.raises(VarintError) as e:
        read_varint(b"\x80\x80", 0)
    assert e.value.truncated and "cut short" in str(e.value)
    with pytest.raises(VarintError) as e:
        read_varint(b"\xff" * 11, 0)
    assert not e.value.truncated and "longer than 10 bytes" in str(e.value)
    with pytest.raises(VarintError) as e:   # `end` bounds the read, not the buffer
        read_varint(b"\x96\x01", 0, end=1)
    assert e.value.truncated
    assert read_varint(b"\xff" * 9 + b"\x01", 0)[1] == 10


def test_each_caller_keeps_its_error_convention():
    with pytest.raises(DecodeError) as d:
        list(oip_grpc.fields(b"\x08\x80"))
    assert d.value.kind == "truncated"
    with pytest.raises(DecodeError) as d:
        list(oip_grpc.fields(b"\x08" + b"\xff" * 11))
    assert d.value.kind == "unsupported"
    assert peek_model_name(b"\x0a\x80") is None           # the proxy's peek: None, never an exception
    assert peek_model_name(b"\x0a\x06digits") == "digits"
