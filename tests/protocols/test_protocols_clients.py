"""Bodies from clients nobody wrote the decoders against: tritonclient (HTTP and gRPC), kserve's
InferRequest/InferResponse, Triton's extensions (shared memory, classification, BF16).

Each decodes to exactly what the client sent, or is refused with the specific kind that
`sentinel_sample_rejections_total{reason}` will count, never a different tensor. HTTP bodies
are made by the real clients here; gRPC bodies were captured once from `tritonclient.grpc`
(it and kserve register the same protobuf names, so one process cannot import both).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import decode_request, decode_response, oip_grpc, oip_v2, tensors
from sentinel.protocols.base import DecodeHints

pytestmark = pytest.mark.unit

th = pytest.importorskip("tritonclient.http")
GRPC = "oip_v2_grpc"
V1 = {"content-type": "application/json"}

# tritonclient.grpc 2.73 InferInput("x", [1, 3], "FP32").set_shared_memory("r0", 12), request id "7"
GRPC_SHM_REQUEST = bytes.fromhex(
    "0a016d1a01372a4a0a01781204465033321a020103221c0a147368617265645f6d656d6f72795f726567696f6e"
    "12041a027230221d0a177368617265645f6d656d6f72795f627974655f73697a651202100c")
# tritonclient.grpc 2.73 InferInput("x", [1, 4], "BF16") of ml_dtypes.bfloat16 [1.5, -2.25, 3e38, 1e-39]
GRPC_BF16_REQUEST = bytes.fromhex("0a016d1a01372a0d0a01781204424631361a0201043a08c03f10c0627f0b00")
BF16_AS_FP32 = np.array([[1.5, -2.25, 3.0040553e38, 1.0101905e-39]], dtype=np.float32)


def _http(inputs, outputs=None, **kw) -> tuple[bytes, dict[str, str]]:
    body, hlen = th.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return body, ({oip_v2.HEADER_LENGTH: str(hlen)} if hlen else {"content-type": "application/json"})


def _kind(fn, *args) -> str:
    with pytest.raises(DecodeError) as err:
        fn(*args)
    return err.value.kind


# --- BF16 -----------------------------------------------------------------------------
def test_bf16_from_tritonclient_http_and_grpc_decodes_exactly_as_float32():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([[1.5, -2.25, 3.0e38, 1e-39]], dtype=ml_dtypes.bfloat16)
    inp = th.InferInput("x", [1, 4], "BF16")
    inp.set_data_from_numpy(x, binary_data=True)
    got = decode_request("v2", *_http([inp])).inputs
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float32))
    assert np.array_equal(got, BF16_AS_FP32)
    got = decode_request(GRPC, GRPC_BF16_REQUEST, {}).inputs
    assert got.dtype == np.float32 and got.tobytes() == BF16_AS_FP32.tobytes()


def test_bf16_json_data_is_rounded_to_bfloat16():
    arr = tensors.from_json([1.0, 1.00390625, 1.01171875, float("nan")], (4,), "BF16", "x")
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1.0); 1 + 3·2^-8 rounds up to 1 + 2^-6
    assert arr.dtype == np.float32 and arr[:3].tolist() == [1.0, 1.0, 1.015625] and np.isnan(arr[3])


# --- shared memory ----------------------------------------------------------------------
def test_shared_memory_inputs_are_unsupported_not_decoded_from_an_empty_body():
    inp = th.InferInput("x", [1, 3, 4, 4], "FP32")
    inp.set_shared_memory("region0", 192)
    with pytest.raises(DecodeError) as err:
        decode_request("v2", *_http([inp]))
    assert err.value.kind == "unsupported" and "shared-memory region 'region0'" in str(err.value)
    assert _kind(decode_request, GRPC, GRPC_SHM_REQUEST, {}) == "unsupported"


def test_a_response_output_in_shared_memory_is_skipped_when_another_carries_scores():
    p = np.array([[0.25, 0.75]], dtype=np.float32)
    shm = {"name": "probs", "datatype": "FP32", "shape": [1, 2],
           "parameters": {"shared_memory_region": "out0", "shared_memory_byte_size": 8}}
    both = json.dumps({"outputs": [shm, {"name": "p2", "datatype": "FP32", "shape": [1, 2],
                                         "data": p.ravel().tolist()}]}).encode()
    assert np.array_equal(decode_response("v2", both, {}).outputs, p)
    only = json.dumps({"outputs": [shm]}).encode()
    assert _kind(decode_response, "v2", only, {}) == "unsupported"
    # the gRPC decoder reads the same parameter of an output tensor
    resp = oip_grpc.encode([("probs", p)], "response", raw=False)
    with_shm = _grpc_output_with_parameter(resp, "shared_memory_region", "out0")
    assert _kind(decode_response, GRPC, with_shm, {}) == "unsupported"


def _with_tensor(msg: bytes, rewrite) -> bytes:
    """`msg` with each tensor (field 5 of a request or response) replaced by `rewrite(its fields)`."""
    out = bytearray()
    for num, _, val in oip_grpc.fields(msg):
        if num != 5:
            oip_grpc._bytes_field(out, num, bytes(val))
            continue
        t = bytearray()
        for tnum, tval in rewrite([(tnum, bytes(tval)) for tnum, _, tval in oip_grpc.fields(val)]):
            oip_grpc._bytes_field(t, tnum, tval)
        oip_grpc._bytes_field(out, 5, bytes(t))
    return bytes(out)


def _grpc_output_with_parameter(resp: bytes, key: str, value: str) -> bytes:
    """`resp` (one output, typed contents) with the output's contents replaced by a parameter."""
    return _with_tensor(resp, lambda fs: [(n, v) for n, v in fs if n != 5]
                        + [(4, oip_grpc._param_entry(key, value))])


