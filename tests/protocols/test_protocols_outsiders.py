"""Bodies from clients and servers the decoders were not written against (third round): a byte
order mark, other JSON encodings, and the Triton / KServe / CloudEvents variants probed here.

Each decodes to what the client sent or is refused with the kind that says why.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import decode_request, decode_response

pytestmark = pytest.mark.unit

JSON = {"content-type": "application/json"}
BOM = b"\xef\xbb\xbf"
V2_REQUEST = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def _refused(fn, *args) -> DecodeError:
    with pytest.raises(DecodeError) as err:
        fn(*args)
    return err.value


@pytest.mark.parametrize(("protocol", "body"), [
    ("v2", V2_REQUEST), ("auto", V2_REQUEST), ("v1", b'{"instances": [[1, 2]]}'), ("torchserve", b"[[1, 2]]"),
])
def test_a_json_body_with_a_byte_order_mark_is_refused_naming_it(protocol, body):
    assert decode_request(protocol, body, JSON).inputs.shape == (1, 2)
    err = _refused(decode_request, protocol, BOM + body, JSON)   # v1/torchserve read it; auto called it bad_datatype
    assert err.kind == "malformed_json" and "byte order mark" in str(err)
    resp = json.dumps({"predictions": [[0.2, 0.8]]}).encode()
    assert _refused(decode_response, "v1", BOM + resp, JSON).kind == "malformed_json"


def test_json_in_utf16_is_not_read():
    # json.loads(bytes) reads UTF-16 and UTF-32; model servers read UTF-8 only
    body = '{"instances": [[1, 2]]}'.encode("utf-16")
    assert _refused(decode_request, "v1", body, JSON).kind == "malformed_json"
    assert np.array_equal(decode_request("v1", body.decode("utf-16").encode(), JSON).inputs, [[1, 2]])


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


IMG = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)


def test_v1_b64_images_nested_in_lists_or_batch_less_are_images():
    import base64

    b64 = base64.b64encode(_png(IMG)).decode()
    for doc in ({"instances": [[{"b64": b64}], [{"b64": b64}]]},          # an N×1 string input
                {"signature_name": "serving_default", "instances": [{"image_bytes": [{"b64": b64}], "key": "1"}]},
                {"inputs": {"b64": b64}}):                                 # TF Serving columnar, no batch axis
        got = decode_request("v1", json.dumps(doc).encode(), JSON).inputs   # were bad_datatype / missing_field
        assert got.shape[1:] == (8, 8) and np.array_equal(got[0], IMG)
    err = _refused(decode_request, "v1", json.dumps({"instances": [[{"b64": b64}, {"b64": b64}]]}).encode(), JSON)
    assert err.kind == "unsupported" and "several" in str(err)


@pytest.mark.parametrize("shape", [[0, 8, 8], [1 << 27, 0], [0]])
def test_an_input_with_no_values_is_refused_not_counted_as_rows(shape):
    # [2**27, 0] decoded to 134 million empty rows, each then counted by the analysis
    doc = {"inputs": [{"name": "x", "datatype": "BYTES" if shape == [0] else "FP32", "shape": shape, "data": []}]}
    err = _refused(decode_request, "v2", json.dumps(doc).encode(), JSON)
    assert err.kind == "bad_shape" and "holds no values" in str(err)
    assert _refused(decode_request, "v1", b'{"instances": [[], []]}', JSON).kind == "bad_shape"


def test_a_batch_of_very_many_tiny_images_is_refused_before_decoding():
    from sentinel.protocols import oip_v2
    from sentinel.protocols.images import MAX_IMAGES

    th = pytest.importorskip("tritonclient.http")
    dot = _png(np.zeros((1, 1), np.uint8))   # 67 bytes: a million fit in a 64 MiB body, within the pixel bound
    inp = th.InferInput("image", [MAX_IMAGES + 1], "BYTES")
    inp.set_data_from_numpy(np.array([dot] * (MAX_IMAGES + 1), dtype=object), binary_data=True)
    body, hlen = th.InferenceServerClient.generate_request_body([inp])
    err = _refused(decode_request, "v2", body, {oip_v2.HEADER_LENGTH: str(hlen)})
    assert err.kind == "too_large" and f"{MAX_IMAGES + 1} encoded images" in str(err)


@pytest.mark.parametrize("shape", [(2, 1, 10), (2, 10, 1, 1), (2, 1, 10, 1)])
def test_score_outputs_with_size_one_axes_anywhere_after_the_batch(shape):
    scores = np.random.default_rng(3).normal(size=(2, 10)).astype(np.float32)
    doc = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": list(shape),
                        "data": scores.reshape(-1).tolist()}]}
    got = decode_response("v2", json.dumps(doc).encode(), JSON)   # N×1×C was bad_shape
    assert got.outputs.shape == (2, 10) and np.allclose(got.outputs, scores)
    doc["outputs"][0]["shape"] = [2, 2, 5]
    assert _refused(decode_response, "v2", json.dumps(doc).encode(), JSON).kind == "bad_shape"


def test_an_unreadable_score_output_is_not_replaced_by_the_embeddings_beside_it():
    from sentinel.protocols.base import DecodeHints

    emb = np.random.default_rng(4).normal(size=(2, 16)).tolist()
    nan_logits = [[float("nan")] * 10] * 2
    doc = {"outputs": [{"name": "embeddings", "datatype": "FP32", "shape": [2, 16], "data": sum(emb, [])},
                       {"name": "logits", "datatype": "FP32", "shape": [2, 10], "data": sum(nan_logits, [])}]}
    body = json.dumps(doc).encode()
    for hints in (DecodeHints(), DecodeHints(num_classes=10)):   # embeddings were read as the scores
        assert _refused(decode_response, "v2", body, JSON, hints).kind == "nonfinite_output"
    doc["outputs"][1] = {"name": "logits", "datatype": "BYTES", "shape": [2, 1], "data": ["0.9:3:three", "0.8:1:one"]}
    err = _refused(decode_response, "v2", json.dumps(doc).encode(), JSON, DecodeHints(num_classes=10))
    assert err.kind == "unsupported"
    # an auxiliary output that cannot be read beside the scores does not matter, listed first or not
    doc["outputs"] = [{"name": "classes", "datatype": "BYTES", "shape": [2, 1], "data": ["3", "1"]},
                      {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.6, 0.4]}]
    assert decode_response("v2", json.dumps(doc).encode(), JSON).top1.tolist() == [1, 0]


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_a_numpy_npy_body_is_read_by_its_own_header():
    from sentinel.protocols.base import DecodeHints

    hints = DecodeHints(raw_shape=(8, 8), raw_dtype="uint8", raw_layout="NHW")
    x = np.arange(128, dtype=np.uint8).reshape(2, 8, 8)
    for ctype in ("application/octet-stream", "application/x-npy"):
        # octet-stream: its 128-byte header was read as two more 8×8 instances of pixels
        got = decode_request("torchserve", _npy(x), {"content-type": ctype}, hints)
        assert got.form == "raw" and np.array_equal(got.inputs, x)
    one = np.asfortranarray(np.arange(64, dtype=">f4").reshape(8, 8))   # one instance, big-endian, Fortran order
    got = decode_request("torchserve", _npy(one), {"content-type": "application/x-npy"}, hints).inputs
    assert got.shape == (1, 8, 8) and got.dtype == np.float32 and np.array_equal(got[0], one)


@pytest.mark.parametrize(("body", "kind"), [
    (_npy(np.zeros((2, 8, 8), np.uint8))[:-1], "truncated"),
    (_npy(np.zeros((2, 8, 8), np.uint8)) + b"x", "bad_shape"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': 'x'}    ", "bad_header"),
    (_npy(np.array(["a", "b"])), "unsupported"),
    (b"\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 8)}   \n",
     "too_large"),
], ids=["short", "long", "bad-header", "text", "huge-shape"])
def test_a_bad_npy_body_is_refused_by_kind(body, kind):
    assert _refused(decode_request, "torchserve", body, {"content-type": "application/x-npy"}).kind == kind


def test_a_torchserve_top_k_mapping_with_nan_is_the_models_fault_not_a_label():
    from sentinel.protocols.base import DecodeHints

    hints = DecodeHints(classes=("cat", "dog"))
    assert decode_response("torchserve", b'{"cat": 0.3, "dog": 0.7}', JSON, hints).labels == ("dog",)
    # max() over a NaN answered whichever class came first ("cat"), a label the model never gave
    err = _refused(decode_response, "torchserve", b'{"cat": NaN, "dog": 0.7}', JSON, hints)
    assert err.kind == "nonfinite_output"


def test_a_batch_of_images_of_different_sizes_is_unsupported_not_the_clients_fault():
    import base64

    small, big = (base64.b64encode(_png(np.zeros(s, np.uint8))).decode() for s in ((8, 8), (16, 12)))
    body = json.dumps({"instances": [{"b64": small}, {"b64": big}]}).encode()   # photos of several sizes
    err = _refused(decode_request, "v1", body, JSON)
    assert err.kind == "unsupported" and "8×8, 16×12" in str(err)


@pytest.mark.parametrize(("protocol", "body"), [
    ("v2", b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2],"data":[3,4]}]}'),
    ("v2", b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],'
           b'"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[3,4]}]}'),
    ("auto", b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}],'
             b'"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[3,4]}]}'),
    ("v1", b'{"instances": [[1, 2]], "instances": [[3, 4]]}'),
])
def test_a_key_twice_in_one_object_is_refused_not_guessed(protocol, body):
    # Servers' JSON parsers keep the first or the last value: which inputs the model saw is unknown.
    err = _refused(decode_request, protocol, body, JSON)
    assert err.kind == "malformed_json"
    assert "appears twice" in str(err)


def test_a_key_twice_in_a_response_and_after_binary_data_is_refused():
    resp = b'{"predictions": [[0.2, 0.8]], "predictions": [[0.8, 0.2]]}'
    assert "appears twice" in str(_refused(decode_response, "v1", resp, JSON))
    head = b'{"outputs":[{"name":"y","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8},' \
           b'"name":"z"}]}'
    body = head + np.array([0.2, 0.8], dtype=np.float32).tobytes()
    err = _refused(decode_response, "v2", body, {"content-type": "application/octet-stream",
                                                 "inference-header-content-length": str(len(head))})
    assert "appears twice" in str(err)
    # the same keys in different objects are fine
    ok = decode_request("v1", b'{"instances": [{"a": [1, 2]}, {"a": [3, 4]}]}', JSON)
    assert ok is not None
