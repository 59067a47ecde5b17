"""`proxy.workers > 1` as an operator runs it: sidecar-wide limits, traces, hung workers (real processes)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

import httpx
import pytest
from proxy_helpers import (
    RunningSidecar,
    Upstream,
    make_config,
    proxy_workers,
    read_response,
    wait_or_fail,
)

from sentinel.config import SamplingConfig, TracingConfig
from sentinel.proxy import multiproc

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
INFER = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(V2_BODY), V2_BODY))
LABELS = {"model": "digits", "protocol": "v2", "code": "200"}


def _ready(sc: RunningSidecar) -> list[dict]:
    return wait_or_fail(lambda: (ws := proxy_workers(sc)) and all(w["ready"] for w in ws) and ws,
                        f"workers not ready: {proxy_workers(sc)}", timeout=30.0)


def _post_fresh(sc: RunningSidecar, n: int) -> None:
    for _ in range(n):
        with httpx.Client() as c:
            assert c.post(sc.url + "/v2/models/digits/infer", content=V2_BODY).status_code == 200


@pytest.mark.slow   # spawns an interpreter process
def test_sampling_budget_under_one_per_worker_still_samples():
    """max_per_second 1 over 2 workers: each process got 0.5, a bucket that never held one token."""
    cfg = dataclasses.replace(make_config("http://127.0.0.1:9", workers=2),
                              sampling=SamplingConfig(rate=1.0, max_per_second=1, max_bytes=1 << 20))
    with Upstream() as up, RunningSidecar(dataclasses.replace(cfg, upstream=up.url)) as sc:
        _ready(sc)
        t0 = time.monotonic()
        _post_fresh(sc, 20)
        elapsed = time.monotonic() - t0
        def outcomes() -> tuple[float, float]:
            return tuple(sc.value("sentinel_samples_total", {"model": "digits", "outcome": o})  # type: ignore[return-value]
                         for o in ("queued", "rate_limited"))

        time.sleep(0.6)   # a worker ships every 0.5 s
        queued, limited = wait_or_fail(lambda: sum(outcomes()) == 20 and outcomes(),
                                       f"not all counted: {outcomes()}", 5)
        assert queued >= 1   # HEAD: 0, every request rate_limited
        assert queued <= 1 + elapsed + 3   # the sidecar's cap (a burst of 1, then 1/s), not N times it


@pytest.mark.slow   # spawns an interpreter process
def test_max_connections_is_the_sidecars():
    """proxy.max_connections 4 with 2 workers: at most 4 client connections served, not 4 per process."""
    with Upstream() as up, RunningSidecar(make_config(up.url, workers=2, max_connections=4)) as sc:
        _ready(sc)
        socks, codes = [], []
        try:
            for _ in range(10):
                s = socket.create_connection(("127.0.0.1", sc.port), timeout=5)
                socks.append(s)   # held open: each keeps its slot
                s.sendall(INFER)
                try:
                    codes.append(read_response(s)[0])
                except (ConnectionError, OSError):   # shed: the 503 may be lost to the reset that follows
                    codes.append(0)
        finally:
            for s in socks:
                s.close()
        assert codes.count(200) <= 4 and set(codes) <= {200, 503, 0}, codes   # HEAD: up to 8


@pytest.mark.slow   # spawns an interpreter process
def test_every_workers_requests_are_traced_and_exemplars_link_to_them():
    with Upstream() as up:
        cfg = dataclasses.replace(make_config(up.url, workers=2), tracing=TracingConfig(otlp_endpoint=up.url))
        with RunningSidecar(cfg) as sc:
            _ready(sc)
            _post_fresh(sc, 30)
            served_by_worker = wait_or_fail(lambda: proxy_workers(sc)[0]["requests"],
                                            "worker 1 served nothing", timeout=30.0)
            assert 0 < served_by_worker < 30
            sc.wait_for("sentinel_requests_total", LABELS, 30, timeout=5)
            exemplars = {b._exemplar.labels["trace_id"]
                         for b in sc.sc.metrics._children[("digits", "v2", "200")].buckets  # type: ignore[union-attr]
                         if b._exemplar is not None}
        # stopped: every process flushed its spans to the collector
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    traces = set()
    for seen in up.seen:
        if seen["path"] == "/v1/traces":
            req = ExportTraceServiceRequest.FromString(seen["body"])
            traces |= {s.trace_id.hex() for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans}
    forwarded = {h["headers"]["traceparent"][3:35] for h in up.seen if h["path"].endswith("/infer")}
    assert len(forwarded) == 30
    assert forwarded <= traces, f"{len(forwarded - traces)} of 30 requests have no span"   # HEAD: worker 1's
    assert exemplars and exemplars <= traces


def test_worker_exemplars_reach_the_main_registry():
    from sentinel.proxy.metrics import ProxyMetrics

    main = ProxyMetrics({"m": "m"}, 4)
    worker = ProxyMetrics({"m": "m"}, 4, main.buckets)
    worker.observe_request("m", "v2", "200", 0.003, "ab" * 16)
    first = multiproc.snapshot(worker)
    multiproc.merge(main, multiproc.delta(first, {}))
    worker.observe_request("m", "v2", "200", 0.003, "cd" * 16)
    worker.observe_request("m", "v2", "200", 7.0, None)
    multiproc.merge(main, multiproc.delta(multiproc.snapshot(worker), first))
    got = [b._exemplar.labels["trace_id"] for b in main._children[("m", "v2", "200")].buckets if b._exemplar]
    assert got == ["cd" * 16]   # the newest of the bucket; HEAD: none


@pytest.mark.slow   # spawns an interpreter process
def test_hung_worker_is_reported_killed_and_replaced(monkeypatch):
    """A SIGSTOPped worker keeps its share of the port: clients hashed to it wait forever."""
    monkeypatch.setattr(multiproc, "STALE_S", 1.0, raising=False)
    monkeypatch.setattr(multiproc, "HANG_TIMEOUT_S", 3.0, raising=False)
    with Upstream() as up, RunningSidecar(make_config(up.url, workers=2)) as sc:
        pid = _ready(sc)[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            r = wait_or_fail(lambda: (r := httpx.get(sc.admin_url + "/readyz")).status_code == 503 and r,
                             "readyz still 200 with a stopped worker", timeout=2.5)
            assert "not responding" in r.json()["proxy_workers"]
            wait_or_fail(lambda: sc.value("sentinel_proxy_errors_total", {"reason": "proxy_worker_hung"}) == 1,
                         f"hung worker not killed: {proxy_workers(sc)}", timeout=6)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        w = wait_or_fail(lambda: (w := proxy_workers(sc)[0])["ready"] and w["pid"] != pid and w, "not restarted",
                         timeout=20)
        assert w["restarts"] == 1 and w["responding"]
        assert sc.value("sentinel_proxy_errors_total", {"reason": "proxy_worker_died"}) == 0   # counted once, as hung
        assert httpx.get(sc.admin_url + "/readyz").status_code == 200
