"""The eval protocol's bookkeeping on synthetic reference outputs (the real run is `sentinel drift eval`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from sentinel.analysis import evaluation as ev
from sentinel.drift import Settings
from sentinel.drift.shifts import DIGITS_SHIFTS, affine, gaussian_noise, intensity, knockout_weights


def _fake_data(n: int = 400) -> ev._Data:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    logits, stats, emb = {}, {}, {}
    for i, name in enumerate(["clean"] + [s.name for s in DIGITS_SHIFTS if s.apply is not None]):
        shift = 0.0 if name == "clean" else 0.5 + 0.1 * i
        logits[name] = np.eye(10)[labels] * 5 + rng.normal(0, 1 + shift, (n, 10))
        stats[name] = rng.normal(shift, 1, (n, 4))
        emb[name] = rng.normal(shift, 1, (n, 6))
    return ev._Data(labels, np.arange(n) < n // 2, logits, stats, emb)


def test_run_eval_reports_every_table(monkeypatch):
    data = _fake_data()
    monkeypatch.setattr(ev, "_prepare", lambda *a, **k: data)
    entry = SimpleNamespace(spec="fake:v1")
    plan = ev.EvalPlan(sizes=(20, 50), runs=1, null_runs=10, reference_size=150, mae_size=50)
    rep = ev.run_eval(entry, plan, Settings(), log=lambda s: None)
    assert set(rep["detection"]) == {"20", "50"}
    for d in rep["detection"].values():
        assert 0 <= d["bbsd_ks"] <= 1 and 0 <= d["combined"] <= 1
    assert rep["false_alarm"]["50"]["fixed_persist2_combined"] is not None
    groups = rep["accuracy_mae"]["groups"]
    assert {"noise", "noise_small", "confidently_wrong", "all_but_confidently_wrong", "label"} <= set(groups)
    assert json.loads(json.dumps(rep)) == rep          # `drift eval --json` prints it as is
    text = ev.format_report(rep)
    assert "BBSD+KS  combined" in text and "False-alarm rate" in text and "ATC" in text


def test_windows_larger_than_the_data_are_refused_before_any_inference(monkeypatch):
    """`drift eval --samples 5000` ran a minute of inference, then ended in a ValueError traceback."""
    import pytest

    from sentinel.errors import UsageError

    def prepare(*a, **k):
        raise AssertionError("inference started")

    monkeypatch.setattr(ev, "_prepare", prepare)
    split = SimpleNamespace(golden=list(range(300)), holdout=list(range(300, 500)))
    entry = SimpleNamespace(spec="fake:v1", manifest=SimpleNamespace(split=split))
    with pytest.raises(UsageError, match="--samples 5000: .* from 500 non-training digits; windows of at most 200"):
        ev.run_eval(entry, ev.EvalPlan(sizes=(50, 5000)), Settings(), log=lambda s: None)


def test_shifts_keep_shape_and_range():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (4, 8, 8)).astype(np.float32)
    for y in (gaussian_noise(x, 4, rng), affine(x, rng, rotation=30), intensity(x, 0.5, 6)):
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 16
    assert np.array_equal(affine(x, rng), x)           # the identity transform changes nothing
    w = knockout_weights(np.array([0, 1, 1, 2]), 1, 1.0)
    assert w[1] == w[2] == 0 and w.sum() == 1
