"""KServe v1 and TorchServe decoding, and inference path routing."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from sentinel.protocols import DecodeError, decode_request, decode_response, match

pytestmark = pytest.mark.unit


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_v1_instances_and_predictions():
    req = decode_request("v1", b'{"instances": [[[0.0, 1.0], [2.0, 3.0]], [[4, 5], [6, 7]]]}', {})
    assert req.inputs.shape == (2, 2, 2) and req.inputs.dtype == np.float32 and req.form == "raw"
    resp = decode_response("v1", b'{"predictions": [[0.9, 0.1], [0.2, 0.8]]}', {})
    assert resp.kind == "probabilities" and resp.outputs.shape == (2, 2)
    resp = decode_response("v1", b'{"predictions": [[3.5, -1.0, 0.0]]}', {})
    assert resp.kind == "logits"


def test_v1_network_form_and_row_format():
    x = np.zeros((1, 1, 4, 4)).tolist()
    assert decode_request("v1", json.dumps({"instances": x}).encode(), {}).form == "network"
    rows = {"instances": [{"input_1": [1, 2, 3]}, {"input_1": [4, 5, 6]}]}
    assert decode_request("v1", json.dumps(rows).encode(), {}).inputs.shape == (2, 3)


def test_v1_b64_images():
    img = np.full((5, 6, 3), 200, np.uint8)
    body = json.dumps({"instances": [{"b64": base64.b64encode(_png(img)).decode()}]}).encode()
    req = decode_request("v1", body, {})
    assert req.inputs.shape == (1, 5, 6, 3) and req.form == "raw"


def test_v1_prediction_objects():
    body = b'{"predictions": [{"probabilities": [0.5, 0.5], "class": 0}]}'
    assert decode_response("v1", body, {}).kind == "probabilities"


@pytest.mark.parametrize("body,kind", [
    (b'{"predictions": [1, 7]}', "unsupported"),          # class labels only
    (b'{"predictions": [[1, 2], [3]]}', "bad_shape"),      # ragged
    (b'{"predictions": [["a", "b"]]}', "unsupported"),      # class names, not scores
    (b'{"outputs_missing": 1}', "missing_field"),
    (b'nope', "malformed_json"),
])
def test_v1_response_errors(body, kind):
    with pytest.raises(DecodeError) as info:
        decode_response("v1", body, {})
    assert info.value.kind == kind


def test_v1_bad_b64():
    with pytest.raises(DecodeError) as info:
        decode_request("v1", b'{"instances": [{"b64": "***"}]}', {})
    assert info.value.kind == "bad_image"


def test_torchserve_image_and_json():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    req = decode_request("torchserve", _png(img), {"content-type": "image/png"})
    assert req.inputs.shape == (1, 4, 4)
    assert decode_request("torchserve", b'{"data": [[1, 2], [3, 4]]}', {}).inputs.shape == (2, 2)
    assert decode_response("torchserve", b"[0.1, 0.9]", {}).outputs.shape == (1, 2)
    assert decode_response("torchserve", b"[[0.1, 0.9], [1, 0]]", {}).outputs.shape == (2, 2)


def test_torchserve_topk_mapping_is_unsupported():
    with pytest.raises(DecodeError) as info:
        decode_response("torchserve", b'{"tabby": 0.4, "tiger_cat": 0.3}', {})
    assert info.value.kind == "unsupported"


def test_corrupt_image_is_bad_image():
    with pytest.raises(DecodeError) as info:
        decode_request("torchserve", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, {})
    assert info.value.kind == "bad_image"


@pytest.mark.parametrize("path,expected", [
    ("/v2/models/digits/infer", ("digits", None, "v2")),
    ("/v2/models/digits/versions/3/infer?x=1", ("digits", "3", "v2")),
    ("/v1/models/digits:predict", ("digits", None, "v1")),
    ("/predictions/resnet", ("resnet", None, "torchserve")),
    ("/predictions/resnet/2.0", ("resnet", "2.0", "torchserve")),
    ("/v2/health/ready", None),
    ("/v2/models/digits", None),
    ("/v1/models/digits:explain", None),
    ("/metrics", None),
])
def test_routes(path, expected):
    r = match(path)
    assert (None if r is None else (r.model, r.version, r.protocol)) == expected
