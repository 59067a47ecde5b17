"""A client normalising with some other mean/std: the affine candidate `normalization_mismatch`."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from test_signals import _images, _rgb_suite

from sentinel.drift.diagnosis import Diagnoser, diagnose, explaining

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def fitted() -> tuple[Diagnoser, np.ndarray, np.ndarray, np.ndarray]:
    x, y = _images(300)
    w, wy = _images(80, seed=1)
    return Diagnoser(x, y), np.bincount(y) / len(y), w, wy


def _diagnose(fitted, window, predicted=None, alarm=True):
    dg, shares, _, wy = fitted
    window = np.ascontiguousarray(window).astype(np.float32)
    return diagnose(alarm, [], diagnoser=dg, window_features=dg.features(window),
                    predicted=wy if predicted is None else predicted, golden_predicted_shares=shares)


@pytest.mark.parametrize(("a", "b"), [(0.44, 0.5), (1.7, -0.3), (0.6, -0.2)])
def test_an_affine_normalisation_is_named_with_its_map(fitted, a, b):
    """Neither a pure factor nor an offset: read covariate_shift before the affine candidate."""
    d = _diagnose(fitted, fitted[2] * a + b)
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "normalization_mismatch"), d.reason
    assert d.affine is not None and d.parameter is None
    assert d.affine["scale"][0] == pytest.approx(a, rel=0.05)
    assert d.affine["offset"][0] == pytest.approx(b, abs=0.05)
    assert f"x*{d.affine['scale'][0]:.3g}" in d.reason
    assert d.to_dict()["affine"] == d.affine


@pytest.mark.parametrize(("a", "b"), [(-0.5, 0.8), (-2.0, 1.7), (-1.0, 1.4)])
def test_an_inverted_image_normalised_some_other_way_is_named_with_its_map(fitted, a, b):
    """A decreasing map (an inverted image, then another normalisation) read input_contract or
    covariate_shift with no transform: it is fitted with golden's statistics mirrored."""
    d = _diagnose(fitted, fitted[2] * a + b)
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "normalization_mismatch"), d.reason
    assert d.affine["scale"][0] == pytest.approx(a, rel=0.05)
    assert d.affine["offset"][0] == pytest.approx(b, abs=0.05)
    assert "the image inverted" in d.reason and f"x*{d.affine['scale'][0]:.3g}" in d.reason


@pytest.mark.parametrize(("shift", "expected"), [
    (lambda w: w * 16.0, "multiply"),               # special cases of the affine map keep their names
    (lambda w: w + 0.5, "offset"),
    (lambda w: 1.0 - w, "invert"),                 # the plain inversion keeps its name
    (lambda w: w[..., ::-1, ::-1], "rotate_180"),
])
def test_simpler_candidates_are_preferred(fitted, shift, expected):
    d = _diagnose(fitted, shift(fitted[2]))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", expected), d.reason
    assert d.affine is None


@pytest.mark.parametrize("shift", [
    lambda w, r: np.clip(w + r.normal(0, 0.15, w.shape), 0, 1),                 # noise
    lambda w, r: (w + r.normal(0, 0.15, w.shape)) * 0.5 + 0.3,                  # noise, then renormalised
    lambda w, r: gaussian_filter(w, (0, 0, 1, 1)),                              # blur
    lambda w, r: np.where(np.arange(8)[None, None, :, None] == 3, 0, w),        # a dead row
    lambda w, r: w ** 0.5,                                                      # gamma: monotonic, not affine
    lambda w, r: np.clip(w + 0.15, 0, 1),              # brightness clipped at the top: nearly affine
])
def test_real_covariate_shifts_are_not_a_normalisation(fitted, shift):
    d = _diagnose(fitted, shift(fitted[2], np.random.default_rng(5)))
    assert d.kind == "covariate_shift" and d.transform is None, (d.transform, d.candidates)


def test_prior_shift_and_a_clean_window_are_not_a_normalisation(fitted):
    _, _, w, wy = fitted
    keep = wy == 1
    d = _diagnose(fitted, w[keep], predicted=wy[keep])
    assert d.kind == "prior_shift" and d.transform is None
    assert _diagnose(fitted, w, alarm=False).kind == "none"


def test_the_affine_candidate_yields_to_a_special_case_that_fits_about_as_well():
    cands = {"identity": (500.0, None, 900.0), "normalization_mismatch": (0.5, None, 20.0),
             "multiply": (2.4, 16.0, 60.0)}
    assert explaining(cands)[0] == "multiply"              # within AFFINE_MARGIN
    cands["multiply"] = (3.5, 16.0, 60.0)                  # the affine map fits clearly better
    assert explaining(cands)[0] == "normalization_mismatch"
    cands["normalization_mismatch"] = (0.5, None, 50.0)    # the affine fit must be exact: no z² above FIT_MAX
    assert explaining(cands)[0] == "multiply"
    cands["normalization_mismatch"] = (4.0, None, 20.0)    # ... and d below AFFINE_FIT
    assert explaining(cands)[0] == "multiply"
    cands["normalization_mismatch"] = (0.5, None, 20.0)
    cands["blur"] = (0.8, None, 10.0)                      # a non-special candidate as good: ambiguous
    assert explaining(cands)[0] is None


