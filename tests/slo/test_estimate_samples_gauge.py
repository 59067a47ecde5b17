"""The drift monitor says how many samples each accuracy estimate rests on (what the SLO rules gate on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sentinel import metricnames as mn
from sentinel.analysis.contract import DecodedBatch
from sentinel.config import Config, DriftConfig, ModelConfig

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_every_estimate_comes_with_its_sample_count_and_reliable_flag(tmp_path):
    from sentinel.analysis.monitor import build_monitor
    from sentinel.analysis.shadow import ReferenceRunner
    from sentinel.registry import Registry
    from sentinel.training.digits import load_split

    entry = Registry(REPO / "models").resolve("digits:v3")
    images, _, _ = load_split()
    raw = images[np.asarray(entry.manifest.split.holdout)[:150]]
    pre = entry.manifest.preprocessing
    logits = ReferenceRunner(entry, cache_dir=tmp_path, check_inputs=pre.apply(raw[:32])).run(pre.apply(raw)).logits
    cfg = Config(models=(ModelConfig("digits", "v3"),), registry=str(REPO / "models"),
                 golden_sets=str(REPO / "golden_sets"),
                 drift=DriftConfig(window_size=100, evaluate_every=25, shadow=False))
    mon = build_monitor(cfg, cfg.models[0])
    ups = []
    for i in range(0, len(raw), 25):
        ups += mon.observe(DecodedBatch("digits", raw[i:i + 25], "raw", logits[i:i + 25], "logits"))

    def values(metric: str, **labels: str) -> list[float]:
        return [u.value for u in ups if u.metric == metric and all(u.labels.get(k) == v for k, v in labels.items())]

    lower = values(mn.ESTIMATED_ACCURACY.name, method="atc_lower")
    samples = values(mn.ACCURACY_ESTIMATE_SAMPLES.name, model="digits")
    reliable = values(mn.ACCURACY_ESTIMATE_RELIABLE.name, model="digits")
    # one count per estimate: the window grows 25 at a time up to its size, then slides
    assert samples == [25.0, 50.0, 75.0, 100.0, 100.0, 100.0]
    assert len(lower) == len(samples) == len(reliable)
    assert mon.status()["last"]["accuracy_verdicts"] and sum(mon.status()["last"]["accuracy_verdicts"].values()) == 100
