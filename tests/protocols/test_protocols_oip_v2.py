"""OIP v2 decoding on literal payloads, error cases, and hypothesis round-trips."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sentinel.protocols import DecodeError, decode_request, decode_response, oip_v2

pytestmark = pytest.mark.unit

H_JSON = {"content-type": "application/json"}


def test_json_request_literal():
    body = b'{"id":"7","inputs":[{"name":"x","shape":[2,1,2,2],"datatype":"FP32","data":[1,2,3,4,5,6,7,8]}]}'
    req = decode_request("v2", body, H_JSON)
    assert req.form == "network"
    assert req.inputs.dtype == np.float32
    np.testing.assert_array_equal(req.inputs.reshape(-1), np.arange(1, 9, dtype=np.float32))
    assert req.inputs.shape == (2, 1, 2, 2)


def test_json_nested_data_and_uint8_is_raw():
    body = b'{"inputs":[{"name":"img","shape":[1,2,2],"datatype":"UINT8","data":[[[0,255],[7,8]]]}]}'
    req = decode_request("v2", body, H_JSON)
    assert req.form == "raw" and req.inputs.dtype == np.uint8 and req.inputs[0, 0, 1] == 255


@pytest.mark.parametrize("datatype,fmt,dtype", [("FP32", "<4f", np.float32), ("FP16", "<4e", np.float16),
                                                ("UINT8", "<4B", np.uint8), ("INT64", "<4q", np.int64)])
def test_binary_request_literal(datatype, fmt, dtype):
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": datatype,
                                   "parameters": {"binary_data_size": struct.calcsize(fmt)}}]}).encode()
    body = head + struct.pack(fmt, 1, 2, 3, 4)
    req = decode_request("v2", body, {"inference-header-content-length": str(len(head))})
    assert req.inputs.dtype == dtype
    np.testing.assert_array_equal(req.inputs, np.array([[1, 2, 3, 4]], dtype=dtype))


def test_binary_two_inputs_second_is_ignored_but_checked():
    head = json.dumps({"inputs": [
        {"name": "a", "shape": [1, 1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
        {"name": "b", "shape": [1, 1], "datatype": "INT8", "parameters": {"binary_data_size": 1}}]}).encode()
    req = decode_request("v2", head + struct.pack("<f", 0.5) + b"\x07",
                         {"inference-header-content-length": str(len(head))})
    assert req.inputs.tolist() == [[0.5]]


def test_response_logits_and_probabilities():
    logits = b'{"outputs":[{"name":"output-0","shape":[1,3],"datatype":"FP32","data":[2.0,-1.0,0.5]}]}'
    probs = b'{"outputs":[{"name":"output-0","shape":[1,3],"datatype":"FP32","data":[0.7,0.2,0.1]}]}'
    named = b'{"outputs":[{"name":"logits","shape":[1,2],"datatype":"FP32","data":[0.5,0.5]}]}'
    assert decode_response("v2", logits, H_JSON).kind == "logits"
    assert decode_response("v2", probs, H_JSON).kind == "probabilities"
    assert decode_response("v2", named, H_JSON).kind == "logits"   # the name wins over the heuristic
    out = decode_response("v2", logits, H_JSON).outputs
    assert out.shape == (1, 3) and out[0, 0] == 2.0


def test_response_skips_label_output_for_scores():
    body = (b'{"outputs":[{"name":"label","shape":[1],"datatype":"INT64","data":[3]},'
            b'{"name":"probabilities","shape":[1,2],"datatype":"FP32","data":[0.25,0.75]}]}')
    r = decode_response("v2", body, H_JSON)
    assert r.kind == "probabilities" and r.outputs.tolist() == [[0.25, 0.75]]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_bytes_input_with_encoded_images():
    img = (np.arange(64, dtype=np.uint8).reshape(8, 8)) * 3
    body, headers = oip_v2.encode([("image", np.array([_png(img), _png(img)], dtype=object))])
    req = decode_request("v2", body, headers)
    assert req.form == "raw" and req.inputs.shape == (2, 8, 8)
    np.testing.assert_array_equal(req.inputs[1], img)


@pytest.mark.parametrize("body,headers,kind", [
    (b"{not json", H_JSON, "malformed_json"),
    (b"[1,2]", H_JSON, "malformed_json"),
    (b'{"inputs":[]}', H_JSON, "missing_field"),
    (b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}', H_JSON, "bad_shape"),
    (b'{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}', H_JSON, "bad_shape"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP99","data":[1]}]}', H_JSON, "bad_datatype"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}', H_JSON, "bad_datatype"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}', H_JSON, "missing_field"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
     {"inference-header-content-length": "9999"}, "bad_header"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
     {"inference-header-content-length": "ten"}, "bad_header"),
])
def test_request_errors(body, headers, kind):
    with pytest.raises(DecodeError) as info:
        decode_request("v2", body, headers)
    assert info.value.kind == kind, str(info.value)


def test_truncated_binary_tensor():
    body, headers = oip_v2.encode([("x", np.zeros((1, 3, 4, 4), np.float32))])
    with pytest.raises(DecodeError) as info:
        decode_request("v2", body[:-5], headers)
    assert info.value.kind == "truncated"
    assert "binary_data_size" in str(info.value)


def test_binary_size_does_not_match_shape():
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(DecodeError) as info:
        decode_request("v2", head + b"\0" * 8, {"inference-header-content-length": str(len(head))})
    assert info.value.kind == "truncated" and "needs 16 bytes" in str(info.value)


def test_leftover_binary_bytes_are_an_error():
    body, headers = oip_v2.encode([("x", np.zeros((1, 2), np.float32))])
    with pytest.raises(DecodeError, match="left after the last tensor"):
        decode_request("v2", body + b"junk", headers)


@pytest.mark.parametrize("body", [b"0", b"[]", b"[[]]", b"[[1.0, 2.0]]"])
def test_torchserve_degenerate_scores(body):
    if body == b"[[1.0, 2.0]]":
        assert decode_response("torchserve", body, {}).outputs.shape == (1, 2)
    else:
        with pytest.raises(DecodeError):
            decode_response("torchserve", body, {})


def test_class_labels_are_not_scores():
    body = b'{"outputs":[{"name":"label","shape":[1],"datatype":"INT64","data":[3]}]}'
    with pytest.raises(DecodeError) as info:
        decode_response("v2", body, H_JSON)
    assert info.value.kind == "bad_shape"


_DTYPES = st.sampled_from([np.float32, np.float16, np.uint8, np.int64, np.int32, np.float64])


@settings(max_examples=60, deadline=None)
@given(arr=_DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                                                 elements={"allow_nan": False} if np.dtype(dt).kind == "f" else None)),
       binary=st.booleans())
def test_roundtrip_any_tensor(arr, binary):
    body, headers = oip_v2.encode([("t", arr)], binary=binary)
    (name, back), = oip_v2.parse_message(body, headers, "inputs")
    assert name == "t" and back.shape == arr.shape and back.dtype == arr.dtype.newbyteorder("<")
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=20), min_size=1, max_size=5))
def test_roundtrip_bytes_elements(items):
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    body, headers = oip_v2.encode([("b", arr)])
    (_, back), = oip_v2.parse_message(body, headers, "inputs")
    assert list(back) == items


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["v2", "v1", "torchserve"]),
       st.one_of(st.none(), st.integers(-5, 300)))
def test_garbage_raises_only_decode_error(body, protocol, hlen):
    headers = {} if hlen is None else {"inference-header-content-length": str(hlen)}
    for fn in (decode_request, decode_response):
        try:
            fn(protocol, body, headers)
        except DecodeError:
            pass


@pytest.mark.parametrize("pad", [b" " * 63, b" " * 64, b"\n" * 500, b" \t\r\n" * 4096])
@pytest.mark.parametrize("with_header", [False, True])
def test_json_body_may_end_in_any_amount_of_whitespace(pad, with_header):
    """RFC 8259 allows whitespace after the value: a JSON body padded to a fixed size decodes."""
    doc = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
    headers = {"inference-header-content-length": str(len(doc))} if with_header else {}
    req = decode_request("v2", doc + pad, headers)
    assert req.inputs.tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("pad", [b"\x0b", b"\x0c", b" \x0b", b"\x0c" * 100])
def test_only_json_whitespace_may_follow_a_json_body(pad):
    """Vertical tab and form feed are whitespace to Python's bytes.strip, not to RFC 8259."""
    doc = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
    with pytest.raises(DecodeError):
        decode_request("v2", doc + pad, {})


def test_short_binary_tensors_made_of_whitespace_bytes_are_read_without_the_header():
    """Whitespace after the object is judged once, after the tensors are read: 12 bytes of binary
    FP32 that happen to be spaces are a tensor, not JSON padding (without the header length too)."""
    raw = b" " * 12
    doc = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                  "parameters": {"binary_data_size": len(raw)}}]}).encode()
    for headers in ({}, {"inference-header-content-length": str(len(doc))}):
        req = decode_request("v2", doc + raw, headers)
        assert req.inputs.tobytes() == raw


def test_whitespace_after_binary_tensors_is_still_refused():
    """Bytes beyond the declared binary tensors are an error, whatever they are."""
    raw = np.arange(3, dtype=np.float32).tobytes()
    doc = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                  "parameters": {"binary_data_size": len(raw)}}]}).encode()
    with pytest.raises(DecodeError) as e:
        decode_request("v2", doc + raw + b" " * 100, {"inference-header-content-length": str(len(doc))})
    assert e.value.kind == "bad_shape"
