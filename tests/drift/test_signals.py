"""Input contract, diagnosis, support verdicts and weighted Bonferroni on literal data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sentinel.drift.combine import combine
from sentinel.drift.diagnosis import Diagnoser, diagnose
from sentinel.drift.inputcontract import CHECKS, InputContract, check
from sentinel.drift.result import decide
from sentinel.drift.support import (
    LIKELY_CORRECT,
    LIKELY_WRONG,
    UNKNOWN,
    KnnSupport,
    lower_bound,
    verdicts,
)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _images(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 1×8×8 images in [0, 1]: a bar in the upper left, or a bar on the right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.zeros((n, 1, 8, 8))
    for i, c in enumerate(y):
        if c == 0:
            x[i, 0, 1:4, 0:6] = 1.0
        else:
            x[i, 0, 1:8, 5:7] = 1.0
    x += rng.uniform(0, 0.2, x.shape)
    return np.clip(x, 0, 1).astype(np.float32), y


def test_contract_flags_each_check_per_sample():
    x, _ = _images()
    c = InputContract.derive(x)
    assert c.low[0] >= 0 and c.high[0] <= 1 and c.shape == (1, 8, 8)
    bad = x[:6].copy()
    bad[0] *= 255                          # out of range (and saturated)
    bad[1, 0, 0, 0] = np.nan               # non-finite
    bad[2] = bad[2] / 16                   # flat: low dynamic range
    bad[3] = 1.0                           # all at the high extreme: saturated
    rep = check(c, bad)
    v = {name: rep.violations[:, i].tolist() for i, name in enumerate(CHECKS)}
    assert v["out_of_range"] == [True, False, False, False, False, False]
    assert v["nonfinite"] == [False, True, False, False, False, False]
    assert v["low_dynamic_range"][2] and v["saturated"][3] and not v["saturated"][4]
    assert rep.violating.tolist() == [True, True, True, True, False, False]
    assert check(c, x).violating.sum() == 0                 # the golden set satisfies its own contract
    assert check(c, x[:3], dtype_kind="i").counts()["dtype"] == 3
    assert check(c, np.zeros((2, 1, 4, 4))).counts()["shape"] == 2
    assert InputContract.from_json(c.to_json()) == c


@pytest.mark.parametrize(("transform", "expected"), [
    (lambda a: a[..., ::-1], "flip_horizontal"),
    (lambda a: a[..., ::-1, :], "flip_vertical"),
    (lambda a: np.swapaxes(a, -1, -2), "transpose"),
    (lambda a: 1.0 - a, "invert"),
    (lambda a: a * 16.0, "multiply"),
])
def test_diagnosis_names_the_transform(transform, expected):
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(60, seed=1)
    shifted = np.ascontiguousarray(transform(w.astype(np.float64))).astype(np.float32)
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(shifted), predicted=wy,
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", expected)
    clean = diagnose(True, [], diagnoser=dg, window_features=dg.features(w), predicted=wy)
    assert clean.kind == "prior_shift"                      # inputs match golden: only the outputs could move
    assert diagnose(False, [], diagnoser=dg, window_features=dg.features(shifted)).kind == "none"


@pytest.mark.parametrize(("k", "expected"), [(1, "rotate_90"), (2, "rotate_180"), (3, "rotate_270")])
def test_diagnosis_names_rotations_not_a_neighbouring_symmetry(k, expected):
    """A rotation by 90° agrees with a transpose in every orientation-free feature: it must not be
    called one (before the eight symmetries were candidates it was named `transpose`)."""
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(60, seed=1)
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(np.ascontiguousarray(np.rot90(w, k, (2, 3)))),
                 predicted=wy, golden_predicted_shares=np.bincount(y) / len(y))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", expected)


@pytest.mark.parametrize("transform", [
    lambda a: np.rot90(1.0 - a, 1, (2, 3)),                       # two candidates composed
    lambda a: np.roll(a, 2, axis=3),                               # a translation: not a candidate
])
def test_diagnosis_names_no_transform_when_none_fits(transform):
    """Shifts outside the candidate set get a generic kind, never a confidently wrong transform."""
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(200, seed=4)
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(np.ascontiguousarray(transform(w))),
                 predicted=wy, golden_predicted_shares=np.bincount(y) / len(y))
    assert d.kind == "covariate_shift" and d.transform is None, (d.kind, d.transform, d.candidates)
    assert "no one candidate" in d.reason


def test_ambiguous_candidates_are_not_named():
    from sentinel.drift.diagnosis import explaining

    cands = {"identity": (500.0, None, 900.0), "flip_vertical": (1.0, None, 5.0), "rotate_180": (1.5, None, 6.0),
             "blur": (80.0, None, 300.0)}
    assert explaining(cands)[0] is None and "about equally" in explaining(cands)[1]
    cands["rotate_180"] = (3.0, None, 6.0)
    assert explaining(cands)[0] == "flip_vertical"
    cands["flip_vertical"] = (1.0, None, 90.0)            # one feature far off: no fit
    assert explaining(cands)[0] == "rotate_180"
    cands["multiply"] = (0.5, 3.0, 90.0)                  # a fitted factor is allowed more
    assert explaining(cands)[0] == "multiply"


def test_prior_shift_is_inputs_explained_by_class_shares():
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(400, seed=2)
    keep = wy == 1                                           # class 0 knocked out
    d = diagnose(True, [decide("label", 9.0, 1e-6, 0.05, 300, 60, "2 bins")], diagnoser=dg,
                 window_features=dg.features(w[keep][:60]), predicted=wy[keep][:60],
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert d.kind == "prior_shift" and d.detectors == {"label": "2 bins"}
    assert d.class_shift["0"] < -0.4


def test_contract_violations_make_input_contract_kind():
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(100, seed=3)
    w[:10] = w[:10] * 1.3 + 0.5                              # 10% of the window broken, not a clean transform
    viol = np.zeros(100, bool)
    viol[:10] = True
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(w), violating=viol, predicted=wy)
    assert d.kind == "input_contract" and d.contract_violating_share == pytest.approx(0.1)


def test_contract_violations_are_named_even_when_the_detectors_cannot_alarm():
    """Non-finite samples never reach the detectors: a window of them must not read "none"."""
    viol = np.zeros(100, bool)
    viol[:3] = True                                           # 3% >= CONTRACT_SHARE (2%)
    d = diagnose(False, [], violating=viol)
    assert d.kind == "input_contract" and "did not alarm" in d.reason
    assert diagnose(False, [], violating=np.ones(40, bool)).contract_violating_share == 1.0
    viol[:] = False
    viol[0] = True                                            # 1%: below the share, nothing to say
    assert diagnose(False, [], violating=viol).kind == "none"
    assert diagnose(False, [], violating=None).kind == "none"


def test_support_and_verdicts():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 3))
    s = KnnSupport.fit(ref)
    assert np.mean(s.score(rng.normal(size=(400, 3))) > 1) < 0.03
    assert (s.score(np.full((2, 3), 8.0)) > 1).all()
    codes = verdicts(np.array([0.9, 0.1, 0.95, 0.99]), 0.5, np.array([False, False, True, False]))
    assert codes.tolist() == [LIKELY_CORRECT, LIKELY_WRONG, UNKNOWN, LIKELY_CORRECT]
    assert lower_bound(codes) == (0.5, 0.25)


def test_weighted_bonferroni():
    rs = [decide("label", 1.0, 0.015, 0.05, 100, 100), decide("bbsd", 1.0, 0.5, 0.05, 100, 100),
          decide("confidence", 1.0, 0.9, 0.05, 100, 100)]
    plain = combine(rs, 0.05)
    weighted = combine(rs, 0.05, weights={"label": 2.0})
    assert plain.p_value == pytest.approx(0.045) and weighted.p_value == pytest.approx(0.015 * 4 / 2)
    assert weighted.feature == "label"


def test_stored_contract_is_digest_checked(tmp_path):
    import shutil
    from pathlib import Path

    from sentinel.errors import IntegrityError
    from sentinel.golden import load_contract, load_golden

    src = Path(__file__).resolve().parents[2] / "golden_sets" / "digits" / "v3"
    dst = tmp_path / "g"
    shutil.copytree(src, dst)
    c = load_contract(load_golden(dst))
    assert c is not None and c.shape == (1, 32, 32) and c.low[0] == pytest.approx(-0.75)
    text = (dst / "contract.json").read_text()
    (dst / "contract.json").write_text(text.replace('"tolerance": 0.05', '"tolerance": 0.5'))
    with pytest.raises(IntegrityError, match="contract.json"):
        load_contract(load_golden(dst))
    (dst / "contract.json").unlink()
    assert load_contract(load_golden(dst)) is None          # absent: derived from the inputs on load


def _two_class_suite():
    """A suite on the two-class images whose 'model' reads the class off the image's left half."""
    from sentinel.drift import Reference, Settings, Suite

    x, y = _images(300)

    def logits(a: np.ndarray) -> np.ndarray:
        left = a[:, 0, :, :4].mean(axis=(1, 2)) - a[:, 0, :, 4:].mean(axis=(1, 2))
        return np.stack([40 * left, -40 * left], axis=1)

    golden_logits = logits(x)
    assert (golden_logits.argmax(1) == y).mean() > 0.95
    return Suite(Reference(golden_logits, y, inputs=x), Settings(detectors=("bbsd", "label", "input_stats"))), logits


