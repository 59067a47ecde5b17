"""Each detector's statistic and p-value pinned against scipy's reference functions on literal data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sentinel.drift import (
    Combination,
    FeatureShiftTest,
    LabelShiftTest,
    MMDTest,
    Univariate,
    combine,
    ks_statistics,
    pool_sparse,
)
from sentinel.drift.result import DetectorResult
from sentinel.drift.univariate import reference_keys

pytestmark = pytest.mark.unit

REF = np.array([[0.1, 0.5], [0.4, 0.2], [0.35, 0.9], [0.8, 0.8], [0.2, 0.1], [0.9, 0.3],
                [0.55, 0.45], [0.05, 0.7], [0.6, 0.65], [0.3, 0.25], [0.75, 0.95], [0.45, 0.15]])
WIN = np.array([[0.7, 0.5], [0.95, 0.2], [0.85, 0.6], [0.6, 0.8], [0.9, 0.1], [0.65, 0.3],
                [0.8, 0.45], [0.99, 0.7], [0.75, 0.65], [0.5, 0.25]])


def test_ks_statistic_matches_scipy_including_ties():
    ref = np.array([[1.0, 0.0], [2.0, -0.0], [2.0, 1.0], [3.0, 1.0], [5.0, -2.0]])
    win = np.array([[2.0, 1.0], [2.0, 1.0], [-4.0, 3.0], [6.0, 0.0]])
    d = ks_statistics(reference_keys(ref), win)
    for j in range(2):
        assert d[j] == pytest.approx(stats.ks_2samp(ref[:, j], win[:, j]).statistic, abs=1e-12)


def test_ks_statistic_matches_scipy_on_random_columns():
    rng = np.random.default_rng(1)
    ref, win = rng.normal(size=(57, 30)).round(1), rng.normal(0.3, 1, size=(23, 30)).round(1)
    d = ks_statistics(reference_keys(ref), win)
    expect = [stats.ks_2samp(ref[:, j], win[:, j]).statistic for j in range(30)]
    np.testing.assert_allclose(d, expect, atol=1e-12)


def test_bonferroni_ks_p_value_is_scipys_times_features():
    t = FeatureShiftTest("bbsd", REF, ("a", "b"), alpha=0.05)
    r = t.test(WIN)
    ps = [stats.ks_2samp(REF[:, j], WIN[:, j]).pvalue for j in range(2)]
    ds = [stats.ks_2samp(REF[:, j], WIN[:, j]).statistic for j in range(2)]
    assert r.p_value == pytest.approx(min(1.0, 2 * min(ps)), rel=1e-12)
    assert r.statistic == pytest.approx(max(ds))
    assert r.feature == "a" and r.threshold == 0.05
    assert r.alarm == (r.p_value < 0.05)
    assert (r.n_reference, r.n_window) == (12, 10)


def test_cvm_option_matches_scipy():
    t = FeatureShiftTest("bbsd", REF, ("a", "b"), method=Univariate.CVM)
    r = t.test(WIN)
    res = [stats.cramervonmises_2samp(REF[:, j], WIN[:, j]) for j in range(2)]
    j = int(np.argmin([x.pvalue for x in res]))
    assert r.p_value == pytest.approx(min(1.0, 2 * res[j].pvalue), rel=1e-12)
    assert r.statistic == pytest.approx(res[j].statistic)


def test_small_windows_abstain_without_alarm():
    t = FeatureShiftTest("confidence", REF, ("a", "b"))
    r = t.test(WIN[:9])
    assert r.abstained and not r.alarm and math.isnan(r.p_value)
    assert "at least 10" in r.reason
    assert r.to_dict()["p_value"] is None


def test_nan_rows_are_dropped_not_tested():
    t = FeatureShiftTest("x", REF, ("a", "b"))
    win = np.vstack([WIN, [[np.nan, 0.1]], [[np.inf, 0.2]]])
    assert t.test(win).p_value == t.test(WIN).p_value
    with pytest.raises(ValueError, match="NaN"):
        FeatureShiftTest("x", np.vstack([REF, [[np.nan, 1.0]]]), ("a", "b"))


def test_pooling_merges_sparse_classes_until_expected_counts_reach_five():
    table = np.array([[40, 30, 2, 1, 0, 27], [20, 25, 1, 3, 0, 11]], float)
    pooled = pool_sparse(table)
    assert pooled.sum() == table.sum()
    expected = pooled.sum(1, keepdims=True) * pooled.sum(0, keepdims=True) / pooled.sum()
    assert expected.min() >= 5
    # classes 2 and 3 (7 samples: expected 2.6 in the smaller row) join class 5; the empty class is dropped
    assert pooled.shape[1] == 3
    np.testing.assert_array_equal(pooled[:, 0], [30, 15])


def test_label_shift_p_value_is_chi2_contingency_on_pooled_table():
    ref_counts = np.array([40, 30, 2, 1, 0, 27])
    pred = np.repeat(np.arange(6), [20, 25, 1, 3, 0, 11])
    r = LabelShiftTest(ref_counts).test(pred)
    res = stats.chi2_contingency(pool_sparse(np.stack([ref_counts, np.bincount(pred, minlength=6)])),
                                 correction=False)
    assert r.p_value == pytest.approx(res.pvalue, rel=1e-12)
    assert r.statistic == pytest.approx(res.statistic, rel=1e-12)


def test_label_shift_abstains_when_pooling_leaves_one_bin():
    r = LabelShiftTest(np.array([5, 5, 5])).test(np.array([0] * 5 + [1] * 3 + [2] * 2))
    assert r.abstained and "fewer than 2 class bins" in r.reason and not r.alarm


def test_mmd_p_value_counts_the_observed_statistic_and_is_never_zero():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 3))
    t = MMDTest(ref, permutations=19, seed=1)
    r = t.test(rng.normal(5.0, 1.0, size=(30, 3)))    # an enormous shift
    assert r.p_value == pytest.approx(1 / 20) and r.p_value > 0
    assert r.alarm is False                            # 1/20 = 0.05 is not below alpha = 0.05
    r = MMDTest(ref, permutations=199, seed=1).test(rng.normal(5.0, 1.0, size=(30, 3)))
    assert r.p_value == pytest.approx(1 / 200) and r.alarm


def test_mmd_no_shift_p_values_are_roughly_uniform():
    rng = np.random.default_rng(3)
    ps = []
    for i in range(60):
        t = MMDTest(rng.normal(size=(30, 2)), permutations=49, seed=i)
        ps.append(t.test(rng.normal(size=(30, 2))).p_value)
    assert 0.3 < np.mean(ps) < 0.7
    assert np.mean(np.array(ps) < 0.05) <= 0.12


def _res(name: str, p: float, abstained: bool = False) -> DetectorResult:
    if abstained:
        return DetectorResult(name, math.nan, math.nan, 0.05, False, 10, 10, True, "too small")
    return DetectorResult(name, 1.0, p, 0.05, p < 0.05, 10, 10)


def test_bonferroni_combination_multiplies_by_live_detectors():
    r = combine([_res("a", 0.02), _res("b", 0.5), _res("c", 0, abstained=True)], 0.05)
    assert r.p_value == pytest.approx(0.04) and r.alarm and r.feature == "a"
    r = combine([_res("a", 0.03), _res("b", 0.5), _res("c", 0.9)], 0.05)
    assert r.p_value == pytest.approx(0.09) and not r.alarm


def test_cauchy_combination_formula():
    ps = [0.01, 0.2, 0.7]
    t = np.mean(np.tan((0.5 - np.array(ps)) * np.pi))
    r = combine([_res(str(i), p) for i, p in enumerate(ps)], 0.05, Combination.CAUCHY)
    assert r.p_value == pytest.approx(0.5 - np.arctan(t) / np.pi)
    same = combine([_res("a", 0.03), _res("b", 0.03)], 0.05, Combination.CAUCHY)
    assert same.p_value == pytest.approx(0.03)


def test_combined_abstains_when_every_detector_does():
    r = combine([_res("a", 0, True), _res("b", 0, True)], 0.05)
    assert r.abstained and not r.alarm and "every detector abstained" in r.reason
