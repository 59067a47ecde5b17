"""Sampling onto the analysis worker: decoded, rejected, dropped; failing and crashing workers."""

from __future__ import annotations

import logging
import random

import httpx
import numpy as np
from proxy_helpers import LOGITS, RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn
from sentinel.config import SamplingConfig
from sentinel.protocols import oip_v2
from sentinel.proxy.sampling import Sampler

SAMPLES = mn.SAMPLES.sample_name
V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_sampler_rate_cap_and_bytes():
    clock = _Clock()
    s = Sampler(SamplingConfig(rate=1.0, max_per_second=2, max_bytes=100), clock=clock)
    assert [s.decide(10) for _ in range(3)] == ["sample", "sample", "rate_limited"]
    clock.t = 0.5
    assert s.decide(10) == "sample"
    clock.t = 2.0
    assert s.decide(1000) == "oversize"
    half = Sampler(SamplingConfig(rate=0.5, max_per_second=1e9), rng=random.Random(1))
    n = sum(half.decide(None) == "sample" for _ in range(4000))
    assert 1800 < n < 2200
    assert Sampler(SamplingConfig(rate=0.0)).decide(1) is None


def test_sampled_pairs_are_decoded_and_predictions_counted():
    body, headers = oip_v2.encode([("x", np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32))])
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0)) as sc:
        with httpx.Client(base_url=sc.url) as c:
            for _ in range(3):
                assert c.post("/v2/models/digits/infer", content=body, headers=headers).status_code == 200
            # a malformed request still proxies fine, and its sample is rejected
            assert c.post("/v2/models/digits/infer", content=b"{oops").status_code == 200
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, 3) == 3
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "rejected"}, 1) == 1
        assert sc.value(SAMPLES, {"model": "digits", "outcome": "queued"}) == 4
        # the rejected pair's response still decodes, so the monitor sees all four outputs
        cls = str(int(LOGITS.argmax()))
        assert sc.wait_for(mn.PREDICTIONS.sample_name, {"model": "digits", "class": cls}, 4) == 4
        assert sc.value(mn.PREDICTION_CONFIDENCE.name + "_count", {"model": "digits"}) == 4
        status = httpx.get(sc.admin_url + "/status").json()
        assert status["analysis"]["worker_alive"] and status["models_seen"] == ["digits"]
        assert status["last_results"]["digits"]["predictions"] >= 1


def test_compressed_bodies_are_decoded_not_rejected():
    """tritonclient with request and response compression: the proxy forwards the bytes as they
    are, and the worker decodes under the content coding (gzip, deflate) instead of rejecting."""
    import tritonclient.http as triton

    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0)) as sc:
        client = triton.InferenceServerClient(sc.url.removeprefix("http://"))
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        for algorithm in ("gzip", "deflate", "gzip"):
            res = client.infer("digits", [inp], request_compression_algorithm=algorithm,
                               response_compression_algorithm="gzip")
            np.testing.assert_allclose(res.as_numpy("logits"), LOGITS, rtol=1e-6)
        client.close()
        seen = [r for r in up.seen if r["path"].endswith("/infer")]
        assert [r["headers"].get("content-encoding") for r in seen] == ["gzip", "deflate", "gzip"]
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, 3) == 3
        assert sc.value(SAMPLES, {"model": "digits", "outcome": "rejected"}) == 0
        cls = str(int(LOGITS.argmax()))
        assert sc.wait_for(mn.PREDICTIONS.sample_name, {"model": "digits", "class": cls}, 3) == 3


def test_monitor_raising_on_every_sample(caplog):
    caplog.set_level(logging.WARNING, logger="sentinel.analysis")
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0), "proxy_monitors:raising") as sc:
        with httpx.Client(base_url=sc.url) as c:
            for _ in range(5):
                assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
        assert sc.wait_for(mn.ANALYSIS_ERRORS.sample_name, {"kind": "RuntimeError"}, 5) == 5
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, 5) == 5
        assert httpx.get(sc.url + "/echo").status_code == 200
    logged = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(logged) == 1   # once per kind


def test_crashing_worker_is_restarted_and_proxy_unaffected():
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0), "proxy_monitors:crashing") as sc:
        with httpx.Client(base_url=sc.url) as c:
            assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
            assert sc.wait_for(mn.ANALYSIS_RESTARTS.sample_name, {"reason": "exit"}, 1) >= 1
            for _ in range(5):
                assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
        assert sc.value(mn.ANALYSIS_ERRORS.sample_name, {"kind": "worker_exit"}) >= 1


def test_full_queue_drops_without_blocking():
    cfg = make_config("http://127.0.0.1:1", rate=1.0)
    import dataclasses
    cfg = dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, queue_size=1))
    with Upstream() as up:
        cfg = dataclasses.replace(cfg, upstream=up.url)
        with RunningSidecar(cfg, "proxy_monitors:sleepy") as sc:
            with httpx.Client(base_url=sc.url) as c:
                for _ in range(15):
                    assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
            assert sc.value(SAMPLES, {"model": "digits", "outcome": "dropped"}) >= 5
            assert sc.value(mn.SAMPLE_QUEUE_CAPACITY.name) == 1


def test_queue_byte_budget_drops_big_samples():
    import dataclasses
    with Upstream() as up:
        cfg = make_config(up.url, rate=1.0)
        cfg = dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, queue_max_bytes=1000))
        with RunningSidecar(cfg) as sc:
            body = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}' + b" " * 2000
            assert httpx.post(sc.url + "/v2/models/digits/infer", content=body).status_code == 200
            assert sc.value(SAMPLES, {"model": "digits", "outcome": "dropped"}) == 1
            assert sc.value(SAMPLES, {"model": "digits", "outcome": "queued"}) == 0


def test_a_cap_below_one_per_second_still_samples():
    """max_per_second 0.5 is one sample every 2 s; the bucket, capped at 0.5 tokens, never held the 1
    a sample takes, so nothing was ever sampled (workers mode's shared budget took 50 in 100 s)."""
    clock = _Clock()
    s = Sampler(SamplingConfig(rate=1.0, max_per_second=0.5, max_bytes=100), clock=clock)
    taken = 0
    for i in range(1000):   # 10 requests a second for 100 s
        clock.t = i / 10
        taken += s.decide(10) == "sample"
    assert 49 <= taken <= 51


def test_a_body_sampled_in_several_reads_is_not_joined_on_the_event_loop():
    """Capture.sample joined the pieces of each body on the proxy's loop (8 MB: ~10 ms of copying,
    60 MB: 85 ms); the pieces now travel as they are and the worker joins them."""
    import pickle
    import tracemalloc

    from sentinel.proxy.sampling import Capture

    pieces = [bytes([i]) * (1 << 20) for i in range(3)]   # a 3 MiB body in three reads
    cap = Capture("digits", "v2", 8 << 20)
    for p in pieces:
        assert cap.request_body(p)
    cap.response_head(200, [(b"Content-Type", b"application/json")])
    assert cap.response_body(b'{"outputs": []}')
    tracemalloc.start()
    try:
        sample = cap.sample("trace")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sample is not None and peak < 64 * 1024, f"{peak} bytes allocated taking the sample"
    assert sample.size() == 3 * (1 << 20) + 15
    whole = pickle.loads(pickle.dumps(sample)).joined()   # as the worker receives and joins it
    assert whole.request_body == b"".join(pieces) and whole.response_body == b'{"outputs": []}'
    assert whole.joined() is whole