# --- classification extension, several outputs ------------------------------------------
def test_classification_extension_output_is_unsupported_naming_class_count():
    body = json.dumps({"outputs": [{"name": "probs", "datatype": "BYTES", "shape": [2, 1],
                                    "data": ["0.93:3:three", "0.51:7:seven"]}]}).encode()
    with pytest.raises(DecodeError) as err:
        decode_response("v2", body, {})
    assert err.value.kind == "unsupported" and "class_count" in str(err.value)
    grpc = oip_grpc.encode([("probs", np.array([[b"0.93:3"], [b"0.5:1"]], dtype=object))], "response")
    assert _kind(decode_response, GRPC, grpc, {}) == "unsupported"


def test_grpc_typed_and_raw_contents_mixed_are_refused_naming_the_typed_tensor():
    """The spec allows raw contents only for every tensor of a message; a mix was refused as
    "1 raw contents for 2 outputs", which did not say what was wrong."""
    typed = oip_grpc.encode([("feat", np.zeros((1, 3), np.float32))], "response", raw=False)
    raw = oip_grpc.encode([("head", np.ones((1, 10), np.float32))], "response", raw=True)
    # the typed tensor spec, the raw tensor's spec and its raw contents, in one message
    mixed = bytearray()
    for msg in (typed, raw):
        for num, _, val in oip_grpc.fields(msg):
            if num in (5, 6):
                oip_grpc._bytes_field(mixed, num, bytes(val))
    with pytest.raises(DecodeError, match=r"1 raw contents for 2 outputs, with typed contents in 'feat'"):
        oip_grpc.parse(bytes(mixed), "response")


def test_the_score_output_is_found_among_several_outputs():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 16)).astype(np.float32)
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    for binary in (False, True):
        body, hdrs = oip_v2.encode_response([("embeddings", emb), ("out", logits)], binary=binary)
        # by name without hints, by the model's class count with them
        assert np.array_equal(decode_response("v2", body, hdrs).outputs, logits)
        body, hdrs = oip_v2.encode_response([("feat", emb), ("head", logits)], binary=binary)
        assert np.array_equal(decode_response("v2", body, hdrs, DecodeHints(num_classes=10)).outputs, logits)
    grpc = oip_grpc.encode([("feat", emb), ("head", logits)], "response")
    assert np.array_equal(decode_response(GRPC, grpc, {}, DecodeHints(num_classes=10)).outputs, logits)


def test_the_model_input_is_found_among_several_inputs_by_its_shape():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    mask = np.ones((2, 3), dtype=np.int64)
    a = th.InferInput("mask", list(mask.shape), "INT64")
    a.set_data_from_numpy(mask)
    b = th.InferInput("pixels", list(x.shape), "FP32")
    b.set_data_from_numpy(x, binary_data=False)
    got = decode_request("v2", *_http([a, b]), DecodeHints(raw_shape=(8, 8)))
    assert np.array_equal(got.inputs, x)


