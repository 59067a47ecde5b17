"""Input layouts: a tensor or image is handed to the analysis in the layout the model declares
(model.yaml `raw_input` + `preprocessing.layout`), moved there when only its channel axis is
elsewhere, or refused when the axis order cannot be told, never read transposed.

Bodies are made by tritonclient (HTTP), kserve's InferRequest and Pillow.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.preprocess import Preprocessing
from sentinel.protocols import decode_request, oip_v2
from sentinel.protocols.base import DecodeHints, input_batch

pytestmark = pytest.mark.unit

th = pytest.importorskip("tritonclient.http")

# A colour model: raw uint8 H×W×3 (NHWC), network 3×4×4; digits-like grey: raw 8×8 (NHW), network 1×32×32.
COLOUR = DecodeHints(raw_shape=(6, 6, 3), raw_dtype="uint8", input_shape=(3, 4, 4), raw_layout="NHWC")
CHW = DecodeHints(raw_shape=(3, 6, 6), input_shape=(3, 4, 4), raw_layout="NCHW")
GREY = DecodeHints(raw_shape=(8, 8), input_shape=(1, 32, 32), raw_layout="NHW")


def _triton(x: np.ndarray, datatype: str = "FP32") -> tuple[bytes, dict[str, str]]:
    inp = th.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=True)
    body, hlen = th.InferenceServerClient.generate_request_body([inp])
    return body, {oip_v2.HEADER_LENGTH: str(hlen)}


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_float_raw_channels_last_is_raw_not_a_network_tensor():
    # FP32 N×H×W×3 pixels for an NHWC model: 4-D float used to be taken for a network tensor
    # (then rejected as input_shape: every sample of such a client lost)
    x = np.random.default_rng(0).uniform(0, 255, (2, 6, 6, 3)).astype(np.float32)
    got = decode_request("v2", *_triton(x), COLOUR)
    assert got.form == "raw" and np.array_equal(got.inputs, x)
    net = np.zeros((2, 3, 4, 4), np.float32)
    got = decode_request("v2", *_triton(net), COLOUR)
    assert got.form == "network" and got.inputs.shape == (2, 3, 4, 4)


def test_channels_first_raw_is_moved_to_the_declared_layout():
    x = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6)   # N×C×H×W sent to an NHWC model
    got = decode_request("v2", *_triton(x), COLOUR)
    assert got.form == "raw" and got.inputs.shape == (2, 6, 6, 3)
    assert got.inputs[1, 4, 5, 2] == x[1, 2, 4, 5]
    # what the analysis then computes equals the preprocessing of the same pixels sent channels-last
    pre = Preprocessing(scale=1 / 255, resize=(4, 4), layout="NHWC")
    assert np.array_equal(pre.apply(got.inputs), pre.apply(x.transpose(0, 2, 3, 1)))
    back = decode_request("v2", *_triton(x.transpose(0, 2, 3, 1).copy()), CHW)   # NHWC to an NCHW model
    assert back.form == "raw" and np.array_equal(back.inputs, x)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 8, 8, 1), (2, 8, 1, 8)])
def test_a_singleton_channel_axis_is_dropped_for_an_nhw_model(shape):
    x = np.arange(128, dtype=np.float32).reshape(shape)
    got = decode_request("v2", *_triton(x), GREY)
    assert got.form == "raw" and got.inputs.shape == (2, 8, 8)
    assert np.array_equal(got.inputs.reshape(-1), x.reshape(-1))


def test_a_channels_last_network_tensor_is_laid_out_nchw():
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    got = decode_request("v1", json.dumps({"instances": x.tolist()}).encode(), {}, GREY)
    assert got.form == "network" and got.inputs.shape == (2, 1, 32, 32)
    assert np.allclose(got.inputs[:, 0], x[..., 0])


def test_an_axis_order_that_cannot_be_told_is_refused():
    hints = DecodeHints(raw_shape=(6, 3, 3), raw_layout="NHWC")   # channels (3) as long as W
    with pytest.raises(DecodeError) as err:
        input_batch(np.zeros((1, 3, 6, 3), np.float32), hints)
    assert err.value.kind == "bad_shape" and "ambiguous" in str(err.value) and "[6, 3, 3]" in str(err.value)
    # the declared shape itself is taken as is
    assert input_batch(np.zeros((1, 6, 3, 3), np.uint8), hints).form == "raw"


def test_images_are_laid_out_as_the_models_raw_input():
    rgb = np.random.default_rng(2).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    png = _png(rgb)
    hwc = decode_request("torchserve", png, {"content-type": "image/png"}, COLOUR).inputs
    assert hwc.shape == (1, 6, 6, 3) and np.array_equal(hwc[0], rgb)
    chw = decode_request("torchserve", png, {"content-type": "image/png"}, CHW).inputs
    assert chw.shape == (1, 3, 6, 6) and np.array_equal(chw[0], rgb.transpose(2, 0, 1))
    grey = _png(rgb[..., 0].copy())
    one = DecodeHints(raw_shape=(1, 6, 6), raw_layout="NCHW")
    doc = {"instances": [{"b64": __import__("base64").b64encode(grey).decode()}] * 2}
    got = decode_request("v1", json.dumps(doc).encode(), {}, one).inputs
    assert got.shape == (2, 1, 6, 6) and np.array_equal(got[1, 0], rgb[..., 0])


def test_hints_for_a_registry_model_carry_its_layout():
    from testpaths import REPO

    from sentinel.config import Config, ModelConfig
    from sentinel.protocols.hints import hints_for

    if not (REPO / "models/digits/v3/model.yaml").is_file():
        pytest.skip("digits:v3 not in the registry")
    cfg = Config(models=(ModelConfig(name="digits", version="v3", protocol="v2"),), registry=str(REPO / "models"))
    hints = hints_for(cfg, cfg.models[0])
    assert hints.layout == "NHW" and hints.raw_shape == (8, 8) and hints.image_channels == 1
    got = decode_request("v2", *_triton(np.ones((3, 1, 8, 8), np.float32)), hints)
    assert got.form == "raw" and got.inputs.shape == (3, 8, 8)


def test_a_torchserve_single_instance_in_another_layout_is_a_batch_of_one():
    x = np.arange(3 * 6 * 6, dtype=np.float32).reshape(3, 6, 6)   # one C×H×W instance, no batch axis
    got = decode_request("torchserve", json.dumps(x.tolist()).encode(), {"content-type": "application/json"}, COLOUR)
    assert got.form == "raw" and got.inputs.shape == (1, 6, 6, 3) and np.array_equal(got.inputs[0], x.transpose(1, 2, 0))
    one = np.ones((8, 8, 1), np.float32)   # H×W×1 for an H×W model
    got = decode_request("torchserve", json.dumps(one.tolist()).encode(), {}, GREY)
    assert got.form == "raw" and got.inputs.shape == (1, 8, 8)


def test_among_several_inputs_the_models_is_found_in_another_layout():
    meta = th.InferInput("meta", [2, 2], "FP32")
    meta.set_data_from_numpy(np.zeros((2, 2), np.float32), binary_data=True)
    img = th.InferInput("image", [2, 1, 8, 8], "FP32")
    img.set_data_from_numpy(np.full((2, 1, 8, 8), 7, np.float32), binary_data=True)
    body, hlen = th.InferenceServerClient.generate_request_body([meta, img])
    got = decode_request("v2", body, {oip_v2.HEADER_LENGTH: str(hlen)}, GREY)   # was 'meta', a 2×2 "input"
    assert got.form == "raw" and got.inputs.shape == (2, 8, 8) and (got.inputs == 7).all()


def test_a_model_whose_raw_and_network_shapes_are_one_keeps_floats_as_network_tensors():
    # hints_for gives a model without raw_input its network shape as raw shape: a float N×C×H×W batch
    # is already preprocessed (read as raw, the analysis would normalise it a second time)
    same = DecodeHints(raw_shape=(3, 4, 4), input_shape=(3, 4, 4), raw_layout="NCHW")
    assert input_batch(np.zeros((2, 3, 4, 4), np.float32), same).form == "network"
    assert input_batch(np.zeros((2, 3, 4, 4), np.uint8), same).form == "raw"
    assert input_batch(np.zeros((2, 4, 4, 3), np.float32), same).form == "network"   # laid out N×C×H×W


def test_an_axis_order_with_the_channels_in_the_middle_is_refused():
    with pytest.raises(DecodeError) as err:
        input_batch(np.zeros((1, 6, 3, 6), np.float32), COLOUR)   # N×H×C×W
    assert err.value.kind == "bad_shape" and "not with the channels at one end" in str(err.value)
