"""`pool_sparse` (bisection over cumulative counts) against the plain greedy loop it replaced."""

from __future__ import annotations

import numpy as np
import pytest

from sentinel.drift import pool_sparse

pytestmark = pytest.mark.unit


def _greedy(table: np.ndarray, min_expected: float = 5.0) -> np.ndarray:
    """The rule written out column by column: the oracle."""
    t = np.asarray(table, dtype=np.float64)
    t = t[:, t.sum(axis=0) > 0]
    if t.shape[1] == 0:
        return t
    total, r_min = t.sum(), t.sum(axis=1).min()
    bins, acc = [], np.zeros(2)
    for c in np.argsort(t.sum(axis=0), kind="stable"):
        acc = acc + t[:, c]
        if r_min * acc.sum() / total >= min_expected:
            bins.append(acc)
            acc = np.zeros(2)
    if acc.sum() > 0:
        if bins:
            bins[-1] = bins[-1] + acc
        else:
            bins.append(acc)
    return np.stack(bins, axis=1)


@pytest.mark.parametrize("seed", range(40))
def test_pooling_equals_the_greedy_rule(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 2, 3, 10, 100, 1000]))
    scale = float(rng.choice([0.05, 0.5, 2.0, 20.0, 500.0]))
    table = rng.poisson(scale * rng.gamma(0.5, 2.0, size=(2, k))).astype(np.float64)
    if seed % 7 == 0:
        table[1] = 0                                   # an empty row: one bin, never enough
    min_expected = float(rng.choice([5.0, 1.0, 0.0, 12.5]))
    np.testing.assert_array_equal(pool_sparse(table, min_expected), _greedy(table, min_expected))


def test_empty_table_stays_empty():
    assert pool_sparse(np.zeros((2, 4))).shape == (2, 0)