# --- JSON values the datatype cannot hold -------------------------------------------------
@pytest.mark.parametrize(("data", "datatype", "kind"), [
    ([[1, 2, 3], [4]], "FP32", "bad_shape"),          # ragged rows, same count as the shape
    ([[1, 2], [3, [4]]], "FP32", "bad_shape"),        # a list where the other rows hold numbers
    ([None, 1], "INT32", "bad_datatype"),             # null is no integer
    ([1.7, 1], "INT32", "bad_datatype"),              # no silent truncation
    ([2, 0], "BOOL", "bad_datatype"),
    (["1", 2], "INT8", "bad_datatype"),
    ([300, 1], "INT8", "bad_datatype"),
    ([2 ** 64, 0], "UINT64", "bad_datatype"),
])
def test_json_data_the_datatype_cannot_hold_is_refused(data, datatype, kind):
    shape = (2, 2) if isinstance(data[0], list) else (2,)
    with pytest.raises(DecodeError) as err:
        tensors.from_json(data, shape, datatype, "x")
    assert err.value.kind == kind
    if kind == "bad_shape":
        assert "[2, 2]" in str(err.value)


def test_kserve_client_nan_written_as_null_reads_as_nan_like_kserve_does():
    from kserve.protocol.infer_type import InferInput, InferRequest

    orjson = pytest.importorskip("orjson")
    inp = InferInput("x", [1, 3], "FP32")
    inp.set_data_from_numpy(np.array([[np.nan, 2.5, -1.0]], dtype=np.float32), binary_data=False)
    body = orjson.dumps(InferRequest("m", [inp]).to_rest()[0])   # what InferenceRESTClient posts
    assert b"null" in body
    got = decode_request("v2", body, V1).inputs
    assert np.isnan(got[0, 0]) and got[0, 1:].tolist() == [2.5, -1.0]


def test_json_integers_beyond_int64_and_whole_floats_decode_exactly():
    assert tensors.from_json([2 ** 64 - 1, 0], (2,), "UINT64", "x").tolist() == [2 ** 64 - 1, 0]
    assert tensors.from_json([3.0, -2], (2,), "INT16", "x").tolist() == [3, -2]
    assert tensors.from_json([1, 0.0], (2,), "BOOL", "x").tolist() == [True, False]


def test_grpc_typed_contents_beyond_the_datatype_are_refused_not_wrapped():
    msg = oip_grpc.encode([("x", np.array([[300, 1]], dtype=np.int32))], raw=False)
    narrowed = _retyped(msg, "INT8")
    assert _kind(decode_request, GRPC, narrowed, {}) == "bad_datatype"
    ok = _retyped(oip_grpc.encode([("x", np.array([[-5, 7]], dtype=np.int32))], raw=False), "INT8")
    got = decode_request(GRPC, ok, {}).inputs
    assert got.dtype == np.int8 and got.tolist() == [[-5, 7]]


def _retyped(msg: bytes, datatype: str) -> bytes:
    """A request whose one input keeps its typed contents but is labelled `datatype`."""
    return _with_tensor(msg, lambda fs: [(n, datatype.encode() if n == 2 else v) for n, v in fs])


def test_hints_for_a_registry_model_carry_its_class_count():
    from testpaths import REPO

    from sentinel.config import Config, ModelConfig
    from sentinel.protocols.hints import hints_for

    if not (REPO / "models/digits/v3/model.yaml").is_file():
        pytest.skip("digits:v3 not in the registry")
    cfg = Config(models=(ModelConfig(name="digits", version="v3", protocol="v2"),), registry=str(REPO / "models"))
    assert hints_for(cfg, cfg.models[0]).class_count == 10


# --- KServe v1: named instances, columnar inputs, base64 as clients write it ------------------


def _v1(doc) -> bytes:
    return json.dumps(doc).encode()


