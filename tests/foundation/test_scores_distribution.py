"""scores.is_distribution: the vectorised check equals numpy's allclose definition, NaN included."""

from __future__ import annotations

import numpy as np
import pytest

from sentinel.scores import is_distribution

pytestmark = pytest.mark.unit


def _reference(s: np.ndarray) -> bool:
    return bool(s.size and s.min() >= -1e-6 and s.max() <= 1 + 1e-6 and np.allclose(s.sum(-1), 1.0, atol=1e-3))


def test_matches_allclose_on_random_rows():
    rng = np.random.default_rng(7)
    for _ in range(3000):
        s = rng.random((int(rng.integers(1, 5)), int(rng.integers(1, 12))))
        s /= s.sum(-1, keepdims=True)
        if rng.random() < 0.7:   # near and beyond the tolerance
            s = s + rng.normal(0, 10 ** rng.uniform(-7, -1), s.shape)
        if rng.random() < 0.05:
            s[0, 0] = np.nan
        assert is_distribution(s) == _reference(s)


@pytest.mark.parametrize("row,expected", [
    ([0.5, 0.5], True), ([0.5, 0.501], True), ([0.5, 0.502], False), ([np.nan, 1.0], False),
    ([1.5, -0.5], False), ([], False),
])
def test_edges(row, expected):
    assert is_distribution(np.array([row], dtype=np.float64)) is expected