def test_an_affine_fit_that_is_a_factor_or_an_offset_is_left_to_that_candidate(fitted):
    dg, _, w, _ = fitted
    for window in (w * 16.0, w + 0.5, w):
        assert "normalization_mismatch" not in dg.search(dg.features(window.astype(np.float32)))
    assert "normalization_mismatch" in dg.search(dg.features((w * 16.0 + 0.5).astype(np.float32)))


@pytest.mark.slow
def test_an_rgb_client_with_other_mean_std_is_named_with_the_mean_std_it_used():
    """An NHWC model normalising with ImageNet's mean/std; clients normalising with (0.5, 0.5, 0.5)
    / (0.25, 0.3, 0.2), with one grey mean/std for all channels (means off by a few hundredths), or
    with ImageNet's in BGR order: the diagnosis names each and reports the mean/std it used (the
    grey one read input_contract with no transform)."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics

    suite, pre, model, w = _rgb_suite()
    mean, std = np.asarray(pre.mean), np.asarray(pre.std)
    for m2, s2 in (((0.5, 0.5, 0.5), (0.25, 0.3, 0.2)), ((0.45, 0.45, 0.45), (0.226, 0.226, 0.226)),
                   (mean[::-1], std[::-1])):
        x = ((w / 255 - np.array(m2)) / np.array(s2)).transpose(0, 3, 1, 2).astype(np.float32)
        smp = suite.samples(x, model(x))
        v = suite.evaluate(Window(model(x), input_statistics(x), signatures=smp.signatures,
                                  violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
        d = v.diagnosis
        assert (d.kind, d.transform) == ("preprocessing_mismatch", "normalization_mismatch"), (d.kind, d.reason)
        assert d.affine is not None
        np.testing.assert_allclose(d.affine["mean"], m2, atol=0.015)
        np.testing.assert_allclose(d.affine["std"], s2, rtol=0.05)
        assert f"as a normalisation: mean ({d.affine['mean'][0]:.3g}, " in d.reason


@pytest.mark.slow
def test_an_inverted_rgb_client_is_named_against_the_full_scale_not_goldens_range():
    """8-bit RGB whose golden set tops out at (240, 220, 250): a client inverting with 255 − x
    (a full-scale inversion) and normalising as the model does is `invert` (the candidate took
    golden's lo + hi, so this read normalization_mismatch "then x*1+15.1"); inverting and then
    normalising with 0.5/0.25 is named with that mean/std, after "the image inverted (255 − x)"."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics

    suite, pre, model, w = _rgb_suite()

    def diagnosis(m2, s2):
        x = (((255 - w) / 255 - np.array(m2)) / np.array(s2)).transpose(0, 3, 1, 2).astype(np.float32)
        smp = suite.samples(x, model(x))
        return suite.evaluate(Window(model(x), input_statistics(x), signatures=smp.signatures,
                                     violating=smp.violations.any(axis=1), verdicts=smp.verdicts)).diagnosis

    d = diagnosis(pre.mean, pre.std)
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "invert"), d.reason
    d = diagnosis((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "normalization_mismatch"), d.reason
    assert all(v < 0 for v in d.affine["scale"])
    np.testing.assert_allclose(d.affine["mean"], 0.5, atol=0.015)
    np.testing.assert_allclose(d.affine["std"], 0.25, rtol=0.05)
    assert "the image inverted ((255, 255, 255) − x)" in d.reason


def test_a_share_of_the_window_mapped_is_not_read_as_the_whole_window_mapped(fitted):
    """Half the window x*0.44+0.5: the window's means equal those of a milder map over all of it
    (so that map fitted, and the whole window read transformed: lower bound 0 at accuracy ~0.5).
    The spread tells them apart; the violating samples' own map is named, with their share."""
    dg, shares, w, wy = fitted
    half = np.arange(len(w)) % 2 == 0
    mixed = np.where(half[:, None, None, None], w * 0.44 + 0.5, w).astype(np.float32)
    f = dg.features(mixed)
    assert dg.search(f)["normalization_mismatch"][0] > 3.0            # no longer fits the whole window
    d = diagnose(True, [], diagnoser=dg, window_features=f, predicted=wy, golden_predicted_shares=shares,
                 violating=half)
    assert (d.kind, d.transform) == ("input_contract", "normalization_mismatch"), d.reason
    assert d.affine["scale"][0] == pytest.approx(0.44, rel=0.05)
    assert d.transformed_share == pytest.approx(0.5, abs=0.1)


def test_digits_from_a_few_writers_normalised_with_other_statistics(digits_v3, digits_golden):
    """digits:v3 expects mean 0.3 / std 0.4 on the 0..1 scale. The first 100 holdout digits (a few
    writers: their spreads differ from golden's, d over the log variances 3.1) normalised with
    ImageNet's red or MNIST's statistics are named with those statistics (the first read
    input_contract when the means and the variances each had to fit below AFFINE_FIT); the same
    digits brightened by 2 and clipped are not."""
    from sentinel.drift import Reference, Settings, Suite
    from sentinel.training.digits import load_split

    suite = Suite(Reference.from_golden(digits_golden), Settings(detectors=("label",)))
    images, _, _ = load_split()
    raw = images[np.asarray(digits_v3.manifest.split.holdout)[:100]].astype(np.float32)
    pre = digits_v3.manifest.preprocessing
    for m, s in ((0.485, 0.229), (0.1307, 0.3081)):
        x = 16 * (0.3 + 0.4 * (raw / 16 - m) / s)
        d = diagnose(True, [], diagnoser=suite.diagnoser, window_features=suite.diagnoser.features(pre.apply(x)))
        assert d.transform == "normalization_mismatch", d.reason
        assert d.affine["mean"][0] == pytest.approx(m, abs=0.01) and d.affine["std"][0] == pytest.approx(s, rel=0.03)
        # inverted (white digits on black turned black on white) before the same normalisation
        x = 16 * (0.3 + 0.4 * ((16 - raw) / 16 - m) / s)
        d = diagnose(True, [], diagnoser=suite.diagnoser, window_features=suite.diagnoser.features(pre.apply(x)))
        assert d.transform == "normalization_mismatch" and d.affine["scale"][0] < 0, d.reason
        assert d.affine["mean"][0] == pytest.approx(m, abs=0.01) and d.affine["std"][0] == pytest.approx(s, rel=0.03)
        assert "as a normalisation of the inverted image" in d.reason
    bright = np.clip(raw + 2, 0, 16)
    d = diagnose(True, [], diagnoser=suite.diagnoser, window_features=suite.diagnoser.features(pre.apply(bright)))
    assert d.kind == "covariate_shift" and d.transform is None, d.reason


def test_a_few_clients_too_few_to_alarm_are_named_by_the_violating_samples_map(fitted):
    """10% of the window x*0.44+0.5 and flagged by the contract, the detectors quiet: the window
    read input_contract with no transform (the non-alarming branch never searched); the
    violating samples' own map is named, with their share. Fewer than 5 of them name nothing."""
    dg, shares, w, wy = fitted
    some = np.arange(len(w)) % 10 == 0
    mixed = np.where(some[:, None, None, None], w * 0.44 + 0.5, w).astype(np.float32)
    f = dg.features(mixed)
    d = diagnose(False, [], diagnoser=dg, window_features=f, predicted=wy, golden_predicted_shares=shares,
                 violating=some)
    assert (d.kind, d.transform) == ("input_contract", "normalization_mismatch"), d.reason
    assert d.affine["scale"][0] == pytest.approx(0.44, rel=0.05)
    assert d.transformed_share == pytest.approx(0.1, abs=0.05)
    assert "did not alarm" in d.reason and "x*0.44" in d.reason
    few = np.arange(len(w)) < 4
    d = diagnose(False, [], diagnoser=dg, window_features=f, predicted=wy, golden_predicted_shares=shares,
                 violating=few)
    assert (d.kind, d.transform, d.transformed_share) == ("input_contract", None, None), d.reason


@pytest.mark.parametrize(("scale", "top", "expected"), [
    (1 / 255, 240.0, 255.0),     # golden within [0, 255]: the full scale, whatever golden reaches
    (1 / 16, 16.0, 16.0),        # digits
    (1 / 127.5, 250.0, None),    # x/127.5 − 1 written as a scale: golden passes 1/scale, its own range stands
    (1.0, 240.0, None),          # no scale: nothing says where the range ends
])
def test_the_inversion_is_about_the_full_scale_only_where_the_preprocessing_names_it(scale, top, expected):
    from types import SimpleNamespace

    from sentinel.drift.suite import _source
    from sentinel.preprocess import Preprocessing

    raw = np.random.default_rng(0).uniform(0, top, (20, 1, 4, 4))
    raw[0, 0, 0, 0] = top
    src = _source(SimpleNamespace(raw=raw, preprocessing=Preprocessing(scale=scale, mean=(0.5,), std=(0.25,))))
    assert src is not None
    if expected is None:
        assert src.full_scale is None
        np.testing.assert_allclose(src.invert_sum, raw.min() + top)
    else:
        np.testing.assert_allclose(src.full_scale, [expected])
        np.testing.assert_allclose(src.invert_sum, [expected])


@pytest.mark.parametrize("factor", [16.0, 4.0, 0.25])
def test_the_share_of_a_fitted_factor_is_fitted_on_the_violating_samples(fitted, factor):
    """A quarter of the window scaled (flagged by the contract): the factor fitted on the whole
    window's extremes is a milder one, whose mixture share read ~0.8 or no share at all; fitted on
    the violating samples, the share is the quarter that was scaled."""
    dg, shares, w, wy = fitted
    some = np.arange(len(w)) % 4 == 0
    mixed = np.where(some[:, None, None, None], w * factor, w).astype(np.float32)
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(mixed), predicted=wy,
                 golden_predicted_shares=shares, violating=some)
    assert (d.kind, d.transform) == ("input_contract", "multiply" if factor > 1 else "divide"), d.reason
    assert d.transformed_share == pytest.approx(0.25, abs=0.08)