def test_v1_named_instances_read_the_models_input_whatever_the_key_order():
    image, mask = [[1, 2], [3, 4]], [0, 0, 0]
    hints = DecodeHints(raw_shape=(2, 2))
    for inst in ({"image": image, "mask": mask}, {"mask": mask, "image": image}):
        got = decode_request("v1", _v1({"instances": [inst, inst]}), V1, hints).inputs
        assert got.tolist() == [image, image]
    # without the model's shape, two numeric inputs are ambiguous: refused, not the first key's
    with pytest.raises(DecodeError) as err:
        decode_request("v1", _v1({"instances": [{"mask": mask, "image": image}]}), V1)
    assert err.value.kind == "unsupported" and "'mask', 'image'" in str(err.value)
    # a passthrough key (TF Serving's "key") is not an input
    got = decode_request("v1", _v1({"instances": [{"key": "a1", "x": [5, 6]}]}), V1).inputs
    assert got.tolist() == [[5, 6]]
    rows = [{"image": image, "mask": mask}, {"image": image}]
    assert _kind(decode_request, "v1", _v1({"instances": rows}), V1) == "bad_shape"


def test_v1_columnar_inputs_by_name():
    doc = {"inputs": {"mask": [[0, 0, 0]], "image": [[[1, 2], [3, 4]]]}}
    got = decode_request("v1", _v1(doc), V1, DecodeHints(raw_shape=(2, 2))).inputs
    assert got.tolist() == [[[1, 2], [3, 4]]]
    assert decode_request("v1", _v1({"inputs": {"x": [[7, 8]]}}), V1).inputs.tolist() == [[7, 8]]


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_v1_base64_images_wrapped_in_lines_or_url_safe_decode():
    import base64

    img = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    png = _png(img)
    for text in (base64.encodebytes(png).decode(), base64.urlsafe_b64encode(png).decode()):
        got = decode_request("v1", _v1({"instances": [{"image_bytes": {"b64": text}}]}), V1).inputs
        assert np.array_equal(got[0], img)


# --- TorchServe: multipart forms, other image files, base64 in JSON ---------------------------
def test_torchserve_multipart_form_from_httpx_reads_the_data_part():
    import httpx

    img = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    req = httpx.Request("POST", "http://ts/predictions/m",
                        files={"meta": ("m.json", b'{"a": 1}', "application/json"),
                               "data": ("a.png", _png(img), "image/png")})
    body = req.read()
    got = decode_request("torchserve", body, {"content-type": req.headers["content-type"]}).inputs
    assert np.array_equal(got[0], img)
    req = httpx.Request("POST", "http://ts/predictions/m", files={"data": ("x.json", b"[[1, 2], [3, 4]]")})
    got = decode_request("torchserve", req.read(), {"content-type": req.headers["content-type"]}).inputs
    assert got.tolist() == [[1, 2], [3, 4]]
    bad = {"content-type": "multipart/form-data; boundary=nope"}
    assert _kind(decode_request, "torchserve", body, bad) == "missing_field"


def test_sixteen_bit_grey_images_are_scaled_not_clipped():
    wide = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    got = decode_request("torchserve", _png(wide), {"content-type": "image/png"}).inputs
    assert got.dtype == np.uint8 and got.tolist() == [[[0, 1, 128, 255]]]


def test_tiff_and_image_content_types_decode_as_images():
    import io

    from PIL import Image

    img = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "TIFF")
    got = decode_request("torchserve", buf.getvalue(), {"content-type": "application/octet-stream"}).inputs
    assert np.array_equal(got[0], img)
    # an image Content-Type whose bytes are no image: a bad image, not "malformed JSON"
    assert _kind(decode_request, "torchserve", b"\x00\x01junk", {"content-type": "image/x-icon"}) == "bad_image"


def test_torchserve_json_base64_image_string():
    import base64

    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    body = _v1({"data": base64.b64encode(_png(img)).decode()})
    assert np.array_equal(decode_request("torchserve", body, V1).inputs[0], img)
    assert _kind(decode_request, "torchserve", _v1({"data": "aGVsbG8="}), V1) == "unsupported"


def test_sniff_tells_v1_b64_inputs_from_v2_tensors():
    from sentinel.protocols import sniff

    assert sniff(b'{"inputs": [{"b64": "iVBORw0KGgo="}]}', {}) == "v1"
    assert sniff(b'{"inputs": [{"image": [1, 2]}]}', {}) == "v1"
    body, _ = _http([_fp32_input()])
    assert sniff(body, {}) == "v2"
    assert sniff(b'{"id": "1", "outputs": [ {"datatype": "FP32", "name": "p", "shape": [1], "data": [1]}]}', {}) == "v2"


