"""Round trips through the one wire layer: encode → decode gives back the arrays, every datatype and protocol."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sentinel import protocols
from sentinel.protocols import DecodeHints, oip_v2, tensors
from sentinel.scores import softmax

pytestmark = pytest.mark.unit

NUMERIC = [t for t in tensors.DTYPES]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)


def _array(dt: np.dtype):
    if dt.kind == "f":
        elems = st.floats(allow_nan=False, allow_infinity=False, width=8 * dt.itemsize)
        return hnp.arrays(dt, shapes, elements=elems)
    return hnp.arrays(dt, shapes)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("binary", [False, True])
def test_oip_v2_every_datatype_round_trips(datatype, binary):
    dt = tensors.DTYPES[datatype]

    @SETTINGS
    @given(_array(dt), _array(dt))
    def run(a, b):
        for key in ("inputs", "outputs"):
            body, headers = oip_v2.encode([("a", a), ("b", b)], key, binary=binary)
            got = oip_v2.parse_message(body, headers, key)
            assert [n for n, _ in got] == ["a", "b"]
            for (_, arr), want in zip(got, (a, b), strict=True):
                assert arr.dtype == dt.newbyteorder("<") and arr.shape == want.shape
                np.testing.assert_array_equal(arr, want)

    run()


@SETTINGS
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.booleans())
def test_oip_v2_bytes_round_trip(items, binary):
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    if not binary:   # JSON carries BYTES as strings: UTF-8 only
        arr[:] = [i.decode("utf-8", "replace").encode() for i in items]
    body, headers = oip_v2.encode([("s", arr)], "inputs", binary=binary)
    (name, got), = oip_v2.parse_message(body, headers, "inputs")
    assert list(got) == list(arr)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
                  elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from(["v2", "v1", "torchserve"]), st.booleans())
def test_requests_round_trip_for_every_protocol(x, protocol, binary):
    body, headers = protocols.encode_request(protocol, x, binary=binary)
    req = protocols.decode_request(protocol, body, headers)
    np.testing.assert_array_equal(req.inputs, x)
    assert req.form == "network"
    assert protocols.sniff(body, headers) == protocol or (protocol == "torchserve")


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8)),
                  elements=st.floats(0, 255, width=32)))
def test_torchserve_raw_octet_stream_round_trips_with_hints(x):
    body, headers = protocols.encode_request("torchserve", x, raw=True)
    assert headers["content-type"] == "application/octet-stream"
    hints = DecodeHints(raw_shape=x.shape[1:], raw_dtype="float32")
    req = protocols.decode_request("torchserve", body, headers, hints)
    np.testing.assert_array_equal(req.inputs, x)


@SETTINGS
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 12)), elements=st.floats(-20, 20)),
       st.sampled_from(["v2", "v1", "torchserve"]), st.booleans())
def test_responses_round_trip_with_the_one_kind_rule(logits, protocol, binary):
    probs = softmax(logits).astype(np.float32)
    lg = logits.astype(np.float32)
    body, headers = protocols.encode_response(protocol, [("probabilities", probs), ("logits", lg)], binary=binary)
    resp = protocols.decode_response(protocol, body, headers)
    np.testing.assert_array_equal(resp.outputs, probs.astype(np.float64))
    assert resp.kind == "probabilities"
    np.testing.assert_allclose(resp.probabilities_or_softmax(), probs, atol=1e-6)
    if protocol == "v2":   # v2 carries both outputs; the logits are kept beside the probabilities
        np.testing.assert_array_equal(resp.logits, lg.astype(np.float64))


def test_lone_unnamed_logits_are_logits_and_softmaxed_once():
    lg = np.array([[3.0, -1.0, 0.5]], np.float32)
    body, headers = protocols.encode_response("v2", [("output0", lg)])
    resp = protocols.decode_response("v2", body, headers)
    assert resp.kind == "logits"
    np.testing.assert_allclose(resp.probabilities_or_softmax(), softmax(lg), rtol=1e-12)


def test_auto_sniffs_each_protocol():
    x = np.ones((1, 3, 2, 2), np.float32)
    for protocol in ("v2", "v1"):
        body, headers = protocols.encode_request(protocol, x)
        assert protocols.sniff(body, headers) == protocol
        np.testing.assert_array_equal(protocols.decode_request("auto", body, headers).inputs, x)
    body, headers = protocols.encode_request("v2", x, binary=True)
    headers = {"content-type": headers["content-type"]}   # the logger drops the length header
    assert protocols.sniff(body, headers) == "v2"
    np.testing.assert_array_equal(protocols.decode_request("auto", body, headers).inputs, x)
    v1 = protocols.encode_response("v1", [("p", np.array([[0.25, 0.75]]))])[0]
    assert protocols.sniff(v1, {}) == "v1"
    assert protocols.decode_response("auto", v1, {}).kind == "probabilities"
