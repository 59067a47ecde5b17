"""Windows, accuracy estimators and false-alarm control of the detector suite on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from sentinel.drift import (
    AccuracyEstimator,
    Reference,
    Score,
    Settings,
    SlidingWindow,
    Suite,
    Window,
)
from sentinel.drift.atc import fit_temperature
from sentinel.drift.features import input_statistics, softmax

pytestmark = pytest.mark.unit

K = 5


def _draw(rng: np.random.Generator, n: int, shift: float = 0.0):
    """Synthetic model outputs, labels, inputs and embeddings from one generative process."""
    y = rng.integers(0, K, n)
    emb = rng.normal(size=(n, 6)) + np.eye(K, 6)[y] * 3 + shift
    w = np.linspace(-1, 1, 6 * K).reshape(6, K)
    logits = emb @ w * 2 + np.eye(K)[y] * 2
    x = rng.normal(0.2 + shift, 1.0, size=(n, 1, 4, 4))
    return logits, y, x, emb


def test_sliding_window_keeps_the_last_rows_in_order():
    w = SlidingWindow(4, 2)
    w.push(np.arange(6).reshape(3, 2))
    assert len(w) == 3
    w.push(np.array([[6, 7], [8, 9]]))
    np.testing.assert_array_equal(w.values(), [[2, 3], [4, 5], [6, 7], [8, 9]])
    w.push(np.arange(20, 30).reshape(5, 2))
    np.testing.assert_array_equal(w.values()[:, 0], [22, 24, 26, 28])
    assert w.total == 10


def test_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, K)) * 3
    y = np.array([rng.choice(K, p=p) for p in softmax(z, 2.0)])
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("kind", list(Score))
def test_atc_on_its_own_source_data_returns_source_accuracy(kind):
    rng = np.random.default_rng(1)
    logits, y, _, _ = _draw(rng, 400)
    est = AccuracyEstimator.fit(logits, y, kind)
    acc = float((logits.argmax(1) == y).mean())
    assert est.atc(logits) == pytest.approx(acc, abs=1 / 400 + 1e-9)
    assert 0 < est.average_confidence(logits) <= 1
    assert est.atc(logits[:0]) != est.atc(logits[:0])   # NaN for an empty window
    both = est.estimate(logits)
    assert both["atc"] == pytest.approx(est.atc(logits)) and both["avg_conf"] == pytest.approx(
        est.average_confidence(logits))


def test_input_statistics_columns():
    x = np.zeros((2, 3, 4, 4))
    x[1] = 1.0
    x[1, :, :, ::2] = 3.0
    s = input_statistics(x)
    assert s.shape == (2, 3 + 3 + 2 + 1)
    np.testing.assert_allclose(s[0], 0)
    assert s[1, 0] == pytest.approx(2.0) and s[1, 3] == pytest.approx(1.0)
    assert s[1, -1] == pytest.approx(1.0)        # |3 − 1| on horizontal neighbours, 0 vertically → mean 1


def test_no_shift_false_alarm_rate_is_controlled():
    """Reference and window drawn afresh from one process: every detector and the verdict stay at alpha."""
    rng = np.random.default_rng(7)
    settings = Settings(detectors=("bbsd", "label", "confidence", "input_stats", "embedding", "mmd"),
                        mmd_permutations=99, mmd_max_samples=60)
    runs = 120
    alarms: dict[str, int] = {}
    for _i in range(runs):
        lg, y, x, e = _draw(rng, 150)
        suite = Suite(Reference(lg, y, x, e), settings)
        wl, wy, wx, we = _draw(rng, 60)
        v = suite.evaluate(Window(wl, input_statistics(wx), suite.project(we), wy))
        for r in (*v.detectors, v.combined):
            assert not r.abstained, r.reason
            alarms[r.name] = alarms.get(r.name, 0) + int(r.alarm)
    # With 120 runs at alpha = 0.05, a rate above 0.11 would be 3 binomial standard deviations out.
    for name, a in alarms.items():
        assert a / runs <= 0.11, (name, a)


def test_shift_is_detected_and_estimates_are_reported():
    rng = np.random.default_rng(8)
    lg, y, x, e = _draw(rng, 200)
    suite = Suite(Reference(lg, y, x, e))
    wl, wy, wx, we = _draw(rng, 100, shift=1.0)
    v = suite.evaluate(Window(wl, input_statistics(wx), suite.project(we), wy))
    assert v.drift and v.combined.p_value < 0.05
    assert set(v.estimated_accuracy) == {"atc", "avg_conf"}
    assert v.accuracy is not None and 0 <= v.accuracy <= 1


def test_missing_window_parts_make_their_detectors_abstain():
    rng = np.random.default_rng(9)
    lg, y, x, e = _draw(rng, 100)
    suite = Suite(Reference(lg, y, x, e))
    v = suite.evaluate(Window(logits=lg[:5]))
    assert all(r.abstained for r in v.detectors) and not v.drift
    reasons = {r.name: r.reason for r in v.detectors}
    assert "no decoded inputs" in reasons["input_stats"] and "shadow" in reasons["embedding"]
    with pytest.raises(ValueError, match="classes"):
        suite.evaluate(Window(logits=np.zeros((20, K + 1))))


def test_input_statistics_of_non_finite_rows_are_non_finite_and_silent():
    """inf − inf in a row of ±inf is expected (the row is a contract violation, dropped downstream):
    its statistics are non-finite, the other rows' are untouched, and no RuntimeWarning reaches
    the daemon's log."""
    import warnings

    x = np.random.default_rng(0).random((3, 1, 8, 8))
    bad = x.copy()
    bad[0, 0, 0, 0], bad[0, 0, 1, 0], bad[1, 0, 2, 2] = np.inf, -np.inf, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = input_statistics(bad)
    assert not np.isfinite(got[0]).all() and not np.isfinite(got[1]).all()
    np.testing.assert_array_equal(got[2], input_statistics(x)[2])
