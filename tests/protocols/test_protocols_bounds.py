"""Decoders bound what an outsider's payload can make them do, before allocating or recursing."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.errors import DecodeError
from sentinel.protocols import DecodeHints, kserve_v1, oip_v2, torchserve
from sentinel.protocols.base import MAX_JSON_DEPTH, json_depth, json_prefix_length

pytestmark = pytest.mark.unit

DECODERS = {
    "v2.request": oip_v2.decode_request, "v2.response": oip_v2.decode_response,
    "v1.request": kserve_v1.decode_request, "v1.response": kserve_v1.decode_response,
    "torchserve.request": torchserve.decode_request, "torchserve.response": torchserve.decode_response,
}
HINTS = DecodeHints(raw_shape=(1, 8, 8), input_shape=(1, 8, 8), classes=("a", "b"))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_deep_json_is_refused_before_parsing(name):
    body = b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"   # ~4 KB, once a RecursionError
    with pytest.raises(DecodeError) as info:
        DECODERS[name](body, {"content-type": "application/json"}, HINTS)
    assert info.value.kind in ("too_deep", "malformed_json")
    bare = b"[" * 100_000
    with pytest.raises(DecodeError):
        DECODERS[name](bare, {}, HINTS)


def test_json_depth_ignores_brackets_in_strings_and_escapes():
    assert json_depth(b'{"a": "[[[[[[", "b": [1, [2]]}') == 3
    assert json_depth(b'{"a": "\\"[[[[", "b": []}') == 2
    assert json_depth(b'["\\\\", [[]]]') == 3
    assert json_prefix_length(b'{"a": "}"}\x00\x01{') == 10


@pytest.mark.parametrize("shape,kind", [
    ([0, 2**62], "too_large"), ([2**40, 2**40], "too_large"), ([3, 0, 2**31], "too_large"),
    ([2, 3], "bad_shape"), ([-1, 6], "bad_shape"), ([1] * 40, "bad_shape"), ([True, 6], "bad_shape"),
])
def test_shapes_are_checked_before_allocation(shape, kind):
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]})
    with pytest.raises(DecodeError) as info:
        oip_v2.decode_request(body.encode(), {})
    assert info.value.kind == kind


def test_binary_shape_with_zero_and_huge_dim_is_refused():
    head = json.dumps({"inputs": [{"name": "x", "shape": [0, 2**62], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 0}}]}).encode()
    with pytest.raises(DecodeError) as info:
        oip_v2.decode_request(head, {oip_v2.HEADER_LENGTH: str(len(head))})
    assert info.value.kind == "too_large"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose IHDR is rewritten to claim width × height (CRC fixed)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = bytearray(png[12:29])            # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def test_image_pixels_bounded_from_the_header_before_decoding():
    bomb = _png_claiming(13000, 13000)
    assert len(bomb) < 100
    arr = np.empty(1, dtype=object)
    arr[0] = bomb
    body, hdrs = oip_v2.encode([("img", arr)], "inputs", binary=True)
    with pytest.raises(DecodeError) as info:
        oip_v2.decode_request(body, hdrs, HINTS)
    assert info.value.kind == "too_large" and "13000×13000" in str(info.value)
    with pytest.raises(DecodeError) as info:
        torchserve.decode_request(bomb, {"content-type": "image/png"}, HINTS)
    assert info.value.kind == "too_large"


def test_image_limit_scales_with_the_model_input_and_small_images_decode():
    assert DecodeHints(input_shape=(3, 224, 224)).image_pixel_limit == max(1 << 24, 256 * 224 * 224)
    assert DecodeHints(input_shape=(3, 2048, 2048)).image_pixel_limit == 256 * 2048 * 2048
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, format="PNG")
    req = torchserve.decode_request(buf.getvalue(), {}, DecodeHints(max_image_pixels=200))
    assert req.inputs.shape == (1, 10, 20, 3)
    with pytest.raises(DecodeError):
        torchserve.decode_request(buf.getvalue(), {}, DecodeHints(max_image_pixels=199))


def test_raw_octet_stream_without_a_configured_shape_says_what_to_configure():
    with pytest.raises(DecodeError) as info:
        torchserve.decode_request(np.zeros(64, "<f4").tobytes(), {"content-type": "application/octet-stream"})
    assert info.value.kind == "unsupported" and "raw_input" in str(info.value)
    with pytest.raises(DecodeError) as info:
        torchserve.decode_request(b"\0" * 10, {"content-type": "application/octet-stream"}, HINTS)
    assert info.value.kind == "bad_shape"


def test_depth_limit_is_generous_for_real_tensors():
    x = np.zeros((1, 3, 4, 4), np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": x.tolist()}]})
    assert json_depth(body.encode()) < MAX_JSON_DEPTH
    assert oip_v2.decode_request(body.encode(), {}).inputs.shape == (1, 3, 4, 4)


_json_docs = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(alphabet='[]{}"\\ab', max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3),
                                                                           inner, max_size=4)),
    max_leaves=30)


def _true_depth(doc) -> int:
    if isinstance(doc, list):
        return 1 + max((_true_depth(d) for d in doc), default=0)
    if isinstance(doc, dict):
        return 1 + max((_true_depth(d) for d in doc.values()), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(_json_docs, st.binary(max_size=16))
def test_depth_scan_matches_the_parsed_structure(doc, tail):
    text = json.dumps(doc).encode()
    assert json_depth(text) == _true_depth(doc)
    if isinstance(doc, dict):   # the object's end is found whatever bytes follow it
        assert json_prefix_length(text + tail) == len(text)
