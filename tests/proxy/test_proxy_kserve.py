"""The sidecar in front of a real kserve ModelServer (`sentinel serve --model digits:v3`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from proxy_helpers import RunningSidecar, make_config

from sentinel import metricnames as mn
from sentinel.config import ModelConfig
from sentinel.protocols import decode_response, oip_v2

REPO = Path(__file__).resolve().parents[2]
REQ = mn.REQUESTS.sample_name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "models/digits/v3/model.yaml").is_file(), reason="digits:v3 not in the registry"),
    pytest.mark.skipif(importlib.util.find_spec("sentinel.serve.server") is None,
                       reason="`sentinel serve` (sentinel.serve.server) not built yet"),
]


@pytest.fixture(scope="module")
def env():
    from servers import start_model_server

    with start_model_server("digits:v3") as server_url:
        url = str(server_url)   # a plain str: the config travels to the analysis process by pickle
        cfg = make_config(url, rate=1.0, models=(ModelConfig(name="digits", version="v3", protocol="v2"),))
        cfg = dataclasses.replace(cfg, upstream=url)
        with RunningSidecar(cfg) as sc:
            yield url, sc


def _both(env, method: str, path: str, **kw) -> tuple[httpx.Response, httpx.Response]:
    url, sc = env
    direct = httpx.request(method, url + path, **kw)
    proxied = httpx.request(method, sc.url + path, **kw)
    return direct, proxied


def test_v2_json_byte_for_byte(env):
    x = np.random.default_rng(0).integers(0, 17, (2, 8, 8)).astype(np.float32)
    body = json.dumps({"id": "req-1", "inputs": [{"name": "input-0", "shape": [2, 8, 8], "datatype": "FP32",
                                                  "data": x.reshape(-1).tolist()}]}).encode()
    direct, proxied = _both(env, "POST", "/v2/models/digits/infer", content=body,
                            headers={"content-type": "application/json"})
    assert direct.status_code == proxied.status_code == 200
    assert proxied.content == direct.content
    assert proxied.headers["content-type"] == direct.headers["content-type"]
    out = decode_response("v2", proxied.content, {})
    assert out.outputs.shape == (2, 10)


def test_v2_binary_network_input(env):
    x = np.random.default_rng(1).random((1, 1, 32, 32), dtype=np.float32)
    body, headers = oip_v2.encode([("input-0", x)], extra={"id": "bin-1"})
    direct, proxied = _both(env, "POST", "/v2/models/digits/infer", content=body, headers=headers)
    assert direct.status_code == proxied.status_code == 200
    assert proxied.content == direct.content


def test_v1_predict(env):
    body = json.dumps({"instances": np.zeros((1, 8, 8)).tolist()}).encode()
    direct, proxied = _both(env, "POST", "/v1/models/digits:predict", content=body)
    assert direct.status_code == proxied.status_code == 200
    assert proxied.content == direct.content and len(proxied.json()["predictions"][0]) == 10


def test_upstream_error_passes_through(env):
    body = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}'
    direct, proxied = _both(env, "POST", "/v2/models/digits/infer", content=body)
    assert direct.status_code == proxied.status_code and direct.status_code >= 400
    assert proxied.content == direct.content


def test_metrics_exemplars_and_samples(env):
    url, sc = env
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 8, 8], "datatype": "FP32",
                                   "data": [1.0] * 64}]}).encode()
    before = sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "200"})
    r = httpx.post(sc.url + "/v2/models/digits/infer", content=body,
                   headers={"traceparent": f"00-{trace}-1111111111111111-01", "content-type": "application/json"})
    assert r.status_code == 200
    assert sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == before + 1
    om = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert f'trace_id="{trace}"' in om
    assert sc.wait_for(mn.SAMPLES.sample_name, {"model": "digits", "outcome": "decoded"}, 3) >= 3
    assert sc.value(mn.PREDICTION_CONFIDENCE.name + "_count", {"model": "digits"}) >= 1
