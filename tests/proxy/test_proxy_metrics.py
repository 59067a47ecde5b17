"""Request metrics: labels, buckets at SLO thresholds, exemplars, cardinality cap, canaries."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_helpers import RunningSidecar, Upstream, make_config, v2_response

from sentinel import metricnames as mn

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
DUR = mn.REQUEST_DURATION.name
REQ = mn.REQUESTS.sample_name


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    slo = tmp_path_factory.mktemp("slo") / "slo.yaml"
    slo.write_text("slos:\n  - {name: fast, model: digits, objective: 0.99, sli: latency, threshold: 0.123}\n"
                   "  - {name: ok, model: digits, objective: 0.999, sli: availability}\n")
    cfg = dataclasses.replace(make_config("http://127.0.0.1:1", max_model_labels=2), slo_file=str(slo))
    with Upstream() as up:
        cfg = dataclasses.replace(cfg, upstream=up.url)
        with RunningSidecar(cfg) as sc:
            yield up, sc


def test_request_counted_with_model_protocol_code(env):
    up, sc = env
    before = sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "200"})
    r = httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY)
    assert r.status_code == 200 and r.content == v2_response()
    assert sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == before + 1
    assert sc.value(DUR + "_count", {"model": "digits", "protocol": "v2", "code": "200"}) == before + 1
    httpx.post(sc.url + "/v1/models/digits:predict", content=b'{"instances":[[1,2]]}')
    assert sc.value(REQ, {"model": "digits", "protocol": "v1", "code": "200"}) >= 1
    httpx.get(sc.url + "/status?code=404")
    assert sc.value(REQ, {"model": "none", "protocol": "other", "code": "404"}) >= 1


def test_slo_threshold_is_a_bucket_bound(env):
    up, sc = env
    httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY)
    labels = {"model": "digits", "protocol": "v2", "code": "200", "le": "0.123"}
    assert sc.value(DUR + "_bucket", labels) >= 1
    assert 0.123 in sc.sc.metrics.buckets


def test_cardinality_cap_folds_unknown_models(env):
    up, sc = env
    for name in ("alpha", "beta", "gamma", "delta"):
        httpx.post(sc.url + f"/v2/models/{name}/infer", content=V2_BODY)
    assert sc.value(REQ, {"model": "alpha", "protocol": "v2", "code": "200"}) == 1
    assert sc.value(REQ, {"model": "beta", "protocol": "v2", "code": "200"}) == 1
    assert sc.value(REQ, {"model": "other", "protocol": "v2", "code": "200"}) == 2
    assert sc.value(mn.UNMATCHED_PATHS.sample_name) == 2


def test_canary_requests_are_not_traffic(env):
    up, sc = env
    labels = {"model": "digits", "protocol": "v2", "code": "200"}
    before = sc.value(REQ, labels)
    r = httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY, headers={"X-Sentinel-Canary": "1"})
    assert r.status_code == 200
    assert sc.value(REQ, labels) == before


def test_openmetrics_exemplars_carry_trace_id(env):
    up, sc = env
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY,
               headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    om = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{trace}"}}' in om.text
    assert om.text.rstrip().endswith("# EOF")
    text = httpx.get(sc.admin_url + "/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in text.text
    names = {f.name for f in text_string_to_metric_families(text.text)}
    assert {"sentinel_request_duration_seconds", "sentinel_requests", "sentinel_build_info"} <= names
    assert 'sentinel_build_info{version="' in text.text
    assert 'sentinel_model_info{model="digits",version="v3"} 1.0' in text.text


def test_inflight_gauge_returns_to_zero(env):
    up, sc = env
    httpx.get(sc.url + "/echo")
    assert sc.value(mn.INFLIGHT.name) == 0


def test_otlp_spans_exported_when_configured():
    from sentinel.config import TracingConfig

    with Upstream() as up, Upstream() as collector:
        cfg = dataclasses.replace(make_config(up.url), tracing=TracingConfig(otlp_endpoint=collector.url))
        trace = "6bf92f3577b34da6a3ce929d0e0e4736"
        with RunningSidecar(cfg) as sc:
            assert sc.sc.tracer is not None and sc.sc.tracer.endpoint == collector.url + "/v1/traces"
            httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY,
                       headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
            forwarded = up.seen[-1]["headers"]["traceparent"]
        # stopping flushes the batch processor
        posts = [s for s in collector.seen if s["path"] == "/v1/traces"]
        assert posts and bytes.fromhex(trace) in b"".join(p["body"] for p in posts)
        span_id = forwarded.split("-")[2]
        assert bytes.fromhex(span_id) in b"".join(p["body"] for p in posts)   # our span is the upstream's parent


def test_no_exporter_without_endpoint(env):
    up, sc = env
    assert sc.sc.tracer is None


def test_common_code_counters_exist_at_zero_before_the_first_request():
    """rate()/increase() count from a series' first scrape: a 503 series born holding the first
    burst lost it (the availability SLI, burn-rate alerts, controller templates). Each configured
    model's failure-code counters are exported at 0 from the start, for gRPC too when it listens; so
    are its 200s, whose first scrape was missing from every count of requests served."""
    models = (mn_model("digits", "v2"), mn_model("mnist", "v1"))
    cfg = dataclasses.replace(make_config("http://127.0.0.1:1", models=models), grpc_listen="127.0.0.1:0",
                              grpc_upstream="127.0.0.1:1")
    with RunningSidecar(cfg) as sc:
        text = httpx.get(sc.admin_url + "/metrics").text
        got = {(s.labels["model"], s.labels["protocol"], s.labels["code"]): s.value
               for f in text_string_to_metric_families(text) if f.name == mn.REQUESTS.name.removesuffix("_total")
               for s in f.samples if s.name == REQ}
    want = {(m, p, c) for m, protos in (("digits", ("v2", "grpc")), ("mnist", ("v1", "grpc")))
            for p in protos for c in ("200", "500", "502", "503", "504", "incomplete")}
    assert want <= set(got) and all(got[k] == 0.0 for k in want)
    assert not any(code == "404" for _, _, code in got)   # rarer codes still begin at their first


def mn_model(name: str, protocol: str):
    from sentinel.config import ModelConfig

    return ModelConfig(name=name, version="v1", protocol=protocol)
