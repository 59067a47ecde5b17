"""Multi-process mode (`proxy.workers: 2`) over real sockets: serving, summed metrics, restart, drain."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel.proxy import multiproc

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
REQ = "sentinel_requests_total"
LABELS = {"model": "digits", "protocol": "v2", "code": "200"}


def _workers(sc: RunningSidecar) -> list[dict]:
    return httpx.get(sc.admin_url + "/status").json()["proxy_workers"]


def _wait_ready(sc: RunningSidecar, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = _workers(sc)
        if ws and all(w["ready"] for w in ws):
            return ws
        time.sleep(0.1)
    raise AssertionError(f"proxy workers not ready: {_workers(sc)}")


def _post_fresh(sc: RunningSidecar, n: int) -> None:
    """n requests, each on a new connection, so SO_REUSEPORT spreads them across the workers."""
    for _ in range(n):
        with httpx.Client() as c:
            r = c.post(sc.url + "/v2/models/digits/infer", content=V2_BODY)
            assert r.status_code == 200


@pytest.mark.slow   # spawns an interpreter process
def test_two_workers_serve_and_metrics_sum():
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0, workers=2)) as sc:
        ws = _wait_ready(sc)
        assert len(ws) == 1 and ws[0]["pid"] != os.getpid()
        _post_fresh(sc, 60)
        total = sc.wait_for(REQ, LABELS, 60, timeout=10)
        assert total == 60   # exactly: every request counted once, by whichever process served it
        assert sc.value("sentinel_request_duration_seconds_count", LABELS) == 60
        assert sc.value("sentinel_request_duration_seconds_bucket", {**LABELS, "le": "+Inf"}) == 60
        served_by_worker = _workers(sc)[0]["requests"]
        assert 0 < served_by_worker < 60   # both processes took connections
        # Samples copied in the worker reach the one analysis worker in the main process.
        assert sc.wait_for("sentinel_samples_total", {"model": "digits", "outcome": "queued"}, 60, timeout=10) == 60


@pytest.mark.slow   # spawns an interpreter process
def test_killed_worker_is_restarted_and_port_keeps_serving():
    with Upstream() as up, RunningSidecar(make_config(up.url, workers=2)) as sc:
        old = _wait_ready(sc)[0]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ws = _workers(sc)
            if ws[0]["restarts"] == 1 and ws[0]["ready"] and ws[0]["pid"] != old:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"worker not restarted: {_workers(sc)}")
        assert sc.value("sentinel_proxy_errors_total", {"reason": "proxy_worker_died"}) == 1
        _post_fresh(sc, 20)
        assert sc.wait_for(REQ, LABELS, 20, timeout=10) == 20


@pytest.mark.slow   # spawns an interpreter process
def test_stop_drains_workers():
    with Upstream() as up:
        sc = RunningSidecar(make_config(up.url, workers=2))
        with sc:
            pid = _wait_ready(sc)[0]["pid"]
            _post_fresh(sc, 10)
        assert not sc.thread.is_alive()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert sc.value(REQ, LABELS) == 10   # the final shipment arrived before the stop returned


def test_delta_and_merge_round_trip():
    from sentinel.proxy.metrics import ProxyMetrics

    main = ProxyMetrics({"m": "m"}, 4, (0.25, 7.5))   # SLO thresholds add buckets
    worker = ProxyMetrics({"m": "m"}, 4, main.buckets)    # what WorkerSet hands a worker
    worker.observe_request("m", "v2", "200", 0.003, "ab" * 16)
    worker.proxy_errors.labels("upstream_reset").inc()
    first = multiproc.snapshot(worker)
    multiproc.merge(main, multiproc.delta(first, {}))
    worker.observe_request("m", "v2", "200", 7.0, None)
    multiproc.merge(main, multiproc.delta(multiproc.snapshot(worker), first))
    get = main.registry.get_sample_value
    assert get(REQ, {"model": "m", "protocol": "v2", "code": "200"}) == 2
    assert get("sentinel_request_duration_seconds_sum", {"model": "m", "protocol": "v2", "code": "200"}) == 7.003
    for sample in worker.registry.collect():
        for s in sample.samples:
            if s.name.startswith("sentinel_request_duration_seconds_bucket"):
                assert get(s.name, s.labels) == s.value
    assert get("sentinel_proxy_errors_total", {"reason": "upstream_reset"}) == 1


def test_sampling_cap_is_one_shared_budget():
    """Two processes' samplers on one budget take max_per_second together, and a cap under N still samples."""
    from sentinel.config import SamplingConfig

    cfg = SamplingConfig(rate=1.0, max_per_second=2, max_bytes=1024)
    budget = multiproc.shared_budget(1)
    now = [1000.0]
    a, b = (multiproc.SharedSampler(cfg, budget, 0) for _ in range(2))
    for s in (a, b):
        s._clock = lambda: now[0]
    got = [s.decide(10) for s in (a, b, a, b)]
    assert got == ["sample", "sample", "rate_limited", "rate_limited"]   # a burst of 2, for both together
    now[0] += 0.5
    assert [b.decide(10), a.decide(10)] == ["sample", "rate_limited"]   # then 2 per second, shared
    assert a.decide(4096) == "rate_limited" and multiproc.worker_connections(4096, 4) == 1024
