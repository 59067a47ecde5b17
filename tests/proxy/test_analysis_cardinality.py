"""The number of series analysis updates create is capped, over a real worker and real /metrics scrapes.

A monitor that labels by request id (a user-supplied string, a float) creates a new series per
sample: without a cap the proxy's registry, its memory and every /metrics scrape grow without
bound. The proxy creates at most `MAX_SERIES_PER_METRIC` label sets per metric family and
`MAX_SERIES` in all (each per configured model) from analysis updates; an update that would
create one more is dropped and counted in sentinel_analysis_errors_total{kind="series_limit"},
logged once per metric. Series that exist keep updating, and the proxy keeps answering.

The monitor factory below is imported by the spawned worker (`test_analysis_cardinality:fresh`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import numpy as np
import pytest
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn
from sentinel.protocols import oip_v2
from sentinel.proxy import analysis

FACTORY = "test_analysis_cardinality:fresh"
MODEL = "digits"
ERRORS = mn.ANALYSIS_ERRORS.sample_name
SAMPLES = mn.SAMPLES.sample_name
PREDICTIONS = mn.PREDICTIONS.sample_name

# The caps under test (their values, when the module has them; the defaults this change introduces).
PER_METRIC = getattr(analysis, "MAX_SERIES_PER_METRIC", 2_000)
TOTAL = getattr(analysis, "MAX_SERIES", 10_000)

# First input value of a sample → what the monitor does; the second is how many updates.
NORMAL = 1.0          # the existing series: predictions{class="1"} += 1, one confidence observation
FRESH = 6161.0        # n predictions with a class label never seen before (a request id)
NEGATIVE = 6262.0     # n predictions with a fresh class, incremented by -1 (a bad update, after the series exists)
SPREAD = 6363.0       # n fresh label sets in each of the gauges below and in the confidence histogram
GAUGES = (mn.DRIFT_P_VALUE, mn.DRIFT_STATISTIC, mn.DRIFT_ALARM, mn.ESTIMATED_ACCURACY, mn.DRIFT_DIAGNOSIS)


# --- the monitor (runs in the spawned worker) -------------------------------------------------
class _Fresh:
    def __init__(self, model: str) -> None:
        self.model = model
        self.next = 0

    def _ids(self, n: int) -> range:
        start, self.next = self.next, self.next + n
        return range(start, start + n)

    def observe(self, batch: Any) -> list:
        from sentinel.analysis.contract import MetricUpdate

        x = np.asarray(batch.inputs, dtype=np.float64).ravel()
        code, n = float(x[0]), int(x[1])
        m = self.model
        if code == FRESH:
            return [MetricUpdate(mn.PREDICTIONS.name, {"model": m, "class": f"req-{i}"}, "inc", 1.0)
                    for i in self._ids(n)]
        if code == NEGATIVE:
            return [MetricUpdate(mn.PREDICTIONS.name, {"model": m, "class": f"neg-{i}"}, "inc", -1.0)
                    for i in self._ids(n)]
        if code == SPREAD:
            out = []
            for i in self._ids(n):
                out += [MetricUpdate(spec.name, {"model": m, spec.labels[1]: f"x{i}"}, "set", 0.5) for spec in GAUGES]
                out.append(MetricUpdate(mn.PREDICTION_CONFIDENCE.name, {"model": f"h{i}"}, "observe", 0.5))
            return out
        return [MetricUpdate(mn.PREDICTIONS.name, {"model": m, "class": "1"}, "inc", 1.0),
                MetricUpdate(mn.PREDICTION_CONFIDENCE.name, {"model": m}, "observe", 0.5)]

    def status(self) -> dict:
        return {"monitor": "fresh", "next": self.next}


def fresh(config: Any, model_config: Any) -> _Fresh:
    return _Fresh(model_config.name)


# --- helpers ---------------------------------------------------------------------------------
def body(code: float, n: int = 0) -> tuple[bytes, dict[str, str]]:
    x = np.array([[code, n]], dtype=np.float32)
    b, headers = oip_v2.encode([("x", x)], binary=False)
    return b, {"content-type": "application/json", **headers}


class Proxy:
    """The sidecar (built-in upstream, every request sampled) with the monitor above; counts samples sent."""

    def __init__(self, sc: RunningSidecar) -> None:
        self.sc = sc
        self.client = httpx.Client(base_url=sc.url, timeout=30)
        self.sent = 0

    def send(self, code: float, n: int = 0) -> None:
        b, headers = body(code, n)
        r = self.client.post(f"/v2/models/{MODEL}/infer", content=b, headers=headers)
        assert r.status_code == 200, r.text
        self.sent += 1

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until every sample sent is reported and its updates applied."""
        sc = self.sc
        deadline = time.monotonic() + timeout
        while True:
            mgr = sc.sc.analysis  # type: ignore[union-attr]
            if (sc.value(SAMPLES, {"model": MODEL, "outcome": "decoded"}) >= self.sent
                    and mgr.outstanding == 0 and not getattr(mgr, "_pending", ())):
                return
            assert time.monotonic() < deadline, "timed out waiting for the worker's results"
            time.sleep(0.05)

    def scrape(self) -> str:
        r = httpx.get(self.sc.admin_url + "/metrics", timeout=30)
        assert r.status_code == 200
        return r.text


