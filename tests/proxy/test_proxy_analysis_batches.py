"""The manager's side of batched worker results: counters, queue accounting and updates as if unbatched."""

from __future__ import annotations

import asyncio

import pytest

from sentinel import metricnames as mn
from sentinel.config import Config, ModelConfig
from sentinel.proxy.analysis import AnalysisManager
from sentinel.proxy.metrics import ProxyMetrics

pytestmark = pytest.mark.unit

SAMPLES = "sentinel_samples_total"


@pytest.fixture
def manager():
    loop = asyncio.new_event_loop()
    cfg = Config(models=(ModelConfig(name="m", version="v1", protocol="v2"),))
    mgr = AnalysisManager(cfg, ProxyMetrics({"m": "m"}, 8), loop)
    yield mgr
    loop.close()


def value(mgr: AnalysisManager, name: str, labels: dict[str, str]) -> float:
    return mgr.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_batch_counts_like_its_samples(manager):
    mgr = manager
    mgr.outstanding, mgr.queued_bytes = 7, 7000
    mgr._inflight["m"] = 7
    pred = mn.PREDICTIONS.name
    conf = mn.PREDICTION_CONFIDENCE.name
    updates = [(pred, {"model": "m", "class": "3"}, "inc", 4.0),
               (conf, {"model": "m"}, "observe", 0.9), (conf, {"model": "m"}, "observe", 0.8)]
    mgr._handle(("batch", [("status", "m", {"monitor": "builtin"}),
                           ("samples", "m", 5, {"malformed_json": 1, "truncated": 1}, updates, 5000),
                           ("error", "ValueError", "boom")]))
    assert value(mgr, SAMPLES, {"model": "m", "outcome": "decoded"}) == 3
    assert value(mgr, SAMPLES, {"model": "m", "outcome": "rejected"}) == 2
    assert value(mgr, "sentinel_sample_rejections_total", {"model": "m", "reason": "malformed_json"}) == 1
    assert value(mgr, "sentinel_sample_rejections_total", {"model": "m", "reason": "truncated"}) == 1
    assert value(mgr, pred + "_total", {"model": "m", "class": "3"}) == 4
    assert value(mgr, conf + "_count", {"model": "m"}) == 2
    assert (mgr.outstanding, mgr.queued_bytes, mgr._inflight["m"]) == (2, 2000, 2)
    assert mgr.statuses["m"] == {"monitor": "builtin"} and mgr.errors["ValueError"] == "boom"


def test_the_unbatched_sample_message_still_counts(manager):
    mgr = manager
    mgr.outstanding, mgr.queued_bytes = 1, 10
    mgr._inflight["m"] = 1
    mgr._handle(("sample", "m", "rejected", "too_deep", [], 10))
    assert value(mgr, SAMPLES, {"model": "m", "outcome": "rejected"}) == 1
    assert (mgr.outstanding, mgr.queued_bytes, sum(mgr._inflight.values())) == (0, 0, 0)
