"""Diagnosis on RGB models whose images are never black: a scale mismatch is named as one.

Photographs rarely have a pixel at 0; the fitted multiply/divide candidates scaled golden about its
typical minimum (0 for digits, so right there), which for such images is not what a scale mismatch
does (0–1 floats sent to a 0–255 model divide every raw value, about 0): the window was named
`normalization_mismatch` with a made-up mean/std instead of `divide` by 255.
"""

from __future__ import annotations

import numpy as np
import pytest

from sentinel.drift import Reference, Settings, Suite, Window
from sentinel.drift.features import input_statistics
from sentinel.preprocess import Preprocessing

pytestmark = pytest.mark.unit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photos(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N×16×16×3 images on 0–255 with warm backgrounds (darkest pixel ~40, never 0): 3 classes of stripes."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = np.empty((n, 16, 16, 3))
    idx = np.arange(16)
    for i, c in enumerate(y):
        img = np.broadcast_to(r.uniform([70, 50, 40], [110, 90, 60]), (16, 16, 3)).copy()
        stripes = ((idx + r.integers(0, 4)) % 4) < 2
        img[..., c] += np.broadcast_to(stripes[:, None] if c != 1 else stripes[None, :], (16, 16)) * 120
        x[i] = img + r.normal(0, 6, img.shape)
    return np.clip(x, 0, 255), y


def _model(net: np.ndarray) -> np.ndarray:
    m = net.mean(axis=(2, 3))
    return np.stack([m[:, 0] - m[:, 2], m[:, 1] - m[:, 0], m[:, 2] - m[:, 1]], axis=1) * 3


def _diagnosis(pre: Preprocessing, golden_raw: np.ndarray, y: np.ndarray, window_raw: np.ndarray):
    net = pre.apply(golden_raw)
    suite = Suite(Reference(_model(net), y, inputs=net, raw=golden_raw, preprocessing=pre),
                  Settings(detectors=("bbsd", "label", "input_stats")))
    x = pre.apply(window_raw)
    smp = suite.samples(x, _model(x))
    v = suite.evaluate(Window(_model(x), input_statistics(x), signatures=smp.signatures,
                              violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
    return v.diagnosis


@pytest.fixture(scope="module")
def photos():
    raw, y = _photos(200, 0)
    return raw, y, _photos(120, 1)[0]


def test_unit_floats_sent_to_a_0_255_model_are_named_divide_by_255(photos):
    raw, y, w = photos
    pre = Preprocessing(scale=1 / 255, mean=MEAN, std=STD, layout="NHWC")
    d = _diagnosis(pre, raw.astype(np.uint8), y, (w.astype(np.uint8) / 255.0).astype(np.float32))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "divide"), d.reason
    assert 1 / d.parameter == pytest.approx(255, rel=0.05)


def test_0_255_sent_to_a_unit_float_model_is_named_multiply_by_255(photos):
    raw, y, w = photos
    pre = Preprocessing(scale=1.0, mean=MEAN, std=STD, layout="NHWC")
    d = _diagnosis(pre, (raw / 255).astype(np.float32), y, w.astype(np.float32))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "multiply"), d.reason
    assert d.parameter == pytest.approx(255, rel=0.05)