def _fp32_input():
    inp = th.InferInput("x", [1, 2], "FP32")
    inp.set_data_from_numpy(np.ones((1, 2), np.float32))
    return inp


def test_v2_bytes_inputs_holding_base64_images_decode_like_kserve_image_clients_send_them():
    import base64

    from kserve.protocol.infer_type import InferInput, InferRequest

    orjson = pytest.importorskip("orjson")
    imgs = [np.full((4, 4), v, dtype=np.uint8) for v in (0, 200)]
    inp = InferInput("image", [2], "BYTES", data=[base64.b64encode(_png(a)).decode() for a in imgs])
    got = decode_request("v2", orjson.dumps(InferRequest("m", [inp]).to_rest()[0]), V1).inputs
    assert np.array_equal(got, np.stack(imgs))
    text = InferInput("text", [1], "BYTES", data=["aGVsbG8="])   # base64, but not of an image
    body = orjson.dumps(InferRequest("m", [text]).to_rest()[0])
    assert _kind(decode_request, "v2", body, V1) == "unsupported"


def test_text_inputs_are_unsupported_not_malformed():
    assert _kind(decode_request, "v1", _v1({"instances": ["a review", "another"]}), V1) == "unsupported"
    assert _kind(decode_request, "v1", _v1({"instances": [{"b64": "aGVsbG8="}]}), V1) == "unsupported"
    assert _kind(decode_request, "torchserve", _v1({"data": ["some text"]}), V1) == "unsupported"
    # a corrupt image is still a bad image
    assert _kind(decode_request, "v1", _v1({"instances": [{"b64": "iVBORw0KGgoAAAA="}]}), V1) == "bad_image"


def test_v1_tf_serving_columnar_and_other_named_prediction_objects():
    hints = DecodeHints(num_classes=2)
    body = _v1({"outputs": {"classes": [1, 0], "scores": [[0.1, 0.9], [0.8, 0.2]]}})
    got = decode_response("v1", body, V1, hints)
    assert got.kind == "probabilities" and np.allclose(got.outputs, [[0.1, 0.9], [0.8, 0.2]])
    # a Keras layer name and a class id per row: the per-class list is the scores
    got = decode_response("v1", _v1({"predictions": [{"dense_2": [0.2, 0.8], "class_id": 1}]}), V1)
    assert np.allclose(got.outputs, [[0.2, 0.8]])
    got = decode_response("v1", _v1({"predictions": [{"embedding": [1.0, 2.0, 3.0], "out": [2.0, -1.0]}]}), V1, hints)
    assert got.kind == "logits" and np.allclose(got.outputs, [[2.0, -1.0]])
    assert _kind(decode_response, "v1", _v1({"predictions": [{"class_id": 1}]}), V1) == "unsupported"
    assert _kind(decode_response, "v1", _v1({"outputs": {"a": [[1, 2]], "b": [[1, 2], [3, 4]]}}), V1) == "bad_shape"


def test_a_bytes_image_input_is_the_model_input_beside_other_inputs():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    mask = th.InferInput("mask", [1, 3], "INT64")
    mask.set_data_from_numpy(np.zeros((1, 3), dtype=np.int64))
    image = th.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([_png(img)], dtype=object))
    got = decode_request("v2", *_http([mask, image]), DecodeHints(raw_shape=(8, 8))).inputs
    assert np.array_equal(got, img[None])


def test_images_are_read_with_the_models_channels():
    import io

    from PIL import Image

    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[..., 0] = 200
    grey_model = DecodeHints(raw_shape=(4, 4))
    got = decode_request("torchserve", _png(colour), {}, grey_model).inputs
    assert got.shape == (1, 4, 4) and got[0, 0, 0] == Image.new("RGB", (1, 1), (200, 0, 0)).convert("L").getpixel((0, 0))
    colour_model = DecodeHints(input_shape=(3, 4, 4))
    got = decode_request("torchserve", _png(np.full((4, 4), 9, dtype=np.uint8)), {}, colour_model).inputs
    assert got.shape == (1, 4, 4, 3) and (got == 9).all()
    # a palette of greys, model unknown: grey, not three copies
    pal = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    got = decode_request("torchserve", buf.getvalue(), {}).inputs
    assert got.shape == (1, 4, 4) and got.ravel().tolist() == list(range(16))