def series(text: str, name: str) -> list[str]:
    """The exposed sample lines of `name` (with labels)."""
    return [ln for ln in text.splitlines() if ln.startswith(name + "{")]


def label_sets(text: str, family: str) -> int:
    """Distinct label sets of a family in a scrape (a histogram's buckets are one label set)."""
    lines = series(text, family) + series(text, family + "_total") + series(text, family + "_count")
    return len({ln.split("{", 1)[1].split("}", 1)[0] for ln in lines if family + "_bucket" not in ln})


@pytest.fixture
def proxy():
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0), FACTORY) as sc:
        p = Proxy(sc)
        p.send(NORMAL)   # starts the worker; the existing series
        p.settle()
        yield p
        p.client.close()


# --- tests ---------------------------------------------------------------------------------------
def test_fresh_labels_stop_making_series_at_the_cap_and_the_drops_are_counted(proxy, caplog):
    p, sc = proxy, proxy.sc
    assert label_sets(p.scrape(), mn.PREDICTIONS.name) == 1
    with caplog.at_level(logging.WARNING, logger="sentinel.analysis"):
        for _ in range(3):   # 3 × 1,500 request ids: 4,500 would-be series
            p.send(FRESH, 1_500)
            p.send(NORMAL)   # the existing series, between the floods
        p.settle()
        text = p.scrape()
        made = len(series(text, PREDICTIONS))
        assert made == PER_METRIC, f"{made} predictions series, the cap is {PER_METRIC}"
        dropped = 3 * 1_500 - (PER_METRIC - 1)
        assert sc.value(ERRORS, {"kind": "series_limit"}) == dropped
        assert f'{ERRORS}{{kind="series_limit"}} {float(dropped)}' in text   # as Prometheus reads it
        assert "MAX_SERIES_PER_METRIC" in httpx.get(sc.admin_url + "/status").json()["analysis"]["errors"][
            "series_limit"]
        # more fresh labels: still no new series, every update counted
        p.send(FRESH, 1_000)
        p.settle()
        text = p.scrape()
    assert len(series(text, PREDICTIONS)) == PER_METRIC
    assert sc.value(ERRORS, {"kind": "series_limit"}) == dropped + 1_000
    # the series that exist keep updating: the normal one, and one made before the cap
    assert sc.value(PREDICTIONS, {"model": MODEL, "class": "1"}) == 4
    assert sc.value(PREDICTIONS, {"model": MODEL, "class": "req-0"}) == 1
    assert sc.value(mn.PREDICTION_CONFIDENCE.name + "_count", {"model": MODEL}) == 4
    p.send(NORMAL)
    p.settle()
    assert sc.value(PREDICTIONS, {"model": MODEL, "class": "1"}) == 5
    logged = [r for r in caplog.records if "series_limit" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]   # once per metric, not per update
    assert mn.PREDICTIONS.name in logged[0].getMessage()
    # nothing else went wrong, and the proxy kept answering (every request above got its 200)
    assert sc.value(ERRORS, {"kind": "bad_update"}) == 0
    assert sc.value(ERRORS, {"kind": "too_many_updates"}) == 0
    assert sc.sc.analysis.restarts == 0   # type: ignore[union-attr]
    assert sc.value(SAMPLES, {"model": MODEL, "outcome": "decoded"}) == p.sent
    with httpx.Client(base_url=sc.url, timeout=30) as c:
        b, headers = body(NORMAL)
        assert all(c.post(f"/v2/models/{MODEL}/infer", content=b, headers=headers).status_code == 200
                   for _ in range(20))