def test_lower_bound_counts_a_named_transform_as_unknown():
    """A horizontally flipped window on which the per-sample verdicts all read likely_correct (as
    they do on digits, where a flipped digit stays in the golden support and the model is
    confidently wrong): the diagnosis names the flip, and the samples it explains must not be
    counted as correct (before: the lower bound read 1.0 at accuracy 0)."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics
    from sentinel.drift.support import LIKELY_CORRECT

    suite, logits = _two_class_suite()
    w, wy = _images(200, seed=5)
    flipped = np.ascontiguousarray(w[..., ::-1])
    lg = logits(flipped)
    fooled = np.full(len(w), LIKELY_CORRECT, np.int8)
    v = suite.evaluate(Window(lg, input_statistics(flipped), labels=wy, signatures=suite.diagnoser.features(flipped),
                              violating=np.zeros(len(w), bool), verdicts=fooled))
    assert v.drift and (v.diagnosis.kind, v.diagnosis.transform) == ("preprocessing_mismatch", "flip_horizontal")
    assert v.diagnosis.transformed_share > 0.9 and v.accuracy < 0.05
    assert v.estimated_accuracy["atc_lower"] <= v.accuracy + 0.1 and v.reliable is False
    assert v.unknown_share > 0.9
    half = np.concatenate([flipped[:100], w[100:]])               # half the window flipped
    v = suite.evaluate(Window(logits(half), input_statistics(half), labels=wy, signatures=suite.diagnoser.features(half),
                              violating=np.zeros(len(w), bool), verdicts=fooled))
    if v.diagnosis.transformed_share is not None:
        assert v.estimated_accuracy["atc_lower"] <= v.accuracy + 0.1
    clean_lg = logits(w)
    smp = suite.samples(w, clean_lg)
    v = suite.evaluate(Window(clean_lg, input_statistics(w), labels=wy, signatures=smp.signatures,
                              violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
    assert not v.drift and v.diagnosis.transformed_share is None
    assert abs(v.estimated_accuracy["atc_lower"] - v.accuracy) <= 0.03


def test_outside_share_bounds_the_shifted_share_of_a_window():
    from sentinel.drift.support import outside_share

    rng = np.random.default_rng(7)
    ref = rng.uniform(0, 1, 300)
    assert max(outside_share(rng.uniform(0, 1, 200), ref) for _ in range(20)) < 0.1   # same distribution
    moved = np.concatenate([rng.uniform(0, 1, 100), rng.uniform(0.8, 1.0, 100)])      # half moved up, in range
    assert 0.2 < outside_share(moved, ref) <= 0.5
    assert outside_share(rng.uniform(0.9, 1.0, 200), ref) > 0.7
    # class-dependent reference scores: a window of one class is not "outside" once reweighted
    cls = np.repeat([0, 1], 150)
    ref2 = np.where(cls == 0, rng.uniform(0, 0.5, 300), rng.uniform(0.5, 1, 300))
    win = rng.uniform(0.5, 1, 200)
    assert outside_share(win, ref2) > 0.3
    assert outside_share(win, ref2, reference_weights=(cls == 1).astype(float)) < 0.1


def test_lower_bound_counts_a_population_outside_the_support():
    """Every sample passes the per-sample kNN check, but the window as a whole lies farther from the
    golden set than golden samples lie from each other: that share is unknown, and the estimate
    says it is unreliable (before: lower bound 1.0, reliable)."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics
    from sentinel.drift.support import LIKELY_CORRECT

    suite, logits = _two_class_suite()
    w, wy = _images(200, seed=6)
    sup = suite.input_support
    moved = np.clip(w + np.random.default_rng(0).normal(0, 0.02, w.shape), 0, 1).astype(np.float32)   # sensor noise
    sig = suite.diagnoser.features(moved)
    assert (sup.score(sig) <= 1).mean() > 0.9                  # almost every sample passes one by one
    fooled = np.full(len(w), LIKELY_CORRECT, np.int8)
    v = suite.evaluate(Window(logits(moved), input_statistics(moved), labels=wy, signatures=sig,
                              violating=np.zeros(len(w), bool), verdicts=fooled))
    assert v.outside_share > 0.3
    assert v.estimated_accuracy["atc_lower"] <= 1 - v.outside_share and v.reliable is False
    sig = suite.diagnoser.features(w)
    v = suite.evaluate(Window(logits(w), input_statistics(w), labels=wy, signatures=sig,
                              violating=np.zeros(len(w), bool), verdicts=fooled))
    assert v.outside_share < 0.1 and v.estimated_accuracy["atc_lower"] == 1.0 and v.reliable