def test_nan_scores_from_the_model_are_counted_as_its_fault_not_a_bad_shape():
    from kserve.protocol.infer_type import InferOutput, InferResponse

    orjson = pytest.importorskip("orjson")
    out = InferOutput("logits", [2, 3], "FP32")
    out.set_data_from_numpy(np.array([[1.0, np.nan, 0.0], [0.5, 0.2, 0.1]], dtype=np.float32))
    body = orjson.dumps(InferResponse("r", "m", [out]).to_rest()[0])   # orjson writes NaN as null
    got = decode_response("v2", body, V1)   # one bad row of two: the rows as served, the bad one marked
    assert got.finite.tolist() == [False, True] and got.nonfinite_rows == 1 and got.top1.tolist() == [-1, 0]
    assert np.isnan(got.outputs[0, 1]) and got.outputs[1].tolist() == pytest.approx([0.5, 0.2, 0.1])
    out.set_data_from_numpy(np.array([[1.0, np.nan, 0.0], [np.inf, 0.2, 0.1]], dtype=np.float32))
    body = orjson.dumps(InferResponse("r", "m", [out]).to_rest()[0])
    with pytest.raises(DecodeError) as err:   # no row to analyse: the pair is rejected, the model named
        decode_response("v2", body, V1)
    assert err.value.kind == "nonfinite_output" and "all 2 rows" in str(err.value)
    assert _kind(decode_response, "v1", b'{"predictions": [[Infinity, 0.0]]}', V1) == "nonfinite_output"


def test_a_nan_row_does_not_make_probabilities_read_as_logits():
    body = json.dumps({"predictions": [[0.7, 0.2, 0.1], [float("nan"), 0.5, 0.5], [0.1, 0.1, 0.8]]}).encode()
    got = decode_response("v1", body, V1)
    assert got.kind == "probabilities" and got.probabilities is not None and got.nonfinite_rows == 1
    assert got.top1.tolist() == [0, -1, 2]


def test_auto_bodies_relayed_without_their_content_encoding_are_inflated():
    import gzip

    body, _ = oip_v2.encode_request([("x", np.arange(4, dtype=np.float32).reshape(1, 4))])
    ctype = {"content-type": "application/json"}   # all the KServe logger forwards
    got = decode_request("auto", gzip.compress(body, mtime=0), ctype).inputs
    assert got.tolist() == [[0.0, 1.0, 2.0, 3.0]]
    # raw tensor bytes that merely start like gzip are read as they are
    raw = np.frombuffer(b"\x1f\x8b\x08\x00" + bytes(12), dtype=np.float32).reshape(1, 4)
    got = decode_request("auto", raw.tobytes(), {"content-type": "application/octet-stream"},
                         DecodeHints(raw_shape=(4,))).inputs
    assert got.tobytes() == raw.tobytes()


def test_raw_octet_stream_pixels_that_start_like_an_image_file_stay_a_tensor():
    hints = DecodeHints(raw_shape=(8, 8), raw_dtype="uint8")
    pixels = np.zeros((1, 8, 8), dtype=np.uint8)
    pixels[0, 0, :2] = (66, 77)   # "BM", a bitmap's signature
    octet = {"content-type": "application/octet-stream"}
    got = decode_request("torchserve", pixels.tobytes(), octet, hints).inputs
    assert got.dtype == np.uint8 and np.array_equal(got, pixels)
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)   # a real PNG sent as octet-stream is still an image
    assert np.array_equal(decode_request("torchserve", _png(img), octet, hints).inputs[0], img)


def test_wav_audio_is_not_taken_for_an_image():
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(64))
    assert _kind(decode_request, "torchserve", buf.getvalue(), {"content-type": "audio/wav"}) == "unsupported"
    assert _kind(decode_request, "torchserve", buf.getvalue(), {"content-type": "application/octet-stream"}) \
        == "unsupported"   # a raw tensor, but the model's raw shape is not configured
