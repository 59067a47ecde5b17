"""An RGB model whose server takes uint8 NHWC images: golden sets keep the raw dtype, and replay
sends UINT8, as model.yaml's raw_input says (it sent FP32: a server declaring UINT8 refuses that,
and the sidecar's input contract counted every replayed sample as a dtype violation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rgbmodel import rgb_images, tiny_rgb_entry

pytestmark = pytest.mark.unit



@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    from sentinel.golden import build_golden

    root = tmp_path_factory.mktemp("rgb")
    entry = tiny_rgb_entry(root)
    g = build_golden(entry, root / "golden", ids=np.arange(40), raw=rgb_images(40))
    return entry, g


def test_golden_set_keeps_uint8_raw_images(rgb):
    _, g = rgb
    assert g.raw.dtype == np.uint8                     # was float32
    assert np.array_equal(g.raw, rgb_images(40))


@pytest.mark.parametrize("binary", [False, True])
def test_replay_sends_uint8_images_as_uint8(rgb, binary):
    from sentinel.replay.session import select_samples
    from sentinel.replay.wire import WireFormat

    entry, g = rgb
    s = select_samples(entry, g)
    assert s.inputs.dtype == np.uint8
    _, body = WireFormat("v2", "rgb", binary=binary).encode(s.inputs[0])
    head = json.loads(body[:body.index(b"}]}") + 3] if binary else body)
    assert head["inputs"][0]["datatype"] == "UINT8" and head["inputs"][0]["shape"] == [1, 16, 16, 3]


def test_a_float_golden_set_of_whole_numbers_is_sent_in_the_declared_dtype(rgb, tmp_path):
    """Golden sets built before raw kept its dtype hold uint8 images as float32."""
    from sentinel.golden import build_golden
    from sentinel.replay.session import select_samples

    entry, _ = rgb
    g = build_golden(entry, tmp_path / "g", ids=np.arange(12), raw=rgb_images(12).astype(np.float32))
    s = select_samples(entry, g)
    assert s.inputs.dtype == np.uint8 and np.array_equal(s.inputs, rgb_images(12))
    # values that are not uint8 images are sent as they are, not wrapped or truncated
    g2 = build_golden(entry, tmp_path / "g2", ids=np.arange(12), raw=rgb_images(12).astype(np.float32) + 0.5)
    assert select_samples(entry, g2).inputs.dtype == np.float32
