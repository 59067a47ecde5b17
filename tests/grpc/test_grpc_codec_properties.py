"""Properties of the OIP gRPC codec: encode → parse is the identity; hostile bytes raise DecodeError only."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sentinel.errors import DecodeError
from sentinel.protocols import oip_grpc, tensors
from sentinel.proxy.grpc_proxy import peek_model_name

pytestmark = pytest.mark.unit

DTYPES = sorted(tensors.DTYPES.values(), key=str)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def tensor(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    arr = draw(hnp.arrays(dtype, shape, elements={"allow_nan": False} if dtype.kind == "f" else None))
    return draw(names.filter(bool)), arr   # proto3 cannot tell an empty name from none: parse names it inputs[i]


@given(st.lists(tensor(), min_size=1, max_size=3), st.booleans(), names, st.sampled_from(["request", "response"]))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_parse_round_trip(named, raw, model, kind):
    body = oip_grpc.encode(named, kind, model_name=model, id="x", raw=raw)
    msg = oip_grpc.parse(body, kind)
    assert msg.model_name == model and msg.id == "x"
    assert len(msg.tensors) == len(named)
    for (want_name, want), (got_name, got) in zip(named, msg.tensors, strict=True):
        assert got_name == want_name and got.shape == want.shape and got.dtype == want.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got, want)
    if kind == "request":
        assert peek_model_name(body) == (model or None)


@given(st.binary(max_size=512))
@settings(max_examples=200, deadline=None)
def test_random_bytes_raise_decode_error_only(body):
    for kind in ("request", "response"):
        try:
            oip_grpc.parse(body, kind)
        except DecodeError:
            pass
    peek_model_name(body)   # never raises


VALID = oip_grpc.encode([("input-0", np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)),
                         ("n", np.array([[-1, 2**40]], dtype=np.int64))], model_name="digits", raw=False)


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
@settings(max_examples=200, deadline=None)
def test_mutated_messages_raise_decode_error_only(flips, cut):
    b = bytearray(VALID[:cut])
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    try:
        oip_grpc.decode_request(bytes(b), {})
        oip_grpc.decode_response(bytes(b), {})
    except DecodeError:
        pass
