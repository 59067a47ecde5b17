"""The gate's statistical tests on literal counts, checked against scipy's reference implementations."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from sentinel.gate import stats

pytestmark = pytest.mark.unit


def test_two_proportions_z_matches_the_textbook_formula():
    r = stats.two_proportions(10, 1000, 40, 1000)
    p = 50 / 2000
    z = (0.04 - 0.01) / math.sqrt(p * (1 - p) * (2 / 1000))
    assert r.test == "two_proportion_z"
    assert r.statistic == pytest.approx(z)
    assert r.p_value == pytest.approx(sps.norm.sf(z))
    # one-sided: a canary with fewer errors is not "worse"
    assert stats.two_proportions(40, 1000, 10, 1000).p_value > 0.99


def test_two_proportions_falls_back_to_fisher_when_sparse():
    r = stats.two_proportions(0, 300, 3, 300)
    assert r.test == "fisher_exact"
    assert r.p_value == pytest.approx(sps.fisher_exact([[3, 297], [0, 300]], alternative="greater").pvalue)


def test_two_proportions_without_samples_is_nan():
    assert math.isnan(stats.two_proportions(0, 0, 0, 10).p_value)


def test_above_rate_is_the_exact_binomial_test():
    r = stats.above_rate(1, 500, 0.001)
    assert r.p_value == pytest.approx(1 - 0.999 ** 500)   # P(X >= 1)
    assert stats.above_rate(10, 500, 0.001).p_value < 1e-6


def test_homogeneity_matches_scipy_chi2_contingency_when_no_merging_is_needed():
    a, b = [51, 54, 56, 46, 46, 59, 53, 44, 44, 44], [80, 58, 66, 52, 50, 66, 33, 47, 16, 29]
    h = stats.homogeneity(a, b)
    ref = sps.chi2_contingency([a, b], correction=False)
    assert h.columns == 10 and h.dof == 9
    assert h.statistic == pytest.approx(ref.statistic)
    assert h.p_value == pytest.approx(ref.pvalue)
    assert h.cramers_v == pytest.approx(math.sqrt(ref.statistic / (sum(a) + sum(b))))


def test_homogeneity_merges_sparse_columns_and_identical_counts_give_zero():
    h = stats.homogeneity([100, 1, 0, 0, 2], [100, 1, 0, 0, 2])
    assert h.statistic == 0 and h.p_value == 1.0
    assert h.columns < 5
    with pytest.raises(ValueError, match="differ in length"):
        stats.homogeneity([1, 2], [1])


def test_quantile_interpolates_like_histogram_quantile():
    cum = {0.01: 50.0, 0.1: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert stats.quantile(0.5, cum) == pytest.approx(0.01)
    assert stats.quantile(0.7, cum) == pytest.approx(0.01 + 0.09 * 20 / 40)
    assert stats.quantile(0.99, cum) == pytest.approx(0.1 + 0.9 * 9 / 10)
    # a rank in the +Inf bucket gives the highest finite bound
    assert stats.quantile(0.99, {0.1: 10.0, math.inf: 100.0}) == pytest.approx(0.1)
    assert math.isnan(stats.quantile(0.5, {0.1: 0.0, math.inf: 0.0}))


def test_differences_from_cumulative_buckets():
    assert stats.differences({0.1: 5.0, 0.5: 7.0, math.inf: 7.0}) == [5.0, 2.0, 0.0]


def test_balanced_cramers_v_ignores_the_split_and_equals_v_at_an_even_split():
    a = [50.0, 50.0, 100.0]
    b = [100.0, 20.0, 80.0]
    h = stats.homogeneity(a, b)
    assert h.balanced_v == pytest.approx(h.cramers_v)            # equal totals: the same V
    small = stats.homogeneity([x * 100 for x in a], b)            # 100:1 split, same distributions
    assert small.balanced_v == pytest.approx(h.balanced_v)
    assert small.cramers_v < h.cramers_v / 2                      # plain V shrinks with the split
    assert stats.homogeneity([100.0, 0.0], [0.0, 100.0]).balanced_v == pytest.approx(1.0)


def test_category_shift_finds_a_class_only_one_sample_has():
    a = [2000] * 10 + [0]
    b = [18] * 10 + [20]
    i, p = stats.category_shift(a, b)
    assert i == 10 and p < 1e-20
    # same shares: nothing significant, p is Bonferroni-capped at 1
    i, p = stats.category_shift([100, 200, 300], [10, 20, 30])
    assert p == pytest.approx(1.0)
    assert stats.category_shift([5, 5], [0, 0]) == (-1, 1.0)