def test_the_total_cap_holds_across_metrics_and_histograms(proxy, caplog):
    """Fresh label sets spread over six families (five gauges and a histogram), each under its own
    cap: the total stops at MAX_SERIES; each family over it is logged once."""
    p, sc = proxy, proxy.sc
    families = [spec.name for spec in GAUGES] + [mn.PREDICTION_CONFIDENCE.name]
    per_sample = 1_800   # × 6 families: 10,800 updates, under MAX_UPDATES_PER_SAMPLE
    with caplog.at_level(logging.WARNING, logger="sentinel.analysis"):
        for _ in range(2):
            p.send(SPREAD, per_sample)
        p.send(NORMAL)
        p.settle()
    text = p.scrape()
    counts = {f: label_sets(text, f) for f in families}
    made = sum(counts.values()) + label_sets(text, mn.PREDICTIONS.name)
    assert all(n <= PER_METRIC for n in counts.values()), counts
    assert made == min(TOTAL, 2 * per_sample * len(families) + 2), (made, counts)
    attempted = 2 * per_sample * len(families)
    assert sc.value(ERRORS, {"kind": "series_limit"}) == attempted - (made - 2)
    # the histogram's bucket lines follow its label sets (not one per update)
    buckets = len(series(text, mn.PREDICTION_CONFIDENCE.name + "_bucket"))
    assert buckets == counts[mn.PREDICTION_CONFIDENCE.name] * (len(mn.confidence_buckets()) + 1)
    logged = {f for f in families + [mn.PREDICTIONS.name]
              for r in caplog.records if "series_limit" in r.getMessage() and f + " " in r.getMessage()}
    n_logged = sum(1 for r in caplog.records if "series_limit" in r.getMessage())
    assert n_logged == len(logged) >= 1   # one line per metric that hit a cap
    # the existing series still update
    assert sc.value(PREDICTIONS, {"model": MODEL, "class": "1"}) == 2
    assert sc.value(mn.PREDICTION_CONFIDENCE.name + "_count", {"model": MODEL}) == 2


def test_updates_the_registry_rejects_after_making_a_series_cannot_get_around_the_cap(proxy):
    """A negative increment is a bad update, but prometheus_client makes the series before it
    refuses the value: such series count under the cap like any other."""
    p, sc = proxy, proxy.sc
    p.send(NEGATIVE, 2_500)
    p.send(NEGATIVE, 2_500)
    p.settle()
    text = p.scrape()
    assert len(series(text, PREDICTIONS)) == PER_METRIC
    assert sc.value(ERRORS, {"kind": "bad_update"}) == PER_METRIC - 1   # the series made before the cap
    assert sc.value(ERRORS, {"kind": "series_limit"}) == 5_000 - (PER_METRIC - 1)
    p.send(NORMAL)
    p.settle()
    assert sc.value(PREDICTIONS, {"model": MODEL, "class": "1"}) == 2


def test_legitimate_series_of_many_thousand_class_models_are_never_cut():
    """The built-in monitor on 25 ImageNet-sized (1000-class) models: 101 predictions series each
    (classes 0-99 and "other"), 2,525 in the family, over one model's 2,000 but within the cap,
    which grows with the models configured. Nothing is dropped."""
    import asyncio

    from sentinel.analysis.contract import DecodedBatch
    from sentinel.config import Config, ModelConfig
    from sentinel.proxy.builtin_monitor import BuiltinMonitor
    from sentinel.proxy.metrics import ProxyMetrics

    models = [f"imagenet-{i}" for i in range(25)]
    cfg = Config(models=tuple(ModelConfig(name=m, version="v1", protocol="v2") for m in models))
    loop = asyncio.new_event_loop()
    try:
        mgr = analysis.AnalysisManager(cfg, ProxyMetrics({m: m for m in models}, 32), loop)
        rng = np.random.default_rng(0)
        for m in models:
            mon = BuiltinMonitor(m)
            for _ in range(2):   # a batch of 1000 rows, row i predicting class i: every class comes up
                logits = (np.eye(1000) * 10 + rng.normal(size=(1000, 1000))).astype(np.float32)
                batch = DecodedBatch(model=m, inputs=None, input_form=None, outputs=logits, output_kind="logits")
                mgr._apply([(u.metric, u.labels, u.op, float(u.value)) for u in mon.observe(batch)])
        text = mgr.metrics.exposition("text/plain")[0].decode()
        assert len(series(text, PREDICTIONS)) == 25 * 101
        assert label_sets(text, mn.PREDICTION_CONFIDENCE.name) == 25
        assert mgr.metrics.registry.get_sample_value(ERRORS, {"kind": "series_limit"}) is None
        assert mgr.metrics.registry.get_sample_value(PREDICTIONS, {"model": "imagenet-0", "class": "other"}) == 2 * 900
    finally:
        loop.close()
