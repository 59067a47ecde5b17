"""The vectorised KS path (sorted reference keys, one merge per window, cached p-values) against scipy.

Every statistic must equal scipy.stats.ks_2samp's on the same (float32-representable) values, and
every p-value scipy's to 1e-12, on random columns with and without ties, negative values, −0.0,
unequal sample sizes, and sizes where scipy switches from the exact to the asymptotic p-value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sentinel.drift import FeatureShiftTest
from sentinel.drift.univariate import _counts_for, _ks_pvalue_lattice

pytestmark = pytest.mark.unit


def _f32(a: np.ndarray) -> np.ndarray:
    """Values exactly representable in float32 (the precision the detectors compare at), as float64."""
    return np.asarray(a, np.float32).astype(np.float64)


def _check(ref: np.ndarray, win: np.ndarray) -> None:
    f = ref.shape[1]
    t = FeatureShiftTest("x", ref, tuple(f"f{i}" for i in range(f)))
    n, m = len(ref), len(win)
    gaps = t.gaps(win)
    res = [stats.ks_2samp(ref[:, j], win[:, j], method="auto") for j in range(f)]
    np.testing.assert_allclose(gaps / (n * m), [r.statistic for r in res], rtol=0, atol=1e-12)
    r = t.test(win)
    j = int(np.argmax([x.statistic for x in res]))
    assert r.feature == f"f{j}"
    assert r.statistic == pytest.approx(res[j].statistic, abs=1e-12)
    assert r.p_value == pytest.approx(min(1.0, f * res[j].pvalue), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(6))
def test_continuous_nonnegative_columns_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n, m = [(100, 100), (57, 23), (200, 120), (64, 48), (31, 200), (150, 150)][seed]
    ref = _f32(rng.dirichlet(np.ones(40), size=n))
    win = _f32(rng.dirichlet(np.linspace(0.5, 2, 40), size=m))
    _check(ref, win)


@pytest.mark.parametrize("seed", range(6))
def test_discrete_columns_with_ties_match_scipy(seed):
    rng = np.random.default_rng(100 + seed)
    n, m = [(60, 40), (25, 75), (100, 100), (12, 10), (80, 33), (200, 50)][seed]
    levels = [1, 2, 3, 5, 20, 1000][seed]
    ref = rng.integers(0, levels, size=(n, 25)).astype(np.float64) / levels
    win = rng.integers(0, levels, size=(m, 25)).astype(np.float64) / levels
    win[:, 0] = ref[: m % n or 1, 0].repeat(m)[:m]      # one column of a single repeated value
    _check(_f32(ref), _f32(win))


def test_signed_values_and_negative_zero_take_the_general_path():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(90, 12)).round(1)
    win = rng.normal(0.4, 1.0, size=(70, 12)).round(1)
    ref[::3, 0], win[::2, 0] = -0.0, 0.0
    _check(_f32(ref), _f32(win))
    pos = np.abs(ref)                                   # non-negative reference, a window with a negative value
    t = FeatureShiftTest("x", pos, tuple(map(str, range(12))))
    assert t._ref32 is not None
    _check(_f32(pos), _f32(win))


def test_float32_window_against_float64_reference_compares_at_float32():
    rng = np.random.default_rng(3)
    ref = rng.dirichlet(np.ones(30), size=120)                      # float64
    win = rng.dirichlet(np.ones(30), size=80).astype(np.float32)    # as served
    t = FeatureShiftTest("bbsd", ref, tuple(map(str, range(30))))
    expect = [stats.ks_2samp(_f32(ref[:, j]), win[:, j].astype(np.float64)).statistic for j in range(30)]
    np.testing.assert_allclose(t.gaps(win) / (120 * 80), expect, rtol=0, atol=1e-12)


def test_asymptotic_p_value_above_scipys_exact_limit():
    rng = np.random.default_rng(11)
    ref = _f32(rng.normal(size=(12_000, 2)))
    win = _f32(rng.normal(0.1, 1.0, size=(300, 2)))
    _check(ref, win)


@pytest.mark.parametrize(("n", "m"), [(10, 10), (12, 10), (1000, 1000), (7, 13), (300, 200), (10_001, 3)])
def test_lattice_p_value_is_scipys_for_every_attainable_gap(n, m):
    rng = np.random.default_rng(n * m)
    g = math.gcd(n, m)
    for _ in range(20):
        a, b = int(rng.integers(0, n + 1)), int(rng.integers(0, m + 1))
        c = a * m - b * n
        a2, b2 = _counts_for(n, m, c)
        assert a2 * m - b2 * n == c and 0 <= a2 <= n and 0 <= b2 <= m
        ref = np.r_[np.zeros(a), np.ones(n - a)]
        win = np.r_[np.zeros(b), np.ones(m - b)]
        expect = stats.ks_2samp(ref, win, method="auto").pvalue
        assert _ks_pvalue_lattice(n, m, abs(c) // g) == pytest.approx(expect, rel=1e-12, abs=1e-300)


def test_unattainable_gap_is_refused():
    with pytest.raises(ValueError, match="no ECDF gap"):
        _counts_for(10, 10, 10 * 10 + 10)


@pytest.mark.parametrize("chunk", [1, 150, 1000])
def test_features_in_blocks_give_the_same_statistics(monkeypatch, chunk):
    from sentinel.drift import univariate

    monkeypatch.setattr(univariate, "CHUNK", chunk)      # blocks of 1 feature, 2 features, several
    rng = np.random.default_rng(chunk)
    ref = _f32(rng.dirichlet(np.ones(13), size=70).round(3))
    win = _f32(rng.dirichlet(np.linspace(0.5, 2, 13), size=50).round(3))
    _check(ref, win)
    _check(_f32(ref - 0.05), _f32(win - 0.05))           # signed: the 64-bit path, also in blocks