def test_a_transform_on_part_of_the_window_is_named_with_its_share():
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(300, seed=8)
    part = w.copy()
    part[:90] = part[:90, ..., ::-1]                          # 30% of the traffic flipped (one client)
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(part), predicted=wy,
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert (d.kind, d.transform) == ("preprocessing_mismatch", "flip_horizontal"), d.reason
    assert d.transformed_share == pytest.approx(0.3, abs=0.1)
    # every sample moved a little (coarser values): not a share of the samples binarized
    coarse = np.round(w * 3) / 3
    d = diagnose(True, [], diagnoser=dg, window_features=dg.features(coarse), predicted=wy,
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert d.transform is None and d.kind == "covariate_shift", d.reason


def test_label_shift_with_moving_input_statistics_is_prior_shift():
    """Traffic of one class: the input statistics move with the class mix (their test alarms), but
    the golden set reweighted to the window's classes explains the inputs (before: covariate_shift,
    and the reweighted golden set's standard errors used all N samples instead of the few weighted)."""
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(600, seed=9)
    keep = np.flatnonzero(wy == 1)[:150]
    d = diagnose(True, [decide("label", 9.0, 1e-9, 0.05, 300, 150, "class 1"),
                        decide("input_stats", 9.0, 1e-9, 0.05, 300, 150, "mean_c0")],
                 diagnoser=dg, window_features=dg.features(w[keep]), predicted=wy[keep],
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert d.kind == "prior_shift", d.reason
    noisy = np.clip(w[:150] + np.random.default_rng(1).normal(0, 0.05, w[:150].shape), 0, 1)
    d = diagnose(True, [decide("input_stats", 9.0, 1e-9, 0.05, 300, 150, "std_c0")],
                 diagnoser=dg, window_features=dg.features(noisy.astype(np.float32)), predicted=wy[:150],
                 golden_predicted_shares=np.bincount(y) / len(y))
    assert d.kind == "covariate_shift"


def test_a_wire_dtype_alone_does_not_make_samples_unknown():
    """Integers where floats were expected, same values: the dtype violation is counted, but the
    network sees the same inputs, so ATC still judges them (before: every sample unknown, bound 0)."""
    from sentinel.drift.support import UNKNOWN

    suite, logits = _two_class_suite()
    w, _ = _images(50, seed=10)
    smp = suite.samples(w, logits(w), dtype_kind="i")
    assert smp.violations[:, CHECKS.index("dtype")].all()
    assert (smp.verdicts != UNKNOWN).mean() > 0.9
    bad = w.copy()
    bad[:5] *= 40                                             # values out of range: unknown, whatever the dtype
    assert (suite.samples(bad, logits(bad), dtype_kind="f").verdicts[:5] == UNKNOWN).all()


def test_true_accuracy_counts_nonfinite_outputs_as_wrong():
    from sentinel.drift import Window

    suite, logits = _two_class_suite()
    w, wy = _images(100, seed=11)
    lg = logits(w)
    lg[:10] = np.nan                                           # the client got NaN for 10 of 100 requests
    v = suite.evaluate(Window(lg, labels=wy))
    assert v.n == 90
    assert v.accuracy == pytest.approx((logits(w)[10:].argmax(1) == wy[10:]).sum() / 100)


def test_lower_bound_follows_a_transform_that_started_recently():
    """A client began sending flipped images 80 requests ago: the last 50 samples are all
    transformed, and the bound says so (as it does for recent unknown verdicts), not 1 − 40%."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics
    from sentinel.drift.support import LIKELY_CORRECT

    suite, logits = _two_class_suite()
    w, wy = _images(200, seed=12)
    x = w.copy()
    x[-80:] = x[-80:, ..., ::-1]
    v = suite.evaluate(Window(logits(x), input_statistics(x), labels=wy, signatures=suite.diagnoser.features(x),
                              violating=np.zeros(len(x), bool), verdicts=np.full(len(x), LIKELY_CORRECT, np.int8)))
    assert (v.diagnosis.kind, v.diagnosis.transform) == ("preprocessing_mismatch", "flip_horizontal"), v.diagnosis.reason
    assert v.diagnosis.transformed_share == pytest.approx(0.4, abs=0.1)
    assert v.estimated_accuracy["atc_lower"] < 0.3 and v.unknown_share > 0.7


def test_a_window_outside_the_support_is_not_called_prior_shift():
    """Inputs that match the class-reweighted golden means can still lie outside its support as a
    population (a dead pixel row on a quarter of the traffic): then it is not only the class mix."""
    x, y = _images(300)
    dg = Diagnoser(x, y)
    w, wy = _images(200, seed=13)
    label = [decide("label", 9.0, 1e-9, 0.05, 300, 200, "class 1")]
    args = {"diagnoser": dg, "window_features": dg.features(w), "predicted": wy,
            "golden_predicted_shares": np.bincount(y) / len(y)}
    assert diagnose(True, label, **args).kind == "prior_shift"
    assert diagnose(True, label, outside_share=0.05, **args).kind == "prior_shift"
    d = diagnose(True, label, outside_share=0.3, **args)
    assert d.kind == "covariate_shift" and "outside the golden support" in d.reason


def test_nonfinite_rows_have_no_signature_and_a_window_of_them_says_no_usable_samples():
    """Rows with a NaN input get a NaN signature (their zero-filled stand-in pulled the diagnosis: 70%
    scaled + 30% NaN read input_contract with no transform, and the violating flags no longer lined
    up with the finite signature rows); a window with no finite output says it has nothing to judge."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics

    suite, logits = _two_class_suite()
    w, wy = _images(100, seed=13)
    w[:70] = w[:70] * 4.0                                    # a wrong scale on 70%
    w[70:] = np.nan                                          # and NaN on the rest
    lg = logits(w)
    smp = suite.samples(w, lg)
    assert np.isnan(smp.signatures[70:]).all() and np.isfinite(smp.signatures[:70]).all()
    assert smp.ood[70:].all() and (smp.verdicts[70:] == UNKNOWN).all()
    v = suite.evaluate(Window(lg, input_statistics(w), labels=wy, signatures=smp.signatures,
                              violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
    assert v.n == 70 and v.samples == 100 and v.reliable is False
    assert v.diagnosis.transform == "multiply" and v.unreliable_reason
    # every output non-finite: no estimate, and the reason says there was nothing usable
    nan_lg = np.full((40, 2), np.nan)
    v = suite.evaluate(Window(nan_lg, violating=np.ones(40, bool), verdicts=np.full(40, UNKNOWN, np.int8)))
    assert v.n == 0 and v.samples == 40 and np.isnan(v.estimated_accuracy["atc"])
    assert v.estimated_accuracy["atc_lower"] == 0.0 and v.reliable is False
    assert v.combined.abstained and v.diagnosis.kind == "input_contract"
    assert v.unreliable_reason.startswith("no usable samples: no finite model outputs (40 in the window")


def test_transform_like_flags_samples_nearer_a_transformed_golden_than_golden():
    """Golden on one side of feature 0, its mirror image the transform: a mirrored sample is flagged
    (it may well pass the kNN support check), a clean one rarely, one on the mirror axis (symmetric:
    as near golden as its mirror, the model reads it the same) never."""
    from sentinel.drift.support import TRANSFORM_LIKE_FPR, TRANSFORM_LIKE_RATIO, TransformLike

    rng = np.random.default_rng(0)

    def draw(n):
        f = rng.normal(size=(n, 4))
        f[:, 0] = 1.5 + 0.5 * np.abs(f[:, 0])
        return f

    golden = draw(400)
    mirror = golden * np.array([-1.0, 1, 1, 1])
    tl = TransformLike.fit(golden, {"flip": mirror, "bad": np.full((3, 4), np.nan)})
    assert tl is not None and tl.names == ("flip",) and 0 < tl.thresholds[0] <= TRANSFORM_LIKE_RATIO
    clean = draw(1000)
    assert tl.flags(clean).mean() <= 2 * TRANSFORM_LIKE_FPR
    flipped = draw(200) * np.array([-1.0, 1, 1, 1])
    assert tl.flags(flipped).mean() > 0.95
    on_axis = draw(100)
    on_axis[:, 0] = 0.0
    assert not tl.flags(on_axis).any()
    assert list(tl.flags(np.array([[np.nan, 0, 0, 0], [-2.0, 0, 0, 0]]))) == [False, True]
    assert TransformLike.fit(golden[:5], {"flip": mirror[:5]}) is None          # too few rows for k


def test_a_rotated_digit_inside_the_golden_support_is_unknown_to_the_estimator():
    """Digits rotated by 180° (or with a dead pixel row): most pass the kNN support check (the model is confidently wrong on the
    asymmetric ones, so ATC counted them correct and a 25% rot180 window read its lower bound above
    its accuracy); nearer rotate_180(golden) than golden, they are unknown now. Clean digits are not."""
    from sentinel.drift import Reference, Suite
    from sentinel.golden import golden_for
    from sentinel.registry import open_registry
    from sentinel.training.digits import load_split

    entry = open_registry(None, None).resolve("digits:v3")
    suite = Suite(Reference.from_golden(golden_for(entry, REPO / "golden_sets")))
    images, _, _ = load_split()
    raw = images[np.asarray(entry.manifest.split.holdout)[:200]].astype(np.float32)
    pre = entry.manifest.preprocessing
    clean = suite.diagnoser.features(pre.apply(raw))
    rot = suite.diagnoser.features(pre.apply(np.ascontiguousarray(raw[:, ::-1, ::-1])))
    assert np.mean(suite.input_support.score(rot) > 1.0) < 0.1             # the support alone misses them
    assert suite.outside(rot).mean() > 0.3 and suite.outside(clean).mean() <= 0.03
    dead = raw.copy()
    dead[:, 4, :] = 0.0                                  # a dead pixel row: read wrong ~half the time
    dead_sig = suite.diagnoser.features(pre.apply(dead))
    assert np.mean(suite.input_support.score(dead_sig) > 1.0) < 0.1
    assert suite.outside(dead_sig).mean() > 0.2


def test_a_window_of_a_few_samples_is_not_a_reliable_estimate():
    """drift check -w 5 on clean digits read 'lower_bound=1' as a reliable estimate from 5 (or 2) samples,
    while every detector abstained for having fewer than 10."""
    from sentinel.drift import Window
    from sentinel.drift.univariate import MIN_SAMPLES

    suite, logits = _two_class_suite()
    w, wy = _images(MIN_SAMPLES + 5, seed=17)
    smp = suite.samples(w, logits(w))
    for n in (2, MIN_SAMPLES - 1, MIN_SAMPLES):
        v = suite.evaluate(Window(logits(w[:n]), labels=wy[:n], signatures=smp.signatures[:n],
                                  violating=smp.violations.any(axis=1)[:n], verdicts=smp.verdicts[:n]))
        if n < MIN_SAMPLES:
            assert v.reliable is False and v.unreliable_reason == f"too few samples: {n} in the window (at least 10)"
        else:
            assert v.reliable is True and v.unreliable_reason is None


def _rgb_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N×16×16×3 uint8-range images (an NHWC client's decoded pictures) of three colour/shape classes."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    yy, xx = np.mgrid[:16, :16]
    shapes = (yy < 8, xx < 8, (yy + xx) < 16)
    colours = (np.array([200, 120, 60]), np.array([60, 180, 90]), np.array([90, 70, 210]))
    x = np.stack([shapes[c][..., None] * colours[c] for c in y]) + r.uniform(0, 40, (n, 16, 16, 3))
    return np.clip(x, 0, 255).astype(np.float32), y


def _rgb_suite():
    """A suite fitted on 150 RGB golden images of an ImageNet-normalised NHWC model (a toy model of
    the channel means), its preprocessing, the model, and a 100-image window of raw client images."""
    from sentinel.drift import Reference, Settings, Suite
    from sentinel.preprocess import Preprocessing

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = Preprocessing(scale=1 / 255, mean=mean, std=std, layout="NHWC")

    def model(net):
        m = net.mean(axis=(2, 3))
        return np.stack([m[:, 0] - m[:, 2], m[:, 1] - m[:, 0], m[:, 2] - m[:, 1]], axis=1) * 3

    raw, y = _rgb_images(150, 0)
    net = pre.apply(raw)
    suite = Suite(Reference(model(net), y, inputs=net, raw=raw, preprocessing=pre),
                  Settings(detectors=("bbsd", "label", "input_stats")))
    return suite, pre, model, _rgb_images(100, 1)[0]


def test_an_unreliable_window_says_when_the_golden_set_is_too_small_for_its_support_checks():
    """150 golden images: clean windows read a few % unknown (extreme order statistics of so few
    golden scores) and can be flagged unreliable; the reason must say the golden set is the cause."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics
    from sentinel.drift.suite import _unreliable_reason
    from sentinel.drift.support import SMALL_GOLDEN

    suite, pre, model, _ = _rgb_suite()
    assert suite.n_support == 150 < SMALL_GOLDEN
    reasons = []
    for seed in range(2, 8):   # clean windows from the golden set's own generator
        x = pre.apply(_rgb_images(100, seed)[0]).astype(np.float32)
        smp = suite.samples(x, model(x))
        v = suite.evaluate(Window(model(x), input_statistics(x), signatures=smp.signatures,
                                  violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
        if v.reliable is False:
            reasons.append(v.unreliable_reason)
    assert reasons, "no clean window was flagged: the premise of this test no longer holds"
    assert all("the golden set has only 150 samples" in r for r in reasons), reasons
    d = suite.evaluate(Window(model(x), input_statistics(x))).diagnosis
    assert "golden set" not in _unreliable_reason(d, 0.2, {"likely_correct": 80, "unknown": 20}, 100, 100,
                                                  SMALL_GOLDEN)
    # most of a window outside the support is a shift, whatever the golden set's size
    assert "golden set" not in _unreliable_reason(d, 0.6, {"likely_correct": 40, "unknown": 60}, 100, 100, 150)
    assert "golden set has only 150" in _unreliable_reason(d, 0.15, {"likely_correct": 85, "unknown": 15},
                                                           100, 100, 150)


def test_candidates_act_on_the_raw_inputs_of_an_nhwc_model():
    """An NHWC model with ImageNet mean/std: its candidates were applied to network inputs (the
    source ignored NHWC), so a client skipping the mean/std step, or normalising twice, was never
    named, and channel order was reversed after normalisation instead of before (and, fitting, was
    not named when golden reweighted to the window's predicted classes moved little)."""
    from sentinel.drift import Window
    from sentinel.drift.features import input_statistics

    suite, pre, model, w = _rgb_suite()
    mean, std = np.asarray(pre.mean), np.asarray(pre.std)
    # a BGR client: its predicted classes are the swapped colours', so golden reweighted to them
    # looks only a little moved (d < MOVED); channel order fits far better and is named
    cases = {"normalization_missing": (w / 255).transpose(0, 3, 1, 2),
             "normalization_doubled": (pre.apply(w) - mean[None, :, None, None]) / std[None, :, None, None],
             "channel_order": pre.apply(np.ascontiguousarray(w[..., ::-1])),
             # decoded as grey (ITU-R 601 luma, as PIL's convert("L")) and repeated to 3 channels
             "grayscale": pre.apply(np.repeat((w @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=3))}
    for expected, x in cases.items():
        x = x.astype(np.float32)
        smp = suite.samples(x, model(x))
        v = suite.evaluate(Window(model(x), input_statistics(x), signatures=smp.signatures,
                                  violating=smp.violations.any(axis=1), verdicts=smp.verdicts))
        assert (v.diagnosis.kind, v.diagnosis.transform) == ("preprocessing_mismatch", expected), v.diagnosis.reason
        assert v.reliable is False


def _large(x: np.ndarray) -> np.ndarray:
    """1×8×8 test images as 3×72×72 (each pixel a 9×9 block, channels scaled apart): beyond
    MAX_FIT_SIDE and MAX_STAT_PIXELS, so the pooled fits and strided statistics are what name it."""
    up = np.kron(x, np.ones((1, 1, 9, 9), dtype=x.dtype))
    return np.concatenate([up, 0.8 * up, 0.6 * up], axis=1).astype(np.float32)


@pytest.mark.slow
def test_large_images_are_diagnosed_through_pooled_fits():
    x, y = _images(150)
    dg = Diagnoser(_large(x), y)
    assert dg.signature.templates.shape[2] == 24 * 24          # 72×72 pooled by 3, not 5,184 pixels
    w, wy = _images(60, seed=1)
    big = _large(w).astype(np.float64)
    for transform, expected in ((lambda a: a[..., ::-1, ::-1], "rotate_180"),
                                (lambda a: np.rot90(a, 1, (2, 3)), "rotate_90"),
                                (lambda a: a[..., ::-1], "flip_horizontal")):
        shifted = np.ascontiguousarray(transform(big)).astype(np.float32)
        d = diagnose(True, [], diagnoser=dg, window_features=dg.features(shifted), predicted=wy,
                     golden_predicted_shares=np.bincount(y) / len(y))
        assert (d.kind, d.transform) == ("preprocessing_mismatch", expected)
    assert diagnose(True, [], diagnoser=dg, window_features=dg.features(_large(w)), predicted=wy).kind == "prior_shift"


def test_golden_fit_takes_fewer_samples_of_large_images(monkeypatch):
    from sentinel.drift import diagnosis

    x, y = _images(300)
    monkeypatch.setattr(diagnosis, "MAX_GOLDEN_VALUES", 64 * 150)   # as if each 8×8 image were 3×224×224
    assert len(Diagnoser(x, y).golden_features) == 150
    monkeypatch.setattr(diagnosis, "MAX_GOLDEN_VALUES", 64 * 10)    # never below MIN_GOLDEN_LARGE
    assert len(Diagnoser(x, y).golden_features) == diagnosis.MIN_GOLDEN_LARGE
    # signatures in chunks equal signatures in one go
    dg = Diagnoser(x[:120], y[:120])
    monkeypatch.setattr(diagnosis, "FEATURE_CHUNK_VALUES", 64 * 7)
    assert np.allclose(dg.features(x), dg.signature._features(x), rtol=1e-9, atol=1e-12)
